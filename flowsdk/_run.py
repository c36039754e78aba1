"""Running a task as a run: `run()`, `run_async()`, `start()`, `Run` and `RunHandle`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import signal
import sys
import threading
from asyncio import CancelledError
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from flowsdk import _control as control
from flowsdk._control import ControlResult
from flowsdk._history import History
from flowsdk._names import check_name
from flowsdk._payload import encode_inputs
from flowsdk._phases import AbortCause, ActionPhase, RunPhase
from flowsdk._records import (
    ActionRecord,
    Event,
    EventKind,
    RunRecord,
    action_from_row,
    event_from_row,
)
from flowsdk._runtime import Runtime, TaskTracker, requester
from flowsdk.errors import (
    ActionAbortedError,
    ActionError,
    ActionMarkedFailedError,
    InvalidStateError,
    RunStoppedError,
    RuntimeUserError,
)
from flowsdk.store import RunRecorder, Store, open_store

if TYPE_CHECKING:
    from flowsdk._task import Task

__all__ = ["Run", "RunHandle", "run", "run_async", "start"]

logger = logging.getLogger("flowsdk")

R = TypeVar("R")

# How long `flowsdk.run` waits, after the run has ended, for tasks that are
# still pending (abandoned actions, plain asyncio tasks) before naming them.
FINAL_DRAIN = 1.0
_MISSING: Any = object()


class Run(Generic[R]):
    """A run that has ended: its phase, its actions and events, and its result."""

    def __init__(
        self,
        record: RunRecord,
        actions: list[ActionRecord] | Callable[[], list[ActionRecord]],
        events: list[Event] | Callable[[], list[Event]],
        *,
        value: Any = _MISSING,
        exc: BaseException | None = None,
        payloads: Callable[[], dict[str, tuple[bytes | None, bytes | None]]] | None = None,
    ) -> None:
        self.record = record
        # Records are built on first use: a run of 10,000 actions should not pay
        # for 40,000 datetime conversions nobody reads.
        self._actions = actions
        self._events = events
        self._value = value
        self._exc = exc
        self._payloads = payloads

    def payloads(self) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Each action's recorded inputs and output (MessagePack), by action name."""
        return self._payloads() if self._payloads is not None else {}

    @classmethod
    def _from_runtime(cls, runtime: Runtime) -> Run[Any]:
        root = runtime.root
        assert root is not None
        return cls(
            runtime.run_record(),
            lambda: [action_from_row(runtime.name, runtime.action_row(a)) for a in runtime.actions],
            lambda: [event_from_row((i, *e)) for i, e in enumerate(runtime.events)],
            value=root.value if root.phase is ActionPhase.SUCCEEDED else _MISSING,
            exc=root.exc,
            payloads=lambda: {a.name: (a.inputs, a.output) for a in runtime.actions},
        )

    @property
    def actions(self) -> list[ActionRecord]:
        """The run's actions, in start order."""
        if callable(self._actions):
            self._actions = self._actions()
        return self._actions

    @property
    def events(self) -> list[Event]:
        """The run's event log, oldest first."""
        if callable(self._events):
            self._events = self._events()
        return self._events

    @property
    def name(self) -> str:
        """The run's name."""
        return self.record.name

    @property
    def phase(self) -> RunPhase:
        """The run's terminal phase."""
        return self.record.phase

    @property
    def attempt(self) -> int:
        """Which attempt of the run this is (1 for the first)."""
        return self.record.attempt

    def __repr__(self) -> str:
        return f"<Run {self.name} {self.phase.value} {len(self.actions)} actions>"

    def action(self, name: str) -> ActionRecord:
        """Return the record of the action called `name` (e.g. `"a3"`)."""
        for record in self.actions:
            if record.name == name:
                return record
        raise KeyError(name)

    def result(self) -> R:
        """Return the root's value, or raise what a parent awaiting the root would get.

        Raises:
            RuntimeUserError: the root failed; `__cause__` is its exception (in
                the process that ran it).
            ActionAbortedError: the run was aborted.
            RunStoppedError: the run was stopped.
        """
        phase = self.phase
        root = self.actions[0]
        if phase is RunPhase.SUCCEEDED:
            if self._value is _MISSING:
                raise InvalidStateError(
                    f"run {self.name!r} succeeded but its output was not recorded"
                )
            return self._value  # type: ignore[no-any-return]
        if phase is RunPhase.STOPPED:
            stop = self.record.stop
            raise RunStoppedError(
                f"run {self.name!r} was stopped"
                + (f" ({stop.mode.value})" if stop else "")
                + (f": {stop.reason}" if stop and stop.reason else "")
            )
        exc = self._exc
        if phase is RunPhase.ABORTED:
            if isinstance(exc, ActionError):
                raise exc
            abort = root.abort
            raise ActionAbortedError(
                f"run {self.name!r} was aborted"
                + (f": {abort.reason}" if abort and abort.reason else ""),
                run=self.name,
                action=root.name,
                reason=abort.reason if abort else None,
                cause=abort.cause.value if abort else AbortCause.EXTERNAL.value,
            )
        if phase in (RunPhase.RUNNING, RunPhase.STOPPING):
            raise InvalidStateError(f"run {self.name!r} has not ended: {phase.value}")
        if isinstance(exc, RuntimeUserError) and not isinstance(exc, ActionMarkedFailedError):
            raise exc
        error = root.error
        raise RuntimeUserError(
            f"run {self.name!r} {phase.value.lower()}"
            + (f": {error.type}: {error.message}" if error else ""),
            run=self.name,
            action=root.name,
            error_type=error.type if error else "",
            error_message=error.message if error else "",
            error_traceback=error.traceback if error else "",
        ) from (exc if isinstance(exc, Exception) else None)


