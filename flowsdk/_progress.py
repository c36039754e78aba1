"""Progress reports of actions, and the parent-side observers that follow them.

`flowsdk.report(value, step=, name=)` records a numeric value of the calling
action and hands it to the observers its parent attached to the call with
`flowsdk.follow(call, on_report)`. The report returns once every observer has
seen it; a cancel an observer decides on (`Report.cancel`, or `t.cancel()` of
the task awaiting the call) reaches the body at that very `await`.

Nothing here costs an action that never reports: its per-action state (a
`Trace`, shared with the log capture of `_logs`) is made on first use, and
observers are found in the action's own context only then.

`deliver_report` is the one driver-side entry point: an executor that runs
bodies elsewhere (Ray) forwards a remote body's reports to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from flowsdk._action import ActionState, current
from flowsdk._bodies import AT_REPORT
from flowsdk._phases import ActionPhase
from flowsdk.errors import NotInRunError
from flowsdk.executors._remote import set_report_sink

if TYPE_CHECKING:
    from flowsdk._records import ProgressRow
    from flowsdk._runtime import Runtime
    from flowsdk.store import RunRecorder

__all__ = [
    "Report",
    "Trace",
    "deliver_report",
    "follow",
    "recorder_of",
    "report",
    "report_sync",
    "trace_of",
]

T = TypeVar("T")
Observer = Callable[["Report"], Awaitable[None] | None]
MAX_NAME = 200
MAX_STEP = 2**63 - 1  # a step is kept as a 64-bit integer (SQLite INTEGER, PostgreSQL BIGINT)
_CANCELLABLE = (ActionPhase.QUEUED, ActionPhase.RUNNING)
_REAL = (int, float)  # (a tuple: `int | float` would make a union object at every report)


class Trace:
    """What one action has reported and logged so far (made on its first report or record)."""

    __slots__ = ("latest", "logs", "observers", "reports")

    def __init__(self, state: ActionState) -> None:
        self.reports = 0  # reports so far, across attempts: the next report's `n`
        self.logs = 0  # log records so far: the next record's `n`
        self.latest: ProgressRow | None = None
        context = state.context
        followers = context.get(_followers, ()) if context is not None else ()
        # Only the followers attached by this action's parent to its call: a
        # grandchild inherits the context too, but its reports are its parent's to follow.
        self.observers: tuple[_Follower, ...] = tuple(
            f for f in followers if f.parent is state.parent
        )


def trace_of(state: ActionState) -> Trace:
    """Return the action's `Trace`, making it on first use."""
    try:
        trace: Trace = state.trace
    except AttributeError:
        trace = state.trace = Trace(state)
    return trace


def recorder_of(state: ActionState) -> RunRecorder | None:
    """Return the recorder of the action's run (None before the run is recorded)."""
    runtime: Runtime = state.runtime  # type: ignore[assignment]
    return runtime.log.recorder


class Report:
    """One progress report, as an observer of the reporting action sees it.

    Attributes:
        action: The reporting action's name (`a7`).
        task: Its task's name.
        name: What was reported (`"value"` unless `name=` said otherwise).
        step: The step given to `report`, or `None`.
        value: The value, a float.
        at: When it was reported (epoch seconds).
    """

    __slots__ = ("_state", "action", "at", "name", "step", "task", "value")

    def __init__(self, state: ActionState, row: ProgressRow) -> None:
        self._state = state
        self.action = state.name
        self.task = state.task.name
        self.name = row.name
        self.step = row.step
        self.value = row.value
        self.at = row.at

    def __repr__(self) -> str:
        return f"Report({self.action!r}, {self.name!r}, step={self.step!r}, value={self.value!r})"

    def cancel(self, reason: str | None = None) -> None:
        """Cancel the reporting action (cause `cancelled`, with `reason`).

        As `t.cancel(reason)` of the task awaiting it would, with no step in
        between: the body gets `CancelledError` at the `await flowsdk.report(...)`
        that made this report, the action is recorded `ABORTED` (cause
        `cancelled`, this reason), and its awaiter gets `CancelledError`.
        Nothing happens if the action is already being stopped.
        """
        state = self._state
        if state.req is None and state.phase in _CANCELLABLE:
            runtime: Runtime = state.runtime  # type: ignore[assignment]
            runtime.cancel_from_caller(state, reason)


class _Follower:
    __slots__ = ("error", "observer", "parent")

    def __init__(self, parent: ActionState | None, observer: Observer) -> None:
        self.parent = parent
        self.observer = observer
        # What the observer raised: the parent's own error, raised where it awaits the call.
        self.error: Exception | None = None


_followers: contextvars.ContextVar[tuple[_Follower, ...]] = contextvars.ContextVar(
    "flowsdk.followers", default=()
)


