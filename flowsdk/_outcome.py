"""What results from how an action ended: its terminal phase, and what its parent sees.

The rules of SPEC §1, in one place:

- once a cancellation requested by flowsdk has been delivered, the request
  decides the terminal phase, whatever the body returns (`after_cancel`): ABORTED
  with the request's cause, FAILED for mark-failed and timeouts, ABANDONED
  for a stop; only an exception raised by the cleanup itself makes it FAILED;
- except that a body may absorb workflow code's own asyncio cancellation
  (`absorbs`): it returns a value and, as in asyncio, that value is its result;
- what an awaiting parent gets (`outcome`): the value, `RuntimeUserError`
  whose `__cause__` is the body's exception (never wrapped twice), a
  `BaseException` other than `KeyboardInterrupt`/`SystemExit` unwrapped,
  `ActionAbortedError` for an operator's abort, else `CancelledError`;
- the run's terminal phase from its root and its stop request (`final_phase`).
"""

from __future__ import annotations

from asyncio import CancelledError, Future
from typing import Any

from flowsdk._action import ActionState, Request
from flowsdk._limit import limit_error
from flowsdk._phases import AbortCause, ActionPhase, RunPhase
from flowsdk.errors import (
    ActionAbortedError,
    ActionLimitExceededError,
    ActionMarkedFailedError,
    FlowError,
    RuntimeUserError,
    TaskTimeoutError,
)

__all__ = [
    "absorbs",
    "aborted_error",
    "after_cancel",
    "cleanup_raised",
    "final_phase",
    "interrupts",
    "outcome",
    "outcome_error",
    "settle",
]

SUCCEEDED, FAILED = ActionPhase.SUCCEEDED, ActionPhase.FAILED
ABORTED, ABANDONED = ActionPhase.ABORTED, ActionPhase.ABANDONED
EXTERNAL = AbortCause.EXTERNAL
# Constants: on Python 3.11 an Enum member read from its class costs a few hundred
# instructions, and `after_cancel` runs for every cancelled action.
CANCELLED, MARK_FAILED, TIMEOUT = AbortCause.CANCELLED, AbortCause.MARK_FAILED, AbortCause.TIMEOUT
STOP, ACTION_LIMIT = AbortCause.STOP, AbortCause.ACTION_LIMIT
_future_cancel = Future.cancel  # asyncio's own, past the instance's `cancel` hook


def absorbs(req: Request) -> bool:
    """Say whether a body that returns after `req` was delivered gives its value.

    Yes for workflow code's own cancellation (`t.cancel()`, `asyncio.timeout`,
    `wait_for`, a cancel reaching the awaiter), as in asyncio; never for an
    operator's request, the root's exit, a stop or a timeout.
    """
    return req.native


def interrupts(exc: BaseException | None) -> bool:
    """Say whether `exc` is an interrupt (`KeyboardInterrupt`, `SystemExit`): it aborts the run."""
    return isinstance(exc, KeyboardInterrupt | SystemExit)


def after_cancel(action: ActionState) -> tuple[ActionPhase, FlowError | None]:
    """Return the terminal phase of an action stopped by its request, and its error if FAILED."""
    req = action.req
    cause = req.cause if req is not None else CANCELLED
    if cause is MARK_FAILED:
        reason = req.reason if req is not None else None
        return FAILED, ActionMarkedFailedError(
            f"action {action.name} of run {action.run!r} was marked as failed"
            + (f": {reason}" if reason else ""),
            run=action.run,
            action=action.name,
            reason=reason,
        )
    if cause is TIMEOUT:
        return FAILED, timeout_error(action)
    if cause is ACTION_LIMIT:
        return FAILED, limit_error(action)
    if cause is STOP:
        return ABANDONED, None
    return ABORTED, None


def cleanup_raised(req: Request | None, exc: BaseException) -> bool:
    """Say whether a body that raised `exc` after `req` is a cleanup that raised (a warning).

    Not when the request makes the action FAILED anyway (mark-failed, a
    timeout), nor for the refusal of the body's own call past `max_actions`
    (the run's warning named it).
    """
    if req is None or req.cause is MARK_FAILED or req.cause is TIMEOUT:
        return False
    return not isinstance(exc, ActionLimitExceededError)


