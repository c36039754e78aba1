"""How a cancellation reaches a body: delivery, the grace period, escalation, abandon.

Once a request is set on an action (`ActionState.req`), `Delivery.deliver`
cancels the action's task through its executor, with a message that names the
cause, the requester and the reason. A body still running `grace_period`
seconds later is cancelled a second time (its cleanup is interrupted and it
is recorded `cleanup_incomplete=true`); one that ignores that too is, after
`ABANDON_AFTER` more seconds, recorded as ended and no longer waited for (a
*zombie*).

Timers due in the same `TIMER_RESOLUTION` share one loop handle, so
cancelling 1,000 children costs one timer, not 1,000.

A cancel of the task awaiting an action (`t.cancel()`, a parent's timeout) is
turned into the action's request here too (`from_caller`); for a caller that
is a task of its own, at once, by the future it waits on (`ActionState.__call__`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Protocol

from flowsdk._action import ActionState, Request
from flowsdk._describe import format_stack
from flowsdk._phases import AbortCause, ActionPhase
from flowsdk.executors import LOCAL

__all__ = ["ABANDON_AFTER", "TIMER_RESOLUTION", "Delivery"]

# After the second cancel, how long a body may still run before it is recorded
# with cleanup_incomplete=True and no longer waited for.
ABANDON_AFTER = 1.0
TIMER_RESOLUTION = 0.01  # grace and abandon deadlines are rounded up to this (seconds)

QUEUED, RUNNING, STOPPING = ActionPhase.QUEUED, ActionPhase.RUNNING, ActionPhase.STOPPING
CANCELLED, ANCESTOR, TIMEOUT = AbortCause.CANCELLED, AbortCause.ANCESTOR, AbortCause.TIMEOUT
_TERMINAL = tuple(p for p in ActionPhase if p.terminal)  # a tuple: `in` compares identity first

TimerKey = tuple[int, Callable[[ActionState], None]]


class Owner(Protocol):
    """What delivery needs from the runtime: record phases, finish actions, warn."""

    def set_phase(self, action: ActionState, phase: ActionPhase, checked: bool = True) -> None:
        """Record an action's new (live) phase."""

    def finish_cancelled(self, action: ActionState) -> None:
        """Record an action that ended after (or because of) its request."""

    def warn(self, action: ActionState | None, message: str) -> None:
        """Log a warning and record it in the event log."""


