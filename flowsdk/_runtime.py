"""The core: a run's action tree bound to asyncio tasks.

Every action runs its body in an asyncio task of its own (the *action task*),
created by the runtime. What a caller awaits is a thin *handle* coroutine that
starts the action on its first step and then waits on a plain future that the
action resolves when it ends. Two consequences shape everything below:

- The runtime only ever cancels action tasks it owns, never a caller's task, so
  an abort never leaks into a parent's `cancelling()` count (the gh-102780 class
  of bug cannot happen here).
- No task awaits another task directly through the SDK, so cancelling an action
  never recurses through an await chain: teardown of a depth-2,000 tree is a
  flat loop.

Phase rules, in one place (`_finish_cancelled`): once the runtime has delivered
a cancel to an action, the request decides its terminal phase (ABORTED with the
request's cause, FAILED for mark-failed and timeouts, ABANDONED for a stop),
whatever the body returns; only an exception raised by the cleanup itself turns
it into FAILED, as in asyncio.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import getpass
import logging
import math
import os
import socket
import time
from asyncio import CancelledError
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flowsdk._describe import describe, format_stack, safe_str
from flowsdk._group import current_group
from flowsdk._history import History
from flowsdk._payload import (
    decode_inputs,
    decode_output,
    encode_inputs,
    encode_output,
    inputs_digest,
    task_version,
)
from flowsdk._phases import AbortCause, ActionPhase, RunPhase, check_action_transition
from flowsdk._records import EventKind, RunRecord, StopInfo, StopMode, to_datetime
from flowsdk.errors import (
    ActionAbortedError,
    ActionMarkedFailedError,
    NondeterminismError,
    RunClosedError,
    RunStoppingError,
    RuntimeUserError,
    SerializationError,
    TaskTimeoutError,
)

if TYPE_CHECKING:
    from flowsdk._task import Task
    from flowsdk.store import RunRecorder

__all__ = ["ActionState", "Runtime", "TaskTracker", "action_handle", "current_state", "requester"]

logger = logging.getLogger("flowsdk")

_current: contextvars.ContextVar[ActionState | None] = contextvars.ContextVar(
    "flowsdk.action", default=None
)

# After the second cancel, how long a body may still run before it is recorded
# with cleanup_incomplete=True and no longer waited for.
ABANDON_AFTER = 1.0
TIMER_RESOLUTION = 0.01  # grace and abandon deadlines are rounded up to this (seconds)
MAX_BACKOFF = 60.0
_MESSAGE_LIMIT = 2_000
_TRACEBACK_LIMIT = 20_000

# Enum members as module constants: on Python 3.11 `ActionPhase.RUNNING` goes
# through a descriptor on every access, which shows on the per-action path.
QUEUED, RUNNING, STOPPING = ActionPhase.QUEUED, ActionPhase.RUNNING, ActionPhase.STOPPING
SUCCEEDED, FAILED, ABORTED = ActionPhase.SUCCEEDED, ActionPhase.FAILED, ActionPhase.ABORTED
ABANDONED, CRASHED = ActionPhase.ABANDONED, ActionPhase.CRASHED
CANCELLED_CAUSE, ANCESTOR, EXTERNAL = AbortCause.CANCELLED, AbortCause.ANCESTOR, AbortCause.EXTERNAL
ROOT_EXIT, STOP, SIGINT = AbortCause.ROOT_EXIT, AbortCause.STOP, AbortCause.SIGINT
# Event entries hold plain strings only, so the garbage collector can untrack
# them (a tuple holding an enum member stays tracked and is traversed again).
ACTION_EVENT = EventKind.ACTION.value
_TERMINAL = (
    SUCCEEDED,
    FAILED,
    ABORTED,
    ABANDONED,
    CRASHED,
)  # a tuple: `in` compares identity first


class _Internal(enum.Enum):
    """Requests that stop an action by cancellation but are not abort causes."""

    MARK_FAILED = "mark_failed"
    TIMEOUT = "timeout"


Request = AbortCause | _Internal


def current_state() -> ActionState | None:
    """Return the action whose body (or whose spawned task) is running, if any."""
    return _current.get()


def requester() -> str:
    """Name the caller of a control request: `user@host pid N`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