class _Runner:
    """Drives one run on the current loop: the root, teardown and the end record."""

    def __init__(
        self,
        task: Task[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None,
        store: str | Store | None,
        *,
        owns_loop: bool,
        attempt: int = 1,
        history: History | None = None,
    ) -> None:
        if not hasattr(task, "_handle"):
            raise TypeError(
                f"flowsdk runs a task declared with @env.task, not {task!r}; "
                "decorate the async function with a TaskEnvironment's .task"
            )
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.inputs = encode_inputs(task, args, kwargs)
        self.attempt = attempt
        self.history = history
        self.name = check_name("run", name) if name is not None else _new_run_name(task)
        self.owns_loop = owns_loop
        self.store = open_store(store)
        self.runtime: Runtime | None = None
        self.recorder: RunRecorder
        self.interrupts = 0

    async def begin(self) -> Runtime:
        """Record the new run and create its root action (its body starts on the next step).

        Raises:
            RunExistsError: the store has a run of that name.
            StoreError: the store cannot be used.
        """
        loop = asyncio.get_running_loop()
        runtime = Runtime(
            self.name,
            loop,
            task_path=task_path(self.task),
            attempt=self.attempt,
        )
        runtime.history = self.history
        self.recorder = await self.store.open_run(
            runtime.run_record(), loop, functools.partial(control.apply_request, runtime)
        )
        runtime.attach(self.recorder)
        runtime.tracker = TaskTracker(runtime)
        self.runtime = runtime
        runtime.event(EventKind.RUN, None, RunPhase.RUNNING.value)
        runtime.start_root(self.task, self.args, self.kwargs, self.inputs)
        return runtime

    async def finish(self) -> Run[Any]:
        """Wait for the root and the teardown, then record the run's end.

        Cancelled, it aborts the run (root cause `cancelled`), waits for the
        teardown, then re-raises `CancelledError`; cancelled again, it abandons
        the remaining actions.
        """
        runtime = self.runtime
        assert runtime is not None
        cancelled = 0
        while not runtime.drained.done():
            try:
                await asyncio.shield(runtime.drained)
            except CancelledError:
                cancelled += 1
                if cancelled == 1:
                    runtime.abort_run(
                        AbortCause.CANCELLED, reason="the task running the run was cancelled"
                    )
                else:
                    runtime.abandon_all(None)
        runtime.end()
        runtime.report_unobserved()
        tracker = runtime.tracker
        if tracker is not None:
            tracker.close()
            left = tracker.survivors()
            if left and not self.owns_loop:
                # flowsdk.run drains its own loop; under run_async they stay in the caller's.
                runtime.warn(
                    None,
                    "plain asyncio tasks started by the run were cancelled at its end but are "
                    "still running: " + ", ".join(_task_label(t) for t in left),
                )
        result = Run._from_runtime(runtime)
        self.recorder.finished(result)
        await self.recorder.close()
        if cancelled:
            raise CancelledError
        return result

    def on_sigint(self) -> None:
        """Ctrl-C: abort the run first; on the second, stop waiting for cleanup."""
        runtime = self.runtime
        if runtime is None:
            return
        self.interrupts += 1
        if self.interrupts == 1:
            logger.warning(
                "run %s: interrupted; aborting (press Ctrl-C again to stop waiting)", runtime.name
            )
            if runtime.base_exc is None:
                runtime.base_exc = KeyboardInterrupt()
            runtime.abort_run(AbortCause.SIGINT, reason="interrupted (SIGINT)", by=requester())
        else:
            runtime.abandon_all(None)


def _new_run_name(task: Task[..., Any]) -> str:
    stem = (
        "".join(c if c.isalnum() else "-" for c in task.fn.__name__.lower()).strip("-")[:40]
        or "run"
    )
    return f"{stem}-{secrets.token_hex(4)}"


async def run_async(
    task: Task[..., R], *args: Any, name: str | None = None, store: str | Store | None = None
) -> Run[R]:
    """Run `task(*args)` as the root action of a new run and wait until the run ends.

    Keyword arguments for the task go through `functools.partial`; the keywords
    here are the run's options. Cancelled, the run is aborted and its teardown
    awaited before `CancelledError` propagates.

    Args:
        task: A task declared with `@env.task`.
        *args: Positional arguments for the task.
        name: The run's name (unique in its store); default: generated.
        store: Where the run is recorded (see `flowsdk.run`).
    """
    task, args, kwargs = _unpartial(task, args)
    runner = _Runner(task, args, kwargs, name, store, owns_loop=False)
    runtime = await runner.begin()
    result = await runner.finish()
    if runtime.base_exc is not None:
        # A KeyboardInterrupt/SystemExit raised in a body, re-raised once the
        # run's end is recorded, as asyncio would have raised it.
        raise runtime.base_exc
    return result


async def start(
    task: Task[..., R], *args: Any, name: str | None = None, store: str | Store | None = None
) -> RunHandle[R]:
    """Start a run in the background of the current loop and return its handle at once."""
    task, args, kwargs = _unpartial(task, args)
    runner = _Runner(task, args, kwargs, name, store, owns_loop=False)
    runtime = await runner.begin()
    return RunHandle(runtime, asyncio.get_running_loop().create_task(runner.finish()))


def run(
    task: Task[..., R], *args: Any, name: str | None = None, store: str | Store | None = None
) -> Run[R]:
    """Run `task(*args)` as the root action of a new run, on a fresh event loop.

    Blocks until the run has ended, its actions' cleanup included, and returns
    the ended `Run`. Ctrl-C aborts the run (root cause `sigint`), waits for
    cleanup, then raises `KeyboardInterrupt`; a second Ctrl-C stops waiting.

    Args:
        task: A task declared with `@env.task` (or a `functools.partial` of one).
        *args: Positional arguments for the task.
        name: The run's name (unique in its store); default: generated.
        store: Where the run is recorded: a URL (`sqlite:///path.db`,
            `memory://`), a path, or a store object; default: `$FLOWSDK_STORE`,
            else `sqlite:///.flowsdk/flowsdk.db` in the working directory.

    Raises:
        RuntimeError: called from a running event loop (use `flowsdk.run_async`).
    """
    _no_running_loop()
    task, args, kwargs = _unpartial(task, args)
    return run_sync(_Runner(task, args, kwargs, name, store, owns_loop=True))


def _no_running_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        "flowsdk.run() cannot be called from a running event loop; "
        "use 'await flowsdk.run_async(...)' (or 'await flowsdk.start(...)') instead"
    )