def follow(call: Coroutine[Any, Any, T], on_report: Observer) -> Coroutine[Any, Any, T]:
    """Call `on_report` with every progress report of the action `call` starts.

    `call` is a task call made in the current action's body (`train(lr)`);
    the result is awaited, gathered or wrapped in a task exactly as `call`
    would be, and gives what `call` gives. `on_report(report)` (a function, or
    an `async def`) runs before the child's `await flowsdk.report(...)`
    returns, so a decision it takes (`report.cancel(reason)`) lands in the
    child's body at that report, never a step later. Reports of the child's
    own children are not passed on.

    Raises:
        TypeError: `call` is not a coroutine, or `on_report` is not callable.
    """
    if not inspect.iscoroutine(call):
        raise TypeError(
            f"flowsdk.follow needs the call of a task (e.g. follow(train(lr), on_report)), "
            f"not {type(call).__name__}"
        )
    given: object = on_report
    if not callable(given):
        call.close()
        raise TypeError(f"on_report must be callable, not {type(on_report).__name__}")
    return _followed(call, _Follower(current.get(), on_report))


async def _followed(call: Coroutine[Any, Any, T], follower: _Follower) -> T:
    token = _followers.set((*_followers.get(), follower))
    try:
        result = await call
    except (asyncio.CancelledError, Exception):
        if follower.error is None:
            raise
        result = None  # cancelled because the observer raised: the parent gets that instead
    finally:
        _followers.reset(token)
    error = follower.error
    if error is not None:
        follower.error = None
        try:
            raise error
        finally:
            del error  # this frame, in the traceback, must not keep the exception: a cycle
    return result  # type: ignore[return-value]


async def report(value: float, *, step: int | None = None, name: str = "value") -> None:
    """Record a numeric progress value of the calling action and tell its observers.

    Shown by `show`, `watch` and the console, and kept in the store. Returns
    once the observers attached with `flowsdk.follow` have seen it. Without
    observers it costs a few microseconds and no loop step.

    Raises:
        NotInRunError: called outside a run.
        TypeError: `value` is not a real number, `step` not an int, `name` not a string.
        ValueError: `step` is negative or past 2**63 - 1, `value` an int too large for a
            float, or `name` empty or longer than 200 characters.
    """
    state = current.get()
    if state is None:
        raise NotInRunError(
            "flowsdk.report() was called outside a run; call it from a task body "
            "running under flowsdk.run()"
        )
    if (
        type(value) is float
        and name == "value"
        and (step is None or (type(step) is int and 0 <= step <= MAX_STEP))
    ):
        number = value  # the common report, checked here: a call more cost 10% of it
    else:
        number, step, name = _checked(value, step, name)
    if state.runtime.remote:
        # A body running on Ray: the report goes to the driver, which records it
        # and hands it to the observers there; this returns once they have seen it.
        from flowsdk.executors._ray_worker import report_from_worker

        await report_from_worker(number, step, name)
        return
    trace = _record(state, number, step, name)
    if trace.observers:
        await _observe(state, trace)


def _checked(value: float, step: int | None, name: str) -> tuple[float, int | None, str]:
    """A report's value as a float, its step and its name, checked (`report`'s errors)."""
    kind = type(value)
    if kind is not float and kind is not int and (kind is bool or not isinstance(value, _REAL)):
        raise TypeError(f"flowsdk.report needs a number as value, not {kind.__name__}")
    if step is not None and (type(step) is not int or step < 0 or step > MAX_STEP):
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int or None, not {type(step).__name__}")
        if step > MAX_STEP:  # the stores keep a step as a 64-bit integer
            raise ValueError(f"step must be at most 2**63 - 1, not {step}")
        raise ValueError(f"step must be >= 0, not {step}")
    try:
        number = value if kind is float else float(value)
    except OverflowError:  # an int past float's range
        raise ValueError(
            "flowsdk.report needs a value a float can hold; this int is larger"
        ) from None
    if name != "value":
        if not isinstance(name, str):
            raise TypeError(f"name must be a string, not {type(name).__name__}")
        if not name or len(name) > MAX_NAME:
            raise ValueError(f"name must be 1 to {MAX_NAME} characters, not {len(name)}")
        name = name.replace("\x00", "\\x00")
    return number, step, name


