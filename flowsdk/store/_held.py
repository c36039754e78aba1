"""What a run's loop holds back from its store's writer thread, and hands over once a round.

An action that changed is not turned into a row at once: the loop notes it and
holds the run's events, and builds one row of each changed action's latest state
when the writer asks for them (once a round) or before it sends the run's record
or a reply. An action that is queued, runs and ends within a round, as most
sequential calls do, costs one row instead of three. The held events go out
right after the rows, in order, so a reader that follows the events by cursor
never sees an event before the row of the action it names. A change is written
within two rounds when the writer keeps up (a burst, below, can add
`HELD_IN_BURST`). The writer asks again once it has taken the loop's last answer
from its queue, or after `HELD_WHILE_BEHIND`: a writer behind its queue (a wide
fan-out) lets the changes merge in the loop meanwhile, one row per action
instead of one per round, as rows it had asked for would wait behind its queue
anyway. And the loop answers an ask that finds it in a burst (more than `BURST`
callbacks ready: a wide fan-out starting or ending its children) once the burst
has passed, or `HELD_IN_BURST` later: a fan-out's children then get one row
each, not one while they start and another once they end.

A loop that has not answered for `LOOP_BLOCKED_WARNING` is blocked (a body
that computes without awaiting, or a very long step): the writer then builds
the held rows itself, once, and takes the events held before them, so that
the store still shows what the run did before the block (the body that
blocks shows RUNNING); it reads each action in one step
(`RowBuilder.build_at_once`). The loop sends those rows again when it runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from typing import Any

from flowsdk._records import EventRow
from flowsdk.store._base import RowBuilder
from flowsdk.store._rows import RoutineEvent

__all__ = ["EVENT", "LOOP_BLOCKED_WARNING", "HeldChanges"]

# The writer's operations are (kind, payload) pairs (the other kinds are the
# writer's own), except the commonest two, queued as they are, without a kind:
# an action's row (`ActionRow`) and a routine event (`RoutineEvent`). Neither
# is tracked by the garbage collector, and a pair would be: thousands of
# tracked pairs waiting in a wide fan-out's queue made the collector run more
# often, and further.
EVENT = 1
# Seconds a callback may wait for the loop before the loop counts as blocked: the
# writer warns, and sends what the loop holds.
LOOP_BLOCKED_WARNING = 1.0
# Seconds between two asks for the held changes while the writer has a queue to
# write: the changes of a busy run then merge in the loop instead of being
# written once per round.
HELD_WHILE_BEHIND = 1.0
# A loop with more callbacks than this ready to run is in a burst (a wide fan-out's
# step): the answer waits behind them, so that the actions the burst moves on get
# one row, not one before it and one after. It waits for at most `HELD_IN_BURST`
# seconds, counted from the first time it found the loop in a burst.
BURST = 256
HELD_IN_BURST = 0.25


class HeldChanges:
    """The loop's side of a run's writer: its operations, and what it holds back."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # The loop's queue of ready callbacks (asyncio's own loops), None if unknown.
        self._ready: collections.deque[Any] | None = getattr(loop, "_ready", None)
        self._burst_since: float | None = None  # when the answer first waited for a burst
        self._ops: collections.deque[Any] = collections.deque()
        self._held: dict[Any, RowBuilder] = {}
        # As operations: (EVENT, row), or a `RoutineEvent`. Taken, by the loop or
        # by the writer, under `_held_lock`; appended to without it (on the loop).
        # The loop waits for the lock only while the writer copies a blocked
        # loop's rows, once the loop has come back.
        self._held_events: collections.deque[Any] = collections.deque()
        self._held_lock = threading.Lock()
        # When the writer asked the loop for them, and whether it then built their
        # rows itself (both reset on the loop, when it sends them).
        self._held_asked: float | None = None
        self._held_last = 0.0  # when the writer last asked (monotonic)
        # How many operations of the queue, up to the end of the loop's last answer,
        # the writer has not taken yet (set by the loop, lowered by the writer: a
        # race only makes the writer ask a little early or late).
        self._answer_left = 0
        self._held_copied = False

    # -- on the loop ----------------------------------------------------------------

    def changed(self, action: Any, rows: RowBuilder) -> None:
        """Note that an action changed; its row is built when the held changes are sent."""
        self._held[action] = rows

    def routine(self, seq: int, at: float, action: str, phase: str) -> None:
        """Append a routine event; sent after the held rows."""
        self._held_events.append(RoutineEvent(seq, at, action, phase))

    def event(self, row: EventRow) -> None:
        """Append an event row; sent after the held rows."""
        self._held_events.append((EVENT, row))

    def _answer(self) -> None:
        """The writer's ask, on the loop: send what is held, after the burst under way."""
        ready = self._ready
        if ready is not None and len(ready) > BURST:
            now = time.monotonic()
            since = self._burst_since
            if since is None:
                self._burst_since = since = now
            if now - since < HELD_IN_BURST:
                self._loop.call_soon(self._answer)
                return
        self._send_held()

    def _send_held(self) -> None:
        """Build the rows of the actions that changed; queue them, then the events held."""
        with self._held_lock:
            self._held_asked = self._burst_since = None
            self._held_copied = False
            ops = self._ops
            held = self._held
            if held:
                self._held = {}
                for action, rows in held.items():
                    ops.append(rows.build(action))
            events = self._held_events
            if events:
                ops.extend(events)  # on the loop: nothing appends meanwhile
                events.clear()
            self._answer_left = len(ops)

    # -- on the writer's thread ---------------------------------------------------------

    def _ask_for_held(self) -> None:
        """Have the loop send what it holds (written next round); if it is blocked, send it."""
        if not (self._held or self._held_events):
            return
        asked = self._held_asked
        if asked is None:
            now = time.monotonic()
            if self._answer_left > 0 and now - self._held_last < HELD_WHILE_BEHIND:
                # Behind: rows sent now would wait behind the queue anyway, while
                # what the loop holds keeps merging (fewer rows per action).
                return
            self._held_asked = self._held_last = now
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is held
                self._loop.call_soon_threadsafe(self._answer)
        elif not self._held_copied and time.monotonic() - asked >= LOOP_BLOCKED_WARNING:
            with self._held_lock:
                self._held_copied = True
                events = self._held_events
                count = len(events)  # the events held before the rows are read
                ops = self._ops
                # `dict.copy()`, one snapshot: the loop may note changes meanwhile (a
                # long step of many actions), and iterating the dict itself allocates,
                # which on 3.11 can run a collection whose Python code lets the loop's
                # thread take the GIL in the middle ("dictionary changed size").
                for action, rows in self._held.copy().items():
                    ops.append(rows.build_at_once(action))
                for _ in range(count):
                    ops.append(events.popleft())