def run_sync(runner: _Runner) -> Run[Any]:
    """Drive `runner` on a fresh event loop, with the SIGINT handling of `flowsdk.run`."""
    _no_running_loop()
    loop = asyncio.new_event_loop()
    previous = None
    use_signal = threading.current_thread() is threading.main_thread()
    try:
        if use_signal:
            previous = signal.getsignal(signal.SIGINT)
            loop.add_signal_handler(signal.SIGINT, runner.on_sigint)
        result = loop.run_until_complete(_begin_and_finish(runner))
        _final_drain(loop, runner)
    finally:
        try:
            if use_signal:
                loop.remove_signal_handler(signal.SIGINT)
                signal.signal(
                    signal.SIGINT, previous if previous is not None else signal.default_int_handler
                )
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
    runtime = runner.runtime
    if runtime is not None and runtime.base_exc is not None:
        raise runtime.base_exc
    return result


async def _begin_and_finish(runner: _Runner) -> Run[Any]:
    await runner.begin()
    return await runner.finish()


def _task_label(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return f"{task.get_name()} ({getattr(coro, '__qualname__', coro)})"


def _final_drain(loop: asyncio.AbstractEventLoop, runner: _Runner) -> None:
    """Cancel what is still pending on our own loop, wait a bounded time, name survivors.

    What can be left: plain asyncio tasks that workflow code started and never
    awaited, the cleanup of abandoned actions, and bodies that ignored two
    cancellations (zombies, which are not cancelled a third time). None may
    keep the process from exiting. After a second Ctrl-C nothing is waited for.
    """
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not pending:
        return
    runtime = runner.runtime
    names: dict[asyncio.Task[Any], str] = {}
    zombies: set[asyncio.Task[Any]] = set()
    if runtime is not None:
        for action in runtime.actions:
            if action.atask is not None and not action.atask.done():
                names[action.atask] = f"action {action.name} ({action.task.name})"
        zombies = {a.atask for a in runtime.zombies if a.atask is not None}
    if runner.interrupts < 2:
        waiting = [t for t in pending if t not in zombies]
        for t in waiting:
            t.cancel()
        if waiting:
            loop.run_until_complete(asyncio.wait(waiting, timeout=FINAL_DRAIN))
    survivors = [t for t in pending if not t.done()]
    for t in survivors:
        logger.warning(
            "run %s: %s did not finish after cancellation; it is abandoned",
            runtime.name if runtime else "?",
            names.get(t) or _task_label(t),
        )
        # A body that also ignores GeneratorExit makes close() raise RuntimeError:
        # nothing more can be done for it.
        with contextlib.suppress(RuntimeError):
            t.get_coro().close()
        # The loop is closing with this task still pending; that is reported above.
        t._log_destroy_pending = False  # type: ignore[attr-defined]
    # A survivor may already have a step scheduled (it was cancelled): let it run
    # into its closed coroutine now, and retrieve the outcome, reported above.
    loop.run_until_complete(asyncio.sleep(0))
    for t in survivors:
        if t.done() and not t.cancelled():
            t.exception()


def _unpartial(task: Any, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Split `functools.partial(task, *a, **kw)` into the task and its arguments."""
    kwargs: dict[str, Any] = {}
    while isinstance(task, functools.partial):
        args = (*task.args, *args)
        kwargs = {**task.keywords, **kwargs}
        task = task.func
    return task, args, kwargs


def task_path(task: Task[..., Any]) -> str:
    """Return `module:qualname` of a task's function (how a retry finds it again).

    For a script run as `__main__`, the module part is the script's absolute
    path, which a retry imports under another name.
    """
    fn = task.fn
    module = fn.__module__
    script = getattr(sys.modules.get(module), "__flowsdk_script__", None)
    if script is not None:
        return f"{script}:{fn.__qualname__}"  # a script that a retry or `flowsdk run` imported
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        file = getattr(main, "__file__", None)
        if spec is not None and spec.name:
            module = spec.name  # run with `python -m pkg.mod`: importable by that name
        elif file:
            module = os.path.abspath(file)
    return f"{module}:{fn.__qualname__}"


class RunHandle(Generic[R]):
    """A run started with `flowsdk.start`, controllable while it runs."""

    def __init__(self, runtime: Runtime, task: asyncio.Task[Run[Any]]) -> None:
        self._runtime = runtime
        self._task = task

    @property
    def name(self) -> str:
        """The run's name."""
        return self._runtime.name

    @property
    def phase(self) -> RunPhase:
        """The run's phase now."""
        return self._runtime.phase

    def __repr__(self) -> str:
        return f"<RunHandle {self.name} {self.phase.value}>"

    async def wait(self) -> Run[R]:
        """Wait until the run has ended and return it; cancelling the wait leaves the run alone."""
        return await asyncio.shield(self._task)

    async def abort(
        self, action: str | None = None, *, group: str | None = None, reason: str | None = None
    ) -> ControlResult:
        """Abort the run, one action's subtree (`"a3"`) or a group's actions. Idempotent.

        Raises:
            ActionNotFoundError: the run has no such action or group.
        """
        return control.abort(self._runtime, action, group=group, reason=reason, by=requester())

    async def stop(self, *, abandon: bool = False, reason: str | None = None) -> ControlResult:
        """Stop the run: let in-progress actions finish, or (`abandon=True`) abandon them.

        Raises:
            InvalidStateError: the run is already stopping (a second stop-and-wait).
        """
        result = control.stop(self._runtime, abandon=abandon, reason=reason, by=requester())
        if result.outcome == "refused":
            raise InvalidStateError(result.message)
        return result

    async def mark_failed(self, action: str, *, reason: str | None = None) -> ControlResult:
        """Mark an action as failed: its body is cancelled, its parent gets `RuntimeUserError`."""
        return control.mark_failed(self._runtime, action, reason=reason, by=requester())