def timeout_error(action: ActionState) -> TaskTimeoutError:
    """Build the error of an action that exceeded its task's `timeout` or `deadline`."""
    options = action.task.options
    deadline_at = action.deadline_at
    if deadline_at is not None and deadline_at <= action.runtime.loop.time():
        seconds = options.deadline or 0.0
        what, cause = "deadline", f"the action took longer than {seconds:g} s in all"
    else:
        seconds = options.timeout or 0.0
        what, cause = "timeout", f"attempt took longer than {seconds:g} s"
    err = TaskTimeoutError(
        f"action {action.name} ({action.task.name}) of run {action.run!r} exceeded its "
        f"{what} of {seconds:g} s (attempt {action.attempt})",
        run=action.run,
        action=action.name,
    )
    err.__cause__ = TimeoutError(cause)
    return err


def outcome(action: ActionState) -> Any:
    """Return the value, or raise what an awaiting parent gets (SPEC §1)."""
    if action.phase is SUCCEEDED:
        return action.value
    error = outcome_error(action)
    if error is None:
        raise CancelledError
    try:
        raise error
    finally:
        del error  # this frame, in the traceback, must not keep the exception: a cycle


def outcome_error(action: ActionState) -> BaseException | None:
    """What an awaiting parent gets raised for an action that did not succeed.

    `None` stands for `CancelledError` (whose message is the awaiter's own).
    """
    phase = action.phase
    if phase is FAILED:
        exc = action.exc
        if isinstance(exc, RuntimeUserError) and not isinstance(exc, ActionMarkedFailedError):
            return exc  # never wrapped twice
        if exc is None or interrupts(exc):
            return None  # KeyboardInterrupt/SystemExit: the run is being aborted
        if not isinstance(exc, Exception):
            return exc  # another BaseException: unwrapped, as in asyncio
        error = action.error
        assert error is not None
        wrapped = RuntimeUserError(
            f"action {action.name} ({action.task.name}) of run {action.run!r} failed: "
            f"{error[0]}: {error[1]}",
            run=action.run,
            action=action.name,
            error_type=error[0],
            error_message=error[1],
            error_traceback=error[2],
        )
        wrapped.__cause__ = exc  # as `raise ... from exc`
        return wrapped
    if phase is ABORTED and action.cause is EXTERNAL:
        return aborted_error(action)
    return None


def settle(action: ActionState, done: Future[Any]) -> None:
    """Give the future of a call that `gather` awaits what its awaiter would get.

    Such a call has no handle (`start_gathered`): the action's future is what
    `gather` holds, so it ends as the handle's task would have: with the
    value, the error, or cancelled with the message of the cancel that the
    caller asked for (`ActionState.__call__` keeps it), as in asyncio. Built,
    not raised, the error keeps no frame of the runtime's.
    """
    action.done = action.context = None
    # `gather` holds the future to the end of the whole wait: it lets go of the action
    # now, as a finished task lets go of its coroutine (a done future cancels nothing).
    done.action = None  # type: ignore[attr-defined]
    if done.done():
        return  # a second cancel stopped gather's wait
    if action.phase is SUCCEEDED:
        value = action.value
        action.value = None  # handed over: the run keeps only its record
        done.set_result(value)
        return
    error = outcome_error(action)
    action.exc = None
    if error is None:
        _future_cancel(done, getattr(done, "asked", None))
    else:
        done.set_exception(error)


def aborted_error(action: ActionState) -> ActionAbortedError:
    """Build the `ActionAbortedError` an operator's abort of `action` produces."""
    req = action.req
    reason = req.reason if req is not None else None
    return ActionAbortedError(
        f"action {action.name} ({action.task.name}) of run {action.run!r} was aborted"
        + (f": {reason}" if reason else ""),
        run=action.run,
        action=action.name,
        reason=reason,
        cause=req.cause.value if req is not None else EXTERNAL.value,
    )


def final_phase(root: ActionState, stopped: bool) -> RunPhase:
    """Decide the run's terminal phase from its root and whether it was stopped."""
    if stopped:
        return RunPhase.STOPPED
    if root.phase is SUCCEEDED:
        return RunPhase.SUCCEEDED
    if root.phase is FAILED:
        exc = root.exc
        if isinstance(exc, ActionAbortedError) or interrupts(exc):
            return RunPhase.ABORTED
        if isinstance(exc, RuntimeUserError) and isinstance(exc.__cause__, ActionAbortedError):
            return RunPhase.ABORTED
        return RunPhase.FAILED
    if root.phase is ActionPhase.CRASHED:
        return RunPhase.CRASHED
    return RunPhase.ABORTED
