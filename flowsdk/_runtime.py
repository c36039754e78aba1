"""The core: one run's action tree, its lifetime, and its record.

The runtime owns the run's state and is the only code that changes it. It is
cut along three seams, each with a state of its own:

- **who asked** (`ActionState.req`, a `Request`): set by `request_cancel`,
  `cancel_from_caller` (`Delivery.from_caller`), `root_exited`, `on_timeout`,
  `abandon_all`; a request named by an operator replaces a collateral one;
- **how cancellation is delivered** (`Delivery`: first cancel through the
  executor, grace period, escalation, zombies);
- **what results** (`_outcome`: the terminal phase after a request, what a
  parent sees, the run's final phase).
Run phase changes go through the transition table (`check_run_transition`); every
change is streamed to the run's recorder as typed rows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from asyncio import CancelledError
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime
from operator import attrgetter
from types import CodeType
from typing import TYPE_CHECKING, Any

from flowsdk._action import ActionState, Ended, Request
from flowsdk._delivery import Delivery
from flowsdk._describe import describe, safe_str
from flowsdk._group import current_group
from flowsdk._history import History
from flowsdk._limit import over_limit
from flowsdk._outcome import after_cancel, cleanup_raised, final_phase, settle
from flowsdk._payload import (
    decode_output,
    encode_inputs,
    encode_output,
    inputs_digest,
    task_version,
)
from flowsdk._phases import AbortCause, ActionPhase, RunPhase, check_action_transition
from flowsdk._phases import check_run_transition as _check_run
from flowsdk._recording import ACTION_ROWS, RunLog
from flowsdk._records import (
    EventKind,
    RunRecord,
    StopInfo,
    StopMode,
    to_datetime,
)
from flowsdk._tracker import TaskTracker
from flowsdk._tree import Forgotten, descendants, seq_of
from flowsdk.errors import (
    RunClosedError,
    RunStoppingError,
    SerializationError,
)

if TYPE_CHECKING:
    from flowsdk._options import TaskSpec
    from flowsdk.store import RunRecorder

__all__ = ["KEEP_IN_MEMORY", "Runtime"]

KEEP_IN_MEMORY = 10_000
"""Actions a run keeps as they are before it lets finished ones go (`Runtime.forget`)."""

logger = logging.getLogger("flowsdk")

# Enum members as module constants: `ActionPhase.RUNNING` is a descriptor access on 3.11.
QUEUED, RUNNING, STOPPING = ActionPhase.QUEUED, ActionPhase.RUNNING, ActionPhase.STOPPING
SUCCEEDED, FAILED, ABORTED = ActionPhase.SUCCEEDED, ActionPhase.FAILED, ActionPhase.ABORTED
ABANDONED, CRASHED = ActionPhase.ABANDONED, ActionPhase.CRASHED
CANCELLED, ANCESTOR = AbortCause.CANCELLED, AbortCause.ANCESTOR
ROOT_EXIT, STOP, SIGINT = AbortCause.ROOT_EXIT, AbortCause.STOP, AbortCause.SIGINT
_TERMINAL = (SUCCEEDED, FAILED, ABORTED, ABANDONED, CRASHED)  # `in` compares identity first
# `in` compares each item by identity, then as strings: for a running action,
# one check here, five in `_TERMINAL` (the per-action path uses this).
_LIVE = (RUNNING, QUEUED, STOPPING)
_PLAIN_CAUSES = (CANCELLED, ANCESTOR)  # a cancel's causes that end an action ABORTED
_time = time.time
_START_ORDER = attrgetter("seq")


class Runtime:
    """The live state of one run: its actions, their tasks, and its lifetime.

    One instance per run; it lives on one event loop and is not thread-safe.
    """

    remote = False  # bodies run here (a body on Ray sees a `RemoteRun`)

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        *,
        attempt: int = 1,
        task_path: str = "",
        workdir: str = "",
        history: History | None = None,
        max_actions: int | None = None,
    ) -> None:
        self.name = name
        self.loop = loop
        self.attempt = attempt
        self.task_path = task_path
        self.workdir = workdir
        self.history = history
        self.log = RunLog()
        self.tracker: TaskTracker | None = None
        self.delivery = Delivery(self, loop)
        # The task awaiting an action was cancelled: cancel the action (no extra call).
        self.cancel_from_caller = self.delivery.from_caller
        self.cancel_again_from_caller = self.delivery.from_caller_again
        self.phase = RunPhase.RUNNING
        self.started_at = time.time()
        self.ended_at: float | None = None
        # Start order -> action. Once a run has started `KEEP_IN_MEMORY` actions, a
        # finished one is let go (`forget`; `forgotten` keeps its phase). A run whose
        # store streams every change spills: the store has its record, events are not
        # kept, and the ended run's records are read back. Otherwise (`memory://`) the
        # log keeps it compact, untracked by the garbage collector (`RunLog.compact`).
        self.actions: dict[int, ActionState] = {}
        self.started = 0  # actions created so far (the next one's seq)
        self.max_actions = max_actions  # `started` is checked against it (`_limit`)
        self.forget_from: float = math.inf  # started actions past which finished ones go
        self.forgotten = Forgotten()
        self.live: dict[str, ActionState] = {}
        self.root: ActionState | None = None
        self.closed = False
        self.stop: StopInfo | None = None
        self.base_exc: BaseException | None = None
        self.failure_hosts: list[asyncio.Task[Any]] = []
        self.drained: asyncio.Future[None] = loop.create_future()

    # -- recording ---------------------------------------------------------------

    def attach(self, recorder: RunRecorder) -> None:
        """Send every change of this run to `recorder` (actions and events if it streams)."""
        self.log.attach(recorder)
        self.forget_from = KEEP_IN_MEMORY

    def track_tasks(
        self,
        own: frozenset[CodeType],
        handle: CodeType,
        gathered: Callable[..., Any],
    ) -> None:
        """Track the plain asyncio tasks the run's bodies start (the root's exit cancels them)."""
        self.tracker = TaskTracker(self, self.loop, own, handle, gathered)

    def event(
        self,
        kind: EventKind,
        action: str | None = None,
        *,
        phase: str | None = None,
        reason: str | None = None,
        requested_by: str | None = None,
        message: str | None = None,
    ) -> None:
        """Append one entry (a request, a warning, where a body runs) to the run's event log."""
        self.log.event(
            kind, action, phase, reason=reason, requested_by=requested_by, message=message
        )

    def run_record(self) -> RunRecord:
        """Return the run's current record."""
        return RunRecord(
            name=self.name,
            phase=self.phase,
            started_at=datetime.fromtimestamp(self.started_at, UTC),
            ended_at=to_datetime(self.ended_at),
            attempt=self.attempt,
            stop=self.stop,
            task=self.task_path,
            workdir=self.workdir,
        )

    def _run_changed(self) -> None:
        self.log.run(self.run_record())

    def _set_run_phase(
        self, phase: RunPhase, *, reason: str | None = None, by: str | None = None
    ) -> None:
        _check_run(self.phase, phase)
        self.phase = phase
        self.log.event(EventKind.RUN, None, phase.value, reason=reason, requested_by=by)

    def set_phase(self, action: ActionState, phase: ActionPhase, checked: bool = True) -> None:
        """Move an action to a live `phase` and record it (unchecked: legal by construction)."""
        if checked:
            check_action_transition(action.phase, phase)
        action.phase = phase
        log = self.log
        req = action.req if phase is not RUNNING else None
        log.transition(_time(), action.name, phase._value_, req, None)  # `_value_`: no property
        if log.streaming is not None:
            log.streaming.changed(action, ACTION_ROWS)

    def action_named(self, name: str) -> ActionState | Ended | None:
        """Return the action called `name` (or what is left of it once forgotten), if any."""
        seq = seq_of(name)
        if seq is None:
            return None
        return self.actions.get(seq) or self.forgotten.get(name, seq)

    def forget(self, action: ActionState) -> None:
        """Let a finished action go (started past `forget_from`): `RunLog.let_go`."""
        if action is not self.root:
            self.log.let_go(action, self.actions, self.forgotten, self.forget_from)

    def warn(self, action: ActionState | None, message: str) -> None:
        """Log a warning and record it in the event log."""
        logger.warning("run %s: %s", self.name, message)
        self.log.event(EventKind.WARNING, action.name if action else None, message=message)

    # -- creating actions ----------------------------------------------------------

    def call(
        self, task: TaskSpec, parent: ActionState, args: tuple[Any, ...], kwargs: dict[str, Any]
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
        if self.stop is not None:
            raise RunStoppingError(
                f"run {self.name!r} is stopping: task {task.name!r} was not started"
            )
        inputs = encode_inputs(task, args, kwargs)  # SerializationError: no action
        parent.calls += 1
        # Only the key's last segment is kept (SPEC §6's whole key is the parent's
        # key followed by it), so a deep tree's keys do not grow with its depth.
        # Children of a later attempt of the same action get keys of their own.
        key = f"/{parent.calls}" if parent.attempt == 1 else f"@{parent.attempt}/{parent.calls}"
        recorded = None
        history = self.history
        if history is not None:
            recorded = history.match(history.key_of(parent) + key, task, inputs)
        handle = task._handle or task._make_handle()
        return handle(self, parent, task, args, kwargs, key, inputs, recorded)

    def _new(
        self,
        parent: ActionState | None,
        task: TaskSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str,
        inputs: bytes,
    ) -> ActionState:
        seq = self.started
        self.started = seq + 1
        action = ActionState(self, seq, parent, task, args, kwargs, key, None)
        action.group = current_group()
        action.inputs = inputs
        name = action.name
        self.actions[seq] = action
        self.live[name] = action
        action.queued_seq = self.log.routine(action.started_at, name, "QUEUED")
        self.log.changed(action)
        return action

    def new_root(
        self, task: TaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: bytes
    ) -> ActionState:
        """Create the root action `a0` and record that the run is running; spawn it next."""
        self.log.event(EventKind.RUN, None, RunPhase.RUNNING.value)
        self.root = self._new(None, task, args, kwargs, "a0", inputs)
        return self.root

    def replay(
        self, parent: ActionState, task: TaskSpec, key: str, inputs: bytes, output: bytes
    ) -> Any:
        """Record a call answered from history (or the cache) and return its output.

        The body does not run; the action goes from QUEUED to SUCCEEDED with
        `replayed=True`.
        """
        if self.closed:
            raise CancelledError
        limit = self.max_actions
        if limit is not None and self.started >= limit:
            raise over_limit(self, task, parent)
        value = decode_output(task, output)
        action = self._new(parent, task, (), {}, key, inputs)
        action.replayed = True
        action.output = output
        action.value = value
        self._finish(action, SUCCEEDED)
        return value

    async def cache_get(self, task: TaskSpec, inputs: bytes) -> bytes | None:
        """Look up a finished output of the same task version and inputs in the store."""
        recorder = self.log.recorder
        if recorder is None:
            return None
        return await recorder.cache_get(task.name, task_version(task), inputs_digest(inputs, task))

    # -- finishing actions ---------------------------------------------------------

    def _finish(self, action: ActionState, phase: ActionPhase) -> None:
        if action.phase not in _LIVE:
            return  # a zombie's body ending after it was given up on: already recorded
        action.timer = None
        action.ended_at = now = _time()
        # Any phase that is not terminal may end: recorded without the table check.
        action.phase = phase
        message = "cleanup incomplete" if action.cleanup_incomplete else None
        req = action.req
        log = self.log
        if req is not None or message is not None:
            log.transition(now, action.name, phase._value_, req, message)
        else:
            action.ended_seq = number = log.number()
            if log.streaming is not None:
                log.streaming.routine(number, now, action.name, phase._value_)
        if log.streaming is not None:
            log.streaming.changed(action, ACTION_ROWS)
        del self.live[action.name]
        # The action's inputs are not needed any more; drop them early so a long
        # run does not hold every argument it ever passed.
        action.args = ()
        if action.kwargs:
            action.kwargs = {}
        done = action.done
        if done is not None:
            if action.direct:
                settle(action, done)  # what `gather` holds: the call's outcome
            elif not done.done():
                done.set_result(None)
        if action is self.root:
            self.root_exited()
        if self.closed and not self.live and not self.drained.done():
            self.drained.set_result(None)

    def finish_succeeded(self, action: ActionState, value: Any) -> None:
        """Record the body's return value (an unrecordable one fails the action)."""
        if action.phase not in _LIVE:
            return
        try:
            action.output = encode_output(action.task, value)
        except SerializationError as exc:
            self.finish_failed(action, exc)
            return
        action.value = value
        recorder = self.log.recorder
        # Not one returned under a cancel (absorbed): that answers a run, not the inputs.
        cached = action.task.options.cache and action.req is None
        if cached and recorder is not None and action.inputs is not None:
            recorder.cache_put(
                action.task.name,
                task_version(action.task),
                inputs_digest(action.inputs, action.task),
                action.output,
            )
        self._finish(action, SUCCEEDED)

    def finish_failed(self, action: ActionState, exc: BaseException) -> None:
        """Record a body that raised `exc` (user code, or a cleanup that raised)."""
        if action.phase in _TERMINAL:
            return
        action.exc = exc
        action.error = describe(exc)
        self._finish(action, FAILED)
        if cleanup_raised(action.req, exc):
            self.warn(
                action,
                f"the cleanup of {action.name} ({action.task.name}) raised "
                f"{action.error[0]}: {action.error[1]}",
            )

    def finish_cancelled(self, action: ActionState) -> None:
        """Record a body that ended after (or because of) a cancellation."""
        if action.phase in _TERMINAL:
            return
        req = action.req
        if req is None:  # cancelled by workflow code (or it raised CancelledError itself)
            req = action.req = Request(CANCELLED, None, None, native=True)
        if req.cause in _PLAIN_CAUSES:
            self._finish(action, ABORTED)  # what `after_cancel` says, without its call
            return
        phase, exc = after_cancel(action)
        if exc is not None:
            action.exc = exc
            action.error = describe(exc)
        self._finish(action, phase)

    def finish_absorbed(self, action: ActionState, value: Any) -> None:
        """Record a body that caught workflow code's cancellation and returned `value`.

        As in asyncio, the value is the action's result (SUCCEEDED); a warning
        event says the cancel was absorbed.
        """
        if action.phase in _TERMINAL:
            return
        req = action.req
        assert req is not None
        self.warn(
            action,
            f"{action.name} ({action.task.name}) absorbed its cancellation "
            f"({req.cause.value}) and returned a value: recorded SUCCEEDED",
        )
        self.finish_succeeded(action, value)

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

    def interrupt(
        self,
        exc: BaseException,
        *,
        cause: AbortCause = SIGINT,
        reason: str,
        by: str | None = None,
    ) -> None:
        """Abort the run for Ctrl-C or a signal; `exc` leaves `flowsdk.run` once it is recorded."""
        if self.base_exc is None:
            self.base_exc = exc
        self.abort_run(cause, reason=reason, by=by)

    def lost(self, message: str) -> None:
        """The run can no longer be recorded: stop every body (cause `crashed`, `message` why)."""
        self.abort_run(AbortCause.CRASHED, reason=message)

    # -- attempts ------------------------------------------------------------------

    def on_timeout(self, action: ActionState) -> None:
        """Cancel an attempt that exceeded its task's timeout."""
        if action.req is None and action.phase not in _TERMINAL:
            action.req = Request(AbortCause.TIMEOUT, None, None)
            self.delivery.deliver(action)

    def on_deadline(self, action: ActionState) -> None:
        """Cancel the attempt running when the action's `deadline` passed; no retry follows."""
        action.deadline_at = 0.0  # passed, whatever the loop's clock resolution
        self.on_timeout(action)

    # -- lifetime and requests -----------------------------------------------------

    def _deliver_all(self, actions: Iterable[ActionState]) -> None:
        # Deepest-first is not needed for correctness (no SDK task awaits
        # another task), but reverse start order lets leaves start their
        # cleanup before the parents that wait on them.
        for action in sorted(actions, key=_START_ORDER, reverse=True):
            if action.phase not in _TERMINAL:
                self.delivery.deliver(action)

    def root_exited(self) -> None:
        """The root's body ended: close the run and cancel every descendant."""
        self.closed = True
        if self.tracker is not None:
            self.tracker.cancel_all()
        marked = []
        exited = Request(ROOT_EXIT, None, None)
        for action in list(self.live.values()):
            req = action.req
            if action.unreached():
                action.req = exited
                marked.append(action)
            elif req is not None and req.cause is CANCELLED and action.cancels == 1:
                # Cancelled by workflow code and cleaning up: the lifetime rule wins,
                # the root's exit interrupts that cleanup as a second cancel of its
                # caller does. (Cancelled just before the root returned, `t.cancel();
                # return`, it has not woken yet: its cleanup is not interrupted.)
                self.delivery.from_caller_again(action)
        self._deliver_all(marked)

    def abort_run(
        self, cause: AbortCause, *, reason: str | None = None, by: str | None = None
    ) -> None:
        """Abort the root with `cause` and its descendants with cause `ancestor`."""
        root = self.root
        if root is None or root.phase in _TERMINAL:
            return
        self.request_cancel([root], cause, reason, by)

    def request_cancel(
        self, targets: list[ActionState], cause: AbortCause, reason: str | None, by: str | None,
        at: float | None = None,
    ) -> None:  # fmt: skip
        """Request `cause` (asked `at`) for the live targets, `ancestor` for their descendants."""
        named = {t for t in targets if t.phase not in _TERMINAL}
        for target in named:
            if target.cause is not cause:
                # A named target's request replaces a collateral one: a child named
                # in the same instant as its parent is aborted in its own right.
                target.req = Request(cause, reason, by, at=at)
        affected = list(named)
        collateral = Request(ANCESTOR, None, None)
        for action in descendants(self.live.values(), named):
            if action.unreached():
                action.req = collateral
                affected.append(action)
        self._deliver_all(affected)

    def request_stop(
        self, mode: StopMode, reason: str | None, by: str | None, at: float | None = None
    ) -> None:
        """Stop the run: refuse new actions; with `abandon`, give up on those in progress."""
        asked = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
        self.stop = StopInfo(mode=mode, reason=reason, requested_by=by, requested_at=asked)
        if self.phase is RunPhase.RUNNING:
            self._set_run_phase(RunPhase.STOPPING, reason=reason, by=by)
        self._run_changed()
        if mode is StopMode.ABANDON:
            self.abandon_all(STOP, reason, by)

    def abandon_all(
        self, cause: AbortCause | None, reason: str | None = None, by: str | None = None
    ) -> None:
        """Give up on every action in progress: record it ABANDONED and stop waiting for it.

        `cause` is `stop` for a stop-and-abandon (asked when the stop was); `None`
        keeps each action's own cause (a second Ctrl-C during teardown).
        """
        self.closed = True
        asked = self.stop.requested_at.timestamp() if self.stop and cause is STOP else None
        stop = Request(cause, reason, by, at=asked) if cause is not None else None
        for action in sorted(self.live.values(), key=_START_ORDER, reverse=True):
            req = action.req
            if stop is not None:
                action.req = stop
            elif req is None or req.cause in (AbortCause.MARK_FAILED, AbortCause.TIMEOUT):
                action.req = Request(ANCESTOR, req.reason if req else None, req.by if req else None)
            # A body that had started is not waited for: its cleanup may never finish.
            action.cleanup_incomplete = action.phase is not QUEUED
            self._finish(action, ABANDONED)
            if action.cancels == 0:
                self.delivery.cancel_task(action)
        if not self.drained.done():
            self.drained.set_result(None)

    # -- end of the run ------------------------------------------------------------

    def end(self) -> None:
        """Record the run's terminal phase (after its teardown)."""
        if self.phase.terminal:
            return
        root = self.root
        assert root is not None
        self.ended_at = time.time()
        self._set_run_phase(final_phase(root, self.stop is not None))
        self._run_changed()

    def release(self) -> None:
        """Let go of the ended run's actions and recorder (its `Run` keeps its records).

        The runtime is in reference cycles, so what it holds waits for the garbage
        collector. Released (by `run` and `run_async`; a `start` handle still asks
        it), the actions are freed with the `Run`, by reference counting.
        """
        if self.root is not None:
            self.root.context = None  # no awaiter adopted it; it refers to the root
        self.root = None
        self.actions = {}
        self.delivery.drop_timers()
        self.log.recorder = self.log.streaming = None