class ActionState:
    """The live, mutable state of one action (records are snapshots of it)."""

    __slots__ = (
        "args",
        "atask",
        "attempt",
        "calls",
        "cancels",
        "cleanup_incomplete",
        "done",
        "ended_at",
        "error",
        "exc",
        "group",
        "host",
        "inputs",
        "key",
        "kwargs",
        "name",
        "output",
        "parent",
        "phase",
        "replayed",
        "req",
        "req_at",
        "req_by",
        "req_reason",
        "runtime",
        "seq",
        "started_at",
        "task",
        "timer",
        "value",
    )

    def __init__(
        self,
        runtime: Runtime,
        seq: int,
        name: str,
        parent: ActionState | None,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str,
        group: str | None,
    ) -> None:
        self.runtime = runtime
        self.seq = seq
        self.name = name
        self.parent = parent
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.key = key
        self.group = group
        self.phase = QUEUED
        self.attempt = 1
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.value: Any = None
        self.exc: BaseException | None = None
        self.error: tuple[str, str, str] | None = None
        self.req: Request | None = None
        self.req_reason: str | None = None
        self.req_by: str | None = None
        self.req_at: float | None = None
        self.atask: asyncio.Task[None] | None = None
        self.done: asyncio.Future[None] | None = None
        self.timer: tuple[int, Callable[[ActionState], None]] | None = None
        self.cancels = 0
        self.calls = 0
        self.cleanup_incomplete = False
        self.replayed = False
        self.host: asyncio.Task[Any] | None = None
        self.inputs: bytes | None = None
        self.output: bytes | None = None

    def __repr__(self) -> str:
        return f"<action {self.runtime.name}/{self.name} {self.task.name} {self.phase.value}>"

    @property
    def abort_cause(self) -> AbortCause | None:
        """The abort cause to record, if the action was stopped by cancellation."""
        return self.req if isinstance(self.req, AbortCause) else None