class Delivery:
    """Delivers cancellations to a run's bodies and escalates when they ignore them."""

    def __init__(self, owner: Owner, loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner
        self._loop = loop
        self._timers: dict[TimerKey, list[ActionState]] = {}
        # The timer `later` set last, and its actions: a cancelled fan-out's actions
        # share it, with no key to build and look up for each.
        self._last: TimerKey | None = None
        self._last_bucket: list[ActionState] = []
        self._on_grace = self._grace  # bound once: every delivery passes it
        self._cancelling = False  # in `cancel_task`: a caller's cancel it causes waits a step
        self.zombies: list[ActionState] = []
        """Bodies that ignored two cancellations: recorded as ended, still running."""

    def from_caller(self, action: ActionState, reason: str | None = None) -> None:
        """The task awaiting `action` was cancelled (with `reason`, if any): cancel the action.

        Only this action: as in asyncio, the cancel reaches its descendants
        through the awaits it is in (they record cause `ancestor`), and a child
        behind `asyncio.shield` keeps running. A caller's cancel caused by
        cancelling another action's task (a chain of tasks, each awaiting the
        next) is delivered on the loop's next step, so that a long chain is
        cancelled in a flat loop, never by recursion.
        """
        if action.req is not None:
            return
        parent = action.parent
        ancestor = parent is not None and parent.req is not None
        action.req = Request(ANCESTOR if ancestor else CANCELLED, reason, None, native=True)
        if self._cancelling:
            self._loop.call_soon(self._deliver_first, action)
        else:
            self.deliver(action)

    def from_caller_again(self, action: ActionState) -> bool:
        """The task awaiting `action` was cancelled again; return whether it goes on waiting.

        As in asyncio, where a later cancel of the awaiting task is thrown into
        the coroutine it awaits: when the caller's own first cancel began the
        action's cleanup (cause `cancelled`), this one interrupts that cleanup
        (the first time by `escalate`: `cleanup_incomplete`, and the abandon
        timer bounds the wait), and the caller waits for the action's end. A
        cancel the body has not woken from yet is the same one. Under any other
        request the action's own grace period rules, and the caller stops
        waiting. The root's exit interrupts such a cleanup the same way
        (`Runtime.root_exited`).
        """
        req = action.req
        if req is None or req.cause is not CANCELLED or action.phase in _TERMINAL:
            return False
        if not action.cancel_pending():
            if action.cancels == 1:
                self.escalate(action)
            else:
                self.cancel_task(action)
        return True

    def _deliver_first(self, action: ActionState) -> None:
        if action.cancels == 0 and action.phase not in _TERMINAL:
            self.deliver(action)

    def deliver(self, action: ActionState) -> None:
        """Deliver the first cancel of the action's request to its body."""
        if action.phase is QUEUED:
            # Its body has not started: it never will. Cancelling the task
            # before its first step closes the coroutine without running it.
            self._owner.finish_cancelled(action)
            assert action.atask is not None
            action.atask.cancel()
            return
        req = action.req
        if action.phase is RUNNING and (req is None or req.cause is not TIMEOUT):
            self._owner.set_phase(action, STOPPING, checked=False)
        if action.cancels == 0:
            self.cancel_task(action)
            self.later(action, action.task.options.grace_period, self._on_grace)

    def cancel_task(self, action: ActionState) -> None:
        """Cancel the action's task through its executor, with the request's message."""
        task = action.atask
        assert task is not None
        if not task.done():
            action.cancels += 1
            req = action.req
            message = req.message() if req is not None else "flowsdk: cancelled"
            cancelling, self._cancelling = self._cancelling, True
            try:
                runner = action.task.options.runner
                if runner is LOCAL:
                    task.cancel(message)  # the local executor's cancel, inlined
                else:
                    runner.cancel(task, message)
            finally:
                self._cancelling = cancelling

    def later(
        self, action: ActionState, delay: float, callback: Callable[[ActionState], None]
    ) -> None:
        """Call `callback(action)` in about `delay` seconds, replacing its pending timer.

        Clearing `action.timer` cancels it.
        """
        slot = math.ceil((self._loop.time() + delay) / TIMER_RESOLUTION)
        key = self._last
        if key is not None and key[0] == slot and key[1] is callback:
            bucket = self._last_bucket
        else:
            key = (slot, callback)
            found = self._timers.get(key)
            if found is None:
                found = self._timers[key] = []
                self._loop.call_at(slot * TIMER_RESOLUTION, self._fire, key)
            bucket = found
            self._last, self._last_bucket = key, bucket
        bucket.append(action)
        action.timer = key

    def drop_timers(self) -> None:
        """Forget the pending grace and abandon timers: the run has ended, they have nothing to do.

        Each holds the actions it was set for, ended since; the loop's handles
        of those timers find nothing when they fire.
        """
        self._timers.clear()
        self._last, self._last_bucket = None, []

    def _fire(self, key: TimerKey) -> None:
        _, callback = key
        if key == self._last:
            self._last, self._last_bucket = None, []  # gone: the next timer gets a new one
        for action in self._timers.pop(key, ()):
            if action.timer == key:  # not cleared or replaced since
                action.timer = None
                callback(action)

    def _grace(self, action: ActionState) -> None:
        """The grace period is over: cancel the body again, then give it one more second."""
        action.timer = None
        if action.phase in _TERMINAL:
            return
        stack = format_stack(action.atask)
        self._owner.warn(
            action,
            f"action {action.name} ({action.task.name}) is still running "
            f"{action.task.options.grace_period:g} s after it was cancelled; cancelling it again. "
            f"It is at:\n{stack}",
        )
        self.escalate(action)

    def escalate(self, action: ActionState) -> None:
        """Deliver the second (and last) cancel; give the body `ABANDON_AFTER` more."""
        # The second cancel interrupts whatever cleanup was running.
        action.cleanup_incomplete = True
        self.cancel_task(action)
        self.later(action, ABANDON_AFTER, self._on_abandon)

    def _on_abandon(self, action: ActionState) -> None:
        """The body ignored two cancels: record it and stop waiting for it."""
        action.timer = None
        if action.phase in _TERMINAL:
            return
        action.cleanup_incomplete = True
        self.zombies.append(action)
        self._owner.warn(
            action,
            f"action {action.name} ({action.task.name}) ignored cancellation; it is recorded "
            "with cleanup_incomplete=true and no longer waited for",
        )
        self._owner.finish_cancelled(action)
