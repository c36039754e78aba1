"""Between an action's attempts: timers, the retry decision, the backoff, the held start.

`run_action` (`_execute`) calls these: `start_timer` arms an attempt's `timeout`
(or its `deadline`), `retry` and `retry_after_timeout` decide whether a failed or
timed-out attempt gets another, `backoff` waits before it, and `held_back` keeps
a body from starting while the runner's heartbeat is older than `HOLD_AFTER`.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import CancelledError
from typing import TYPE_CHECKING

from flowsdk._action import ActionState, Request
from flowsdk._describe import describe
from flowsdk._phases import AbortCause, ActionPhase
from flowsdk._records import EventKind
from flowsdk.errors import (
    ActionAbortedError,
    ActionLimitExceededError,
    NondeterminismError,
    NonRecoverableError,
    RunClosedError,
    RunStoppingError,
)

if TYPE_CHECKING:
    from flowsdk._runtime import Runtime
    from flowsdk.store import RunRecorder

__all__ = [
    "MAX_BACKOFF",
    "backoff",
    "expired",
    "held_back",
    "retry",
    "retry_after_timeout",
    "start_timer",
]

RUNNING = ActionPhase.RUNNING
_time = time.time


async def held_back(rec: RunRecorder) -> float:
    """Wait, QUEUED, until the runner's heartbeat is renewed; return when the body starts.

    A runner whose heartbeat was last renewed more than `HOLD_AFTER` ago (paused,
    or its store locked) may have been taken for dead by another host and its run
    retried there: a body started now could do its work twice (SPEC §5). The
    writer renews the heartbeat at once, or finds the run recorded `CRASHED`, and
    then the run's bodies are cancelled: this one never starts.
    """
    while _time() > rec.lease_until:
        await rec.renewed()
    return _time()


def start_timer(runtime: Runtime, action: ActionState) -> asyncio.TimerHandle:
    """Arm the attempt's timer: its `timeout`, or the action's `deadline` if sooner."""
    loop = runtime.loop
    options = action.task.options
    timeout = options.driver_timeout
    deadline_at = action.deadline_at
    if deadline_at is None and options.deadline is not None:
        # The first attempt starts: the deadline counts from here, across attempts.
        action.deadline_at = deadline_at = loop.time() + options.deadline
    if deadline_at is not None and (timeout is None or deadline_at <= loop.time() + timeout):
        return loop.call_at(deadline_at, runtime.on_deadline, action)
    assert timeout is not None
    return loop.call_later(timeout, runtime.on_timeout, action)


def expired(runtime: Runtime, action: ActionState) -> bool:
    """Say whether the action's `deadline` has passed."""
    deadline_at = action.deadline_at
    return deadline_at is not None and runtime.loop.time() >= deadline_at


# Exceptions from a body that retries never answer: they are not the user's errors.
_NOT_RETRIED = (
    ActionAbortedError,
    ActionLimitExceededError,
    NondeterminismError,
    NonRecoverableError,
    RunStoppingError,
    RunClosedError,
)
MAX_BACKOFF = 60.0


def retry(runtime: Runtime, action: ActionState, exc: BaseException) -> bool:
    """Decide whether a failed attempt gets another one; record the failure if so.

    Only user errors are retried: not an abort reaching the body, nor a
    divergence from a retried run's history, nor a call refused because the
    run is stopping or closed or has reached its `max_actions`.
    """
    if not isinstance(exc, Exception) or isinstance(exc, _NOT_RETRIED):
        return False  # a BaseException fails its action at once, as it would in asyncio
    if not _another(runtime, action):
        return False
    error = describe(exc)
    _retrying(runtime, action, f"failed with {error[0]}: {error[1]}")
    return True


def retry_after_timeout(runtime: Runtime, action: ActionState) -> bool:
    """After a timed-out attempt, undo its cancel and decide whether to retry."""
    task = action.atask
    assert task is not None
    while action.cancels:
        task.uncancel()
        action.cancels -= 1
    action.timer = None
    if not _another(runtime, action):
        return False
    action.req = None
    _retrying(runtime, action, "timed out")
    return True


def _another(runtime: Runtime, action: ActionState) -> bool:
    """Whether the action may have another attempt: retries left, run open, deadline ahead."""
    return not (
        action.attempt > action.task.options.retries or runtime.closed or expired(runtime, action)
    )


def _retrying(runtime: Runtime, action: ActionState, what: str) -> None:
    """Record that the attempt ended (`what`) and another follows."""
    message = f"attempt {action.attempt} {what}; retrying"
    runtime.log.event(EventKind.ACTION, action.name, RUNNING.value, message=message)


async def backoff(runtime: Runtime, action: ActionState) -> bool:
    """Wait before the next attempt; return False if cancelled meanwhile (recorded)."""
    options = action.task.options
    delay = min(options.backoff * 2 ** (action.attempt - 1), MAX_BACKOFF)
    deadline_at = action.deadline_at
    if deadline_at is not None:
        delay = max(0.0, min(delay, deadline_at - runtime.loop.time()))
    try:
        await asyncio.sleep(delay)
        rec = runtime.log.streaming
        if rec is not None and _time() > rec.lease_until:
            await held_back(rec)  # the next attempt is a body started anew
    except CancelledError:
        runtime.finish_cancelled(action)
        return False
    if expired(runtime, action):
        # The deadline passed while waiting: no further attempt starts.
        action.req = Request(AbortCause.TIMEOUT, None, None)
        runtime.finish_cancelled(action)
        return False
    action.attempt += 1
    action.calls = 0  # the new attempt's children are counted afresh (their keys differ)
    runtime.log.changed(action)
    runtime.log.event(
        EventKind.ACTION, action.name, RUNNING.value, message=f"attempt {action.attempt}"
    )
    return True