async def action_handle(
    runtime: Runtime,
    parent: ActionState,
    task: Task[Any, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: str,
    inputs: bytes,
    recorded: bytes | None,
) -> Any:
    """Start one child action and return (or raise) what its parent should see.

    This is the coroutine `task(...)` returns inside a run. `Task` copies it
    under the user's function name. Cancelled while waiting (`t.cancel()`, a
    parent's `asyncio.timeout`, teardown), it cancels the action, waits for the
    action's cleanup, then re-raises `CancelledError`; a second cancel stops the
    wait. With a `recorded` output (a retried run's history, or the cache) the
    body does not run: the action is recorded as replayed.
    """
    rec = runtime._rec
    if rec is not None and rec.congested():
        await rec.relieved()  # backpressure: the store is far behind this run
    if recorded is None and task.options.cache:
        recorded = await runtime.cache_get(task, inputs)
    if recorded is not None:
        return runtime.replay(parent, task, key, inputs, recorded)
    action = runtime.start(parent, task, args, kwargs, key, inputs)
    host = asyncio.current_task()
    if host is not parent.atask:
        action.host = host  # a task of its own (create_task, gather...): see _root_exited
    done = action.done
    assert done is not None
    try:
        await done
    except CancelledError:
        if action.phase not in _TERMINAL:
            runtime.cancel_from_caller(action)
            if action.phase not in _TERMINAL:
                action.done = runtime.loop.create_future()
                await action.done
        if action.phase is FAILED and parent.req is None:
            # Workflow code cancelled it and its cleanup raised instead: as in
            # asyncio, the awaiter gets that error, not CancelledError (C4).
            runtime.note_failure_host(action)
            return runtime.outcome(action)
        raise
    if action.phase is SUCCEEDED:
        return action.value
    runtime.note_failure_host(action)
    return runtime.outcome(action)


async def _execute(runtime: Runtime, action: ActionState) -> None:
    """Run an action's body, with retries and timeout; record how it ended.

    This is the action task's coroutine. It never raises an `Exception`: every
    outcome is recorded on the action, so no task exception can go unretrieved.
    """
    _current.set(action)
    task = action.task
    fn = task.fn
    options = task.options
    runtime.set_running(action)
    try:
        while True:
            # Each attempt gets a fresh snapshot: an attempt that mutated its
            # arguments does not change what the next one receives.
            assert action.inputs is not None
            args, kwargs = decode_inputs(task, action.args, action.kwargs, action.inputs)
            timer = None
            if options.timeout is not None:
                timer = runtime.loop.call_later(options.timeout, runtime.on_timeout, action)
            try:
                value = await fn(*args, **kwargs)
            except CancelledError:
                if timer is not None:
                    timer.cancel()
                if action.req is _Internal.TIMEOUT and runtime.retry_after_timeout(action):
                    if await runtime.backoff(action):
                        continue
                    return
                runtime.finish_cancelled(action)
                return
            except GeneratorExit:
                raise
            except BaseException as exc:
                if timer is not None:
                    timer.cancel()
                if not isinstance(exc, Exception):
                    runtime.finish_base_exception(action, exc)
                    return
                if action.req is None and runtime.retry(action, exc):
                    if await runtime.backoff(action):
                        continue
                    return
                runtime.finish_failed(action, exc)
                return
            if timer is not None:
                timer.cancel()
            if action.req is None:
                runtime.finish_succeeded(action, value)
            else:
                runtime.finish_cancelled(action)
            return
    except GeneratorExit:
        raise  # the coroutine is being closed (a zombie at the end of the run)
    except BaseException as exc:
        # The runtime's own bookkeeping failed (a bug, or an exception such as a
        # test harness's alarm landing in it): record the action CRASHED so that
        # nothing waits for it forever, then let a BaseException go on.
        runtime.crash(action, exc)
        if not isinstance(exc, Exception):
            raise


# Exceptions from a body that retries never answer: they are not the user's errors.
_NOT_RETRIED = (ActionAbortedError, NondeterminismError, RunStoppingError, RunClosedError)


class TaskTracker:
    """Plain asyncio tasks that a run's bodies start, so the root's exit can cancel them.

    Installed as the loop's task factory for the run's duration, chaining to
    any factory already set, so a user's own factory keeps working. Python
    3.11 tasks do not expose their context; this is how a task is known to
    belong to the run.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.loop = runtime.loop
        self.previous = self.loop.get_task_factory()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.loop.set_task_factory(self)  # type: ignore[arg-type]

    def __call__(
        self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        previous = self.previous
        task: Any
        if previous is not None:
            task = previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        state = _current.get()
        if state is not None and state.runtime is self.runtime and not self.runtime.closed:
            code = getattr(coro, "cr_code", None)
            if code is not _execute.__code__ and code is not action_handle.__code__:
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        return task  # type: ignore[no-any-return]

    def cancel_all(self) -> None:
        """Cancel every tracked task still running (no record: they are not actions)."""
        for task in list(self.tasks):
            if not task.done():
                task.cancel()

    def survivors(self) -> list[asyncio.Task[Any]]:
        """The tracked tasks that are still pending."""
        return [t for t in self.tasks if not t.done()]

    def close(self) -> None:
        """Give the loop back its previous task factory (unless someone replaced ours)."""
        factory: object = self.loop.get_task_factory()
        if factory is self:
            self.loop.set_task_factory(self.previous)


class Runtime:
    """The live state of one run: its actions, their tasks, and its lifetime.

    One instance per run; it lives on one event loop and is not thread-safe.
    Control requests (`abort`, `stop`, `mark_failed`) are applied synchronously
    and say what they did.
    """

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        *,
        attempt: int = 1,
        task_path: str = "",
    ) -> None:
        self.name = name
        self.attempt = attempt
        self.task_path = task_path
        self._rec: RunRecorder | None = None
        self.cache: RunRecorder | None = None
        self.history: History | None = None
        self.tracker: TaskTracker | None = None
        self._timers: dict[tuple[int, Callable[[ActionState], None]], list[ActionState]] = {}
        self.loop = loop
        self.phase = RunPhase.RUNNING
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.actions: list[ActionState] = []
        self.live: dict[str, ActionState] = {}
        self.by_name: dict[str, ActionState] = {}
        self.events: list[tuple[Any, ...]] = []
        self.root: ActionState | None = None
        self.closed = False
        self.stop_mode: StopMode | None = None
        self.stop_info: tuple[StopMode, str | None, str | None, float] | None = None
        self.base_exc: BaseException | None = None
        self.zombies: list[ActionState] = []
        self.failure_hosts: list[asyncio.Task[Any]] = []
        self.drained: asyncio.Future[None] = loop.create_future()
        self._counter = 0

    # -- recording ---------------------------------------------------------------

    def attach(self, recorder: RunRecorder) -> None:
        """Stream every change of this run to `recorder` (unless it keeps only the end)."""
        self._rec = recorder if getattr(recorder, "streams", True) else None
        self.cache = recorder

    def event(
        self,
        kind: EventKind,
        action: str | None = None,
        phase: str | None = None,
        cause: str | None = None,
        reason: str | None = None,
        requested_by: str | None = None,
        message: str | None = None,
    ) -> None:
        """Append one entry to the run's event log."""
        self._log((time.time(), kind.value, action, phase, cause, reason, requested_by, message))

    def _log(self, entry: tuple[Any, ...]) -> None:
        self.events.append(entry)
        if self._rec is not None:
            self._rec.event((len(self.events) - 1, *entry))

    def _changed(self, action: ActionState) -> None:
        """Send the action's current state to the store (if it streams)."""
        if self._rec is not None:
            self._rec.action(self.action_row(action))

    def action_row(self, action: ActionState) -> tuple[Any, ...]:
        """The action's state as a row (see `flowsdk._records.action_from_row`)."""
        error = action.error
        req = action.req
        cause = req.value if isinstance(req, AbortCause) else None
        return (
            action.name,
            action.seq,
            action.parent.name if action.parent is not None else None,
            action.task.name,
            action.group,
            action.phase.value,
            action.attempt,
            action.started_at,
            action.ended_at,
            error[0] if error else None,
            error[1] if error else None,
            error[2] if error else None,
            action.req_reason if cause else None,
            cause,
            action.req_by if cause else None,
            action.req_at if cause else None,
            int(action.cleanup_incomplete),
            action.key,
            int(action.replayed),
            action.inputs,
            action.output,
        )

    def run_record(self) -> RunRecord:
        """Return the run's current record."""
        stop = self.stop_info
        return RunRecord(
            name=self.name,
            phase=self.phase,
            started_at=datetime.fromtimestamp(self.started_at, UTC),
            ended_at=to_datetime(self.ended_at),
            attempt=self.attempt,
            stop=StopInfo(
                mode=stop[0],
                reason=stop[1],
                requested_by=stop[2],
                requested_at=datetime.fromtimestamp(stop[3], UTC),
            )
            if stop
            else None,
            task=self.task_path,
        )

    def run_changed(self) -> None:
        if self._rec is not None:
            self._rec.run(self.run_record())

    def _set_phase(
        self, action: ActionState, phase: ActionPhase, message: str | None = None
    ) -> None:
        check_action_transition(action.phase, phase)
        action.phase = phase
        cause = action.req.value if action.req is not None and phase is not RUNNING else None
        self._log(
            (
                time.time(),
                ACTION_EVENT,
                action.name,
                phase.value,
                cause,
                action.req_reason,
                action.req_by,
                message,
            )
        )
        self._changed(action)

    def warn(self, action: ActionState | None, message: str) -> None:
        """Log a warning and record it in the event log."""
        logger.warning("run %s: %s", self.name, message)
        self.event(EventKind.WARNING, action.name if action else None, message=message)

    # -- creating actions ----------------------------------------------------------

    def call(
        self,
        task: Task[Any, Any],
        parent: ActionState,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Coroutine[Any, Any, Any]:
        """Return the awaitable for `task(*args, **kwargs)` called by `parent`'s code.

        The inputs are recorded (and so snapshotted) here, and the call's key is
        counted here, whatever the scheduling.

        Raises:
            RunClosedError: the run's root has exited.
            RunStoppingError: the run is being stopped.
            SerializationError: an input cannot be recorded.
            NondeterminismError: a retried run's call differs from its history.
        """
        if self.closed:
            raise RunClosedError(
                f"run {self.name!r} is closed (its root action has exited): "
                f"task {task.name!r} was not started"
            )
        if self.stop_mode is not None:
            raise RunStoppingError(
                f"run {self.name!r} is stopping: task {task.name!r} was not started"
            )
        inputs = encode_inputs(task, args, kwargs)  # SerializationError: no action
        parent.calls += 1
        if parent.attempt == 1:
            key = f"{parent.key}/{parent.calls}"
        else:
            # Children of a later attempt of the same action get keys of their own.
            key = f"{parent.key}@{parent.attempt}/{parent.calls}"
        recorded = None
        if self.history is not None:
            recorded = self.history.match(key, task.name, inputs)
        return task._handle(self, parent, task, args, kwargs, key, inputs, recorded)

    def _new(
        self,
        parent: ActionState | None,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str,
        inputs: bytes,
    ) -> ActionState:
        seq = self._counter
        self._counter += 1
        name = f"a{seq}"
        action = ActionState(self, seq, name, parent, task, args, kwargs, key, current_group())
        action.inputs = inputs
        self.actions.append(action)
        self.live[name] = action
        self.by_name[name] = action
        self._log((action.started_at, ACTION_EVENT, name, "QUEUED", None, None, None, None))
        self._changed(action)
        return action

    def _spawn(self, action: ActionState) -> ActionState:
        loop = self.loop
        action.done = loop.create_future()
        tracker = self.tracker
        if tracker is not None and tracker.previous is None:
            # Our own task: skip the tracking factory (it would only skip it).
            action.atask = asyncio.Task(_execute(self, action), loop=loop)
        else:
            action.atask = loop.create_task(_execute(self, action))
        return action

    def start(
        self,
        parent: ActionState,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str,
        inputs: bytes,
    ) -> ActionState:
        """Create a child action of `parent` and its task (the handle's first step)."""
        if self.closed:
            # The root exited between the call and this first step: the action
            # never starts, as if it had been cancelled before its first step.
            raise CancelledError
        return self._spawn(self._new(parent, task, args, kwargs, key, inputs))

    def start_root(
        self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any], inputs: bytes
    ) -> ActionState:
        """Create the root action `a0`."""
        self.root = self._spawn(self._new(None, task, args, kwargs, "a0", inputs))
        return self.root

    def replay(
        self, parent: ActionState, task: Task[Any, Any], key: str, inputs: bytes, output: bytes
    ) -> Any:
        """Record a call answered from history (or the cache) and return its output.

        The body does not run; the action goes from QUEUED to SUCCEEDED with
        `replayed=True`.
        """
        if self.closed:
            raise CancelledError
        value = decode_output(task, output)
        action = self._new(parent, task, (), {}, key, inputs)
        action.replayed = True
        action.output = output
        action.value = value
        self._finish(action, SUCCEEDED)
        return value

    async def cache_get(self, task: Task[Any, Any], inputs: bytes) -> bytes | None:
        """Look up a finished output of the same task version and inputs in the store."""
        if self.cache is None:
            return None
        return await self.cache.cache_get(task.name, task_version(task), inputs_digest(inputs))

    def set_running(self, action: ActionState) -> None:
        """Record that the action's body starts (its first attempt)."""
        self._set_phase(action, RUNNING, None)

    # -- finishing actions ---------------------------------------------------------

    def _finish(self, action: ActionState, phase: ActionPhase) -> None:
        if action.phase in _TERMINAL:
            return  # a zombie's body ending after it was given up on: already recorded
        action.timer = None
        action.ended_at = time.time()
        self._set_phase(action, phase, "cleanup incomplete" if action.cleanup_incomplete else None)
        del self.live[action.name]
        # The action's inputs are not needed any more; drop them early so a long
        # run does not hold every argument it ever passed.
        action.args = ()
        action.kwargs = {}
        done = action.done
        if done is not None and not done.done():
            done.set_result(None)
        if action is self.root:
            self._root_exited()
        if self.closed and not self.live and not self.drained.done():
            self.drained.set_result(None)

    def finish_succeeded(self, action: ActionState, value: Any) -> None:
        """Record the body's return value (an unrecordable one fails the action)."""
        if action.phase in _TERMINAL:
            return
        try:
            action.output = encode_output(action.task, value)
        except SerializationError as exc:
            self.finish_failed(action, exc)
            return
        action.value = value
        if action.task.options.cache and self.cache is not None and action.inputs is not None:
            self.cache.cache_put(
                action.task.name,
                task_version(action.task),
                inputs_digest(action.inputs),
                action.output,
            )
        self._finish(action, SUCCEEDED)

    def finish_failed(self, action: ActionState, exc: BaseException) -> None:
        """Record a body that raised `exc` (user code, or a cleanup that raised)."""
        if action.phase in _TERMINAL:
            return
        # Drop the runtime's own frame from the traceback: the user sees their
        # body's frames, and the exception does not keep this frame (and so the
        # action) alive in a reference cycle.
        tb = exc.__traceback__
        if tb is not None and tb.tb_frame.f_code is _execute.__code__:
            exc.__traceback__ = tb.tb_next
        action.exc = exc
        action.error = describe(exc)
        self._finish(action, FAILED)
        if action.req is not None and not isinstance(action.req, _Internal):
            self.warn(
                action,
                f"the cleanup of {action.name} ({action.task.name}) raised "
                f"{action.error[0]}: {action.error[1]}",
            )

    def note_failure_host(self, action: ActionState) -> None:
        """Remember the caller's task if it exists only to await `action`.

        Such a task (`asyncio.create_task(child())`) ends with the action's
        error. If workflow code never looks at it, `report_unobserved` names the
        failure at the end of the run instead of asyncio's "Task exception was
        never retrieved" at garbage collection.
        """
        host = asyncio.current_task()
        parent = action.parent
        if host is None or parent is None or host is parent.atask:
            return
        coro = host.get_coro()
        if getattr(coro, "cr_code", None) is action_handle.__code__:
            self.failure_hosts.append(host)

    def report_unobserved(self) -> None:
        """Log each failed child whose error workflow code never retrieved (D4)."""
        hosts, self.failure_hosts = self.failure_hosts, []
        for host in hosts:
            if host.done() and not host.cancelled() and getattr(host, "_log_traceback", False):
                host._log_traceback = False
                exc = host.exception()
                self.warn(
                    None,
                    f"an unobserved child failed: {type(exc).__name__}: "
                    f"{safe_str(exc) if exc else ''}",
                )

    def finish_cancelled(self, action: ActionState) -> None:
        """Record a body that ended after (or because of) a cancellation."""
        if action.phase in _TERMINAL:
            return
        req = action.req
        if req is None:
            # Cancelled by workflow code (or raised CancelledError itself).
            action.req = CANCELLED_CAUSE
            self._finish(action, ABORTED)
        elif req is _Internal.MARK_FAILED:
            action.exc = ActionMarkedFailedError(
                f"action {action.name} of run {self.name!r} was marked as failed"
                + (f": {action.req_reason}" if action.req_reason else ""),
                run=self.name,
                action=action.name,
                reason=action.req_reason,
            )
            action.error = describe(action.exc)
            self._finish(action, FAILED)
        elif req is _Internal.TIMEOUT:
            action.exc = self._timeout_error(action)
            action.error = describe(action.exc)
            self._finish(action, FAILED)
        elif req is AbortCause.STOP:
            self._finish(action, ABANDONED)
        else:
            self._finish(action, ABORTED)

    def crash(self, action: ActionState, exc: BaseException) -> None:
        """Record an action whose bookkeeping failed as CRASHED; never raises."""
        logger.error(
            "run %s: internal error while running action %s (%s)",
            self.name,
            action.name,
            action.task.name,
            exc_info=exc,
        )
        if action.phase in _TERMINAL:
            return
        action.exc = exc
        action.error = (type(exc).__name__, safe_str(exc), "")
        self._finish(action, CRASHED)

    def finish_base_exception(self, action: ActionState, exc: BaseException) -> None:
        """Record a body that raised `KeyboardInterrupt`/`SystemExit`; abort the run.

        The exception is kept to be re-raised by `flowsdk.run` once the run's
        teardown is recorded; it is never wrapped, retried or returned as a value.
        """
        if self.base_exc is None:
            self.base_exc = exc
        action.exc = exc
        action.error = describe(exc)
        self._finish(action, FAILED)
        self.abort_run(SIGINT, reason=f"{type(exc).__name__} raised in {action.name}")

    def _timeout_error(self, action: ActionState) -> TaskTimeoutError:
        seconds = action.task.options.timeout
        err = TaskTimeoutError(
            f"action {action.name} ({action.task.name}) of run {self.name!r} exceeded its "
            f"timeout of {seconds:g} s (attempt {action.attempt})",
            run=self.name,
            action=action.name,
        )
        err.__cause__ = TimeoutError(f"attempt took longer than {seconds:g} s")
        return err

    # -- retries -------------------------------------------------------------------

    def retry(self, action: ActionState, exc: BaseException) -> bool:
        """Decide whether a failed attempt gets another one; record the failure if so.

        Only user errors are retried: not an abort reaching the body, nor a
        divergence from a retried run's history, nor a call refused because the
        run is stopping or closed.
        """
        if isinstance(exc, _NOT_RETRIED) or action.attempt > action.task.options.retries:
            return False
        if self.closed:
            return False
        error = describe(exc)
        self.event(
            EventKind.ACTION,
            action.name,
            RUNNING.value,
            message=f"attempt {action.attempt} failed with {error[0]}: {error[1]}; retrying",
        )
        return True

    def retry_after_timeout(self, action: ActionState) -> bool:
        """After a timed-out attempt, undo its cancel and decide whether to retry."""
        task = action.atask
        assert task is not None
        while action.cancels:
            task.uncancel()
            action.cancels -= 1
        action.timer = None
        if action.attempt > action.task.options.retries or self.closed:
            return False
        action.req = None
        action.req_reason = None
        self.event(
            EventKind.ACTION,
            action.name,
            RUNNING.value,
            message=f"attempt {action.attempt} timed out; retrying",
        )
        return True

    async def backoff(self, action: ActionState) -> bool:
        """Wait before the next attempt; return False if cancelled meanwhile (recorded)."""
        options = action.task.options
        delay = min(options.backoff * 2 ** (action.attempt - 1), MAX_BACKOFF)
        try:
            await asyncio.sleep(delay)
        except CancelledError:
            self.finish_cancelled(action)
            return False
        action.attempt += 1
        action.calls = 0  # the new attempt's children are counted afresh (their keys differ)
        self._changed(action)
        self.event(
            EventKind.ACTION, action.name, RUNNING.value, message=f"attempt {action.attempt}"
        )
        return True

    def on_timeout(self, action: ActionState) -> None:
        """Cancel an attempt that exceeded its task's timeout."""
        if action.req is None and action.phase not in _TERMINAL:
            self._request(action, _Internal.TIMEOUT, None, None)
            self._deliver(action)

    # -- what a parent sees --------------------------------------------------------

    def outcome(self, action: ActionState) -> Any:
        """Return the value, or raise what an awaiting parent gets (SPEC §1)."""
        phase = action.phase
        if phase is SUCCEEDED:
            return action.value
        if phase is FAILED:
            exc = action.exc
            if isinstance(exc, RuntimeUserError) and not isinstance(exc, ActionMarkedFailedError):
                raise exc  # never wrapped twice
            if exc is None or not isinstance(exc, Exception):
                raise CancelledError  # KeyboardInterrupt/SystemExit: never wrapped
            error = action.error
            assert error is not None
            raise RuntimeUserError(
                f"action {action.name} ({action.task.name}) of run {self.name!r} failed: "
                f"{error[0]}: {error[1]}",
                run=self.name,
                action=action.name,
                error_type=error[0],
                error_message=error[1],
                error_traceback=error[2],
            ) from exc
        if phase is ABORTED and action.req is EXTERNAL:
            raise self.aborted_error(action)
        raise CancelledError

    def aborted_error(self, action: ActionState) -> ActionAbortedError:
        """Build the `ActionAbortedError` an operator's abort of `action` produces."""
        return ActionAbortedError(
            f"action {action.name} ({action.task.name}) of run {self.name!r} was aborted"
            + (f": {action.req_reason}" if action.req_reason else ""),
            run=self.name,
            action=action.name,
            reason=action.req_reason,
            cause=action.req.value if action.req is not None else EXTERNAL.value,
        )

    # -- cancellation --------------------------------------------------------------

    def _request(
        self, action: ActionState, req: Request, reason: str | None, by: str | None
    ) -> None:
        action.req = req
        action.req_reason = reason
        action.req_by = by
        action.req_at = time.time()

    def _deliver(self, action: ActionState) -> None:
        """Deliver the first cancel of a request to the action's body."""
        if action.phase is QUEUED:
            # Its body has not started: it never will. Cancelling the task
            # before its first step closes the coroutine without running it.
            self.finish_cancelled(action)
            assert action.atask is not None
            action.atask.cancel()
            return
        if action.phase is RUNNING and action.req is not _Internal.TIMEOUT:
            self._set_phase(action, STOPPING)
        if action.cancels == 0:
            self._cancel_task(action)
            grace = action.task.options.grace_period
            self._later(action, grace, self._on_grace)

    def _cancel_task(self, action: ActionState) -> None:
        task = action.atask
        assert task is not None
        if not task.done():
            action.cancels += 1
            task.cancel()

    def _later(
        self, action: ActionState, delay: float, callback: Callable[[ActionState], None]
    ) -> None:
        """Call `callback(action)` in about `delay` seconds, replacing its pending timer.

        Timers due in the same `TIMER_RESOLUTION` share one loop handle: cancelling
        1,000 children costs one timer, not 1,000. Clearing `action.timer`
        cancels it.
        """
        slot = math.ceil((self.loop.time() + delay) / TIMER_RESOLUTION)
        key = (slot, callback)
        bucket = self._timers.get(key)
        if bucket is None:
            bucket = self._timers[key] = []
            self.loop.call_at(slot * TIMER_RESOLUTION, self._fire, key)
        bucket.append(action)
        action.timer = key

    def _fire(self, key: tuple[int, Callable[[ActionState], None]]) -> None:
        _, callback = key
        for action in self._timers.pop(key, ()):
            if action.timer == key:  # not cleared or replaced since
                action.timer = None
                callback(action)

    def _on_grace(self, action: ActionState) -> None:
        """The grace period is over: cancel the body again, then give it one more second."""
        action.timer = None
        if action.phase in _TERMINAL:
            return
        stack = format_stack(action.atask)
        self.warn(
            action,
            f"action {action.name} ({action.task.name}) is still running "
            f"{action.task.options.grace_period:g} s after it was cancelled; cancelling it again. "
            f"It is at:\n{stack}",
        )
        self._escalate(action)

    def _escalate(self, action: ActionState) -> None:
        """Deliver the second (and last) cancel; give the body `ABANDON_AFTER` more."""
        # The second cancel interrupts whatever cleanup was running.
        action.cleanup_incomplete = True
        self._cancel_task(action)
        self._later(action, ABANDON_AFTER, self._on_abandon)

    def _on_abandon(self, action: ActionState) -> None:
        """The body ignored two cancels: record it and stop waiting for it."""
        action.timer = None
        if action.phase in _TERMINAL:
            return
        action.cleanup_incomplete = True
        self.zombies.append(action)
        self.warn(
            action,
            f"action {action.name} ({action.task.name}) ignored cancellation; it is recorded "
            "with cleanup_incomplete=true and no longer waited for",
        )
        if action.req is None:
            action.req = CANCELLED_CAUSE
        self.finish_cancelled(action)

    def cancel_from_caller(self, action: ActionState) -> None:
        """The task awaiting `action` was cancelled: cancel the action too."""
        if action.req is None:
            parent = action.parent
            cause = ANCESTOR if parent is not None and parent.req is not None else CANCELLED_CAUSE
            # Only this action: as in asyncio, the cancel reaches its descendants
            # through the awaits it is in (they record cause `ancestor`), and a
            # child behind `asyncio.shield` keeps running (C7).
            self._request(action, cause, None, None)
            self._deliver(action)

    def _cancel_all(self, actions: Iterable[ActionState]) -> None:
        # Deepest-first is not needed for correctness (no SDK task awaits
        # another task), but reverse start order lets leaves start their
        # cleanup before the parents that wait on them.
        for action in sorted(actions, key=_start_order, reverse=True):
            if action.phase not in _TERMINAL:
                self._deliver(action)

    def _root_exited(self) -> None:
        """The root's body ended: close the run and cancel every descendant."""
        self.closed = True
        if self.tracker is not None:
            self.tracker.cancel_all()
        marked = []
        for action in list(self.live.values()):
            if action.req is CANCELLED_CAUSE and action.cancels == 1:
                # Cancelled by workflow code and still cleaning up: the lifetime
                # rule wins, the root's exit interrupts that cleanup (C3).
                self._escalate(action)
            if action.req is None:
                # A task that workflow code cancelled just before the root
                # returned (`t.cancel(); return`) has not delivered its cancel
                # yet: that action was cancelled by the code, not by the exit.
                host = action.host
                cancelled = host is not None and host.cancelling() > 0 and not host.done()
                cause = CANCELLED_CAUSE if cancelled else ROOT_EXIT
                self._request(action, cause, None, None)
                marked.append(action)
        self._cancel_all(marked)

    def abort_run(
        self, cause: AbortCause, *, reason: str | None = None, by: str | None = None
    ) -> None:
        """Abort the root with `cause` and its descendants with cause `ancestor`."""
        root = self.root
        if root is None or root.phase in _TERMINAL:
            return
        self.request_cancel([root], cause, reason, by)

    def request_cancel(
        self, targets: list[ActionState], req: Request, reason: str | None, by: str | None
    ) -> None:
        """Request `req` for the live targets, `ancestor` for their descendants; cancel them."""
        named = {t for t in targets if t.phase not in _TERMINAL}
        for target in named:
            if target.req is not req:
                # A named target's request replaces a collateral one (X8: a child
                # named in the same instant as its parent is aborted in its own right).
                self._request(target, req, reason, by)
        affected = list(named)
        for action in self._descendants(named):
            if action.req is None:
                self._request(action, ANCESTOR, None, None)
                affected.append(action)
        self._cancel_all(affected)

    def _descendants(self, targets: set[ActionState]) -> list[ActionState]:
        """The live actions below any of `targets`, in one pass over the live actions.

        Each ancestor chain is walked once (the answer is remembered for every
        node on it), so a deep tree costs linear time, not depth squared.
        """
        if all(t.calls == 0 and t.attempt == 1 for t in targets):
            return []  # leaves: nothing below them (the common case, kept cheap)
        below: dict[ActionState, bool] = dict.fromkeys(targets, True)
        found = []
        for action in self.live.values():
            if action in below:
                continue
            path = []
            node: ActionState | None = action
            verdict = False
            while node is not None:
                known = below.get(node)
                if known is not None:
                    verdict = known
                    break
                path.append(node)
                node = node.parent
            for visited in path:
                below[visited] = verdict
            if verdict:
                found.append(action)
        return found

    def abandon_all(
        self, cause: AbortCause | None, reason: str | None = None, by: str | None = None
    ) -> None:
        """Give up on every action in progress: record it ABANDONED and stop waiting for it.

        Args:
            cause: `stop` for a stop-and-abandon; `None` keeps each action's own
                cause (a second Ctrl-C during teardown).
            reason: The operator's reason, if any.
            by: Who asked.
        """
        self.closed = True
        for action in sorted(self.live.values(), key=_start_order, reverse=True):
            if cause is not None:
                self._request(action, cause, reason, by)
            elif not isinstance(action.req, AbortCause):
                self._request(action, ANCESTOR, action.req_reason, action.req_by)
            # A body that had started is not waited for: its cleanup may never finish.
            action.cleanup_incomplete = action.phase is not QUEUED
            self._finish(action, ABANDONED)
            if action.cancels == 0:
                self._cancel_task(action)
        if not self.drained.done():
            self.drained.set_result(None)

    # -- end of the run ------------------------------------------------------------

    def final_phase(self) -> RunPhase:
        """Decide the run's terminal phase from its root and the requests it received."""
        root = self.root
        assert root is not None
        if self.stop_mode is not None:
            return RunPhase.STOPPED
        if root.phase is SUCCEEDED:
            return RunPhase.SUCCEEDED
        if root.phase is FAILED:
            exc = root.exc
            if isinstance(exc, ActionAbortedError) or (
                exc is not None and not isinstance(exc, Exception)
            ):
                return RunPhase.ABORTED
            if isinstance(exc, RuntimeUserError) and isinstance(exc.__cause__, ActionAbortedError):
                return RunPhase.ABORTED
            return RunPhase.FAILED
        if root.phase is CRASHED:
            return RunPhase.CRASHED
        return RunPhase.ABORTED

    def end(self) -> None:
        """Record the run's terminal phase (after its teardown)."""
        if self.phase.terminal:
            return
        self.phase = self.final_phase()
        self.ended_at = time.time()
        self.event(EventKind.RUN, None, self.phase.value)
        self.run_changed()


def _start_order(action: ActionState) -> int:
    return action.seq


def _iso(at: float | None) -> str:
    return "?" if at is None else datetime.fromtimestamp(at, UTC).isoformat()