def report_sync(value: float, *, step: int | None = None, name: str = "value") -> None:
    """`report`, for a plain `def` body (or any thread working for an action's body).

    A `def` body runs in a worker thread and cannot `await`: this records the
    report on the run's loop and returns once the observers attached with
    `flowsdk.follow` have seen it, as `report` does. It is also the thread's
    point of cancellation: once the action is cancelled (an observer's
    `report.cancel`, `t.cancel()`, an operator's abort, the root's exit), it
    raises `CancelledError` with the cancel's message, so the body stops there
    and runs its cleanup. A cancel decided on this very report is waited for as
    an async body's is (the action ends once the thread has ended); one that
    came while the thread computed ended the action at once, and the thread
    stops at its next report.

    Raises:
        CancelledError: the action is cancelled (see above).
        NotInRunError: called outside a run.
        RuntimeError: called on the run's event loop (an `async def` body: `await
            flowsdk.report(...)`), where waiting for the loop would wait for itself.
        TypeError, ValueError: as `report`.
    """
    state = current.get()
    if state is None:
        raise NotInRunError(
            "flowsdk.report_sync() was called outside a run; call it from a task body "
            "running under flowsdk.run()"
        )
    number, step, name = _checked(value, step, name)
    loop = state.runtime.loop
    if asyncio._get_running_loop() is loop:
        raise RuntimeError(
            "flowsdk.report_sync() was called on the run's event loop, which it would wait "
            "for; in an async def body use: await flowsdk.report(...)"
        )
    _stop_if_cancelled(state)
    if state.runtime.remote:
        from flowsdk.executors._ray_worker import report_from_worker

        delivery = report_from_worker(number, step, name)
    else:
        delivery = deliver_report(state, number, step, name)
    me = threading.get_ident()
    AT_REPORT.add(me)  # a cancel decided on this report waits for this thread (`in_thread`)
    try:
        try:
            done = asyncio.run_coroutine_threadsafe(delivery, loop)
        except RuntimeError:  # the loop has closed: the run is over
            delivery.close()
            raise asyncio.CancelledError("flowsdk: the run has ended") from None
        with contextlib.suppress(concurrent.futures.CancelledError):  # by the run's end
            done.result()
        _stop_if_cancelled(state)
    finally:
        AT_REPORT.discard(me)


def _stop_if_cancelled(state: ActionState) -> None:
    """Raise the action's cancel in a thread working for it, once it is cancelled."""
    req = state.req
    if req is not None:
        raise asyncio.CancelledError(req.message())
    if state.phase not in _CANCELLABLE:
        raise asyncio.CancelledError("flowsdk: the action has ended")


async def deliver_report(state: ActionState, value: float, step: int | None, name: str) -> None:
    """Record a report of `state` and wait until its observers have seen it.

    The driver-side entry point: `flowsdk.report` does the same in the body's
    own task, and an executor that runs the body elsewhere calls it, on the
    run's loop, with each report the remote body sends (from the action's
    task, so that a cancel decided by an observer lands where the body waits).
    """
    trace = _record(state, value, step, name.replace("\x00", "\\x00"))
    if trace.observers:
        await _observe(state, trace)


def _record(state: ActionState, value: float, step: int | None, name: str) -> Trace:
    """Record one report of `state` (the cheap part: no observer, no await)."""
    try:
        trace: Trace = state.trace
    except AttributeError:
        trace = state.trace = Trace(state)
    row = (_row_type[0] or _load_row_type())(state.name, trace.reports, _time(), name, step, value)
    trace.reports += 1
    trace.latest = row
    runtime: Runtime = state.runtime  # type: ignore[assignment]
    recorder = runtime.log.recorder  # (`recorder_of`, without its call: this is per report)
    if recorder is not None:
        recorder.progress(row)
    return trace


# `ProgressRow`, imported on the first report (so that `import flowsdk` stays light) and
# kept: an import statement in `_record` cost about 1 us a report, half of its time.
_row_type: list[type[ProgressRow] | None] = [None]
_time = time.time


def _load_row_type() -> type[ProgressRow]:
    from flowsdk._records import ProgressRow

    _row_type[0] = ProgressRow
    return ProgressRow


async def _observe(state: ActionState, trace: Trace) -> None:
    """Hand the latest report to each observer; let a cancel they decided on land here."""
    row = trace.latest
    assert row is not None
    seen = Report(state, row)
    for follower in trace.observers:
        try:
            answer = follower.observer(seen)
            if answer is not None and inspect.isawaitable(answer):
                await answer
        except Exception as exc:
            # The observer is the parent's code: its error is the parent's, raised where
            # the parent awaits the call (`_followed`), not this action's to retry. This
            # action is cancelled, as by a `Report.cancel` naming the error.
            follower.error = exc
            seen.cancel(f"its observer raised {type(exc).__name__}: {exc}")
            break
    # An observer's `t.cancel()` of a task of its own awaiting this action cancels the
    # action at once (`ActionState.__call__`). The parent's body awaiting the call
    # directly turns a cancel of its task into this action's cancel on its next step:
    # give it that step, so the cancel lands here and not at the body's next await.
    waiter = state.parent.atask if state.parent is not None else None
    if state.req is None and waiter is not None and waiter.cancelling() and not waiter.done():
        await asyncio.sleep(0)
    if state.req is not None:
        await asyncio.sleep(0)  # a cancel delivered meanwhile is raised here


# Reports sent by bodies running elsewhere (Ray) are delivered as local ones are.
set_report_sink(deliver_report)
