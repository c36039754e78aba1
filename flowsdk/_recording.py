"""What a run records: its event log, and the stream of its changes to the store.

The runtime calls `RunLog` on every transition; it keeps the event log and hands
the run's recorder every event and every changed action (whose row the recorder
builds with `action_row`, when it sends it) when the recorder streams (SQLite,
PostgreSQL), only the run's record otherwise (memory, which takes the final
picture at the end). A routine transition of an action (QUEUED, its first
RUNNING, an ending with no request and no message), three in every action, is
not kept as an entry: the action keeps its number and time, and `rows` rebuilds
the entry when the log is read.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import TYPE_CHECKING, cast

import msgspec

from flowsdk._action import ActionState, Request
from flowsdk._phases import ActionPhase
from flowsdk._records import ActionRow, EventKind, EventRow, RunRecord
from flowsdk._tree import Forgotten

if TYPE_CHECKING:
    from flowsdk.store import RunRecorder

__all__ = ["ACTION_ROWS", "Finished", "RunLog", "action_row"]

RUNNING, SUCCEEDED = ActionPhase.RUNNING, ActionPhase.SUCCEEDED
ACTION_EVENT = EventKind.ACTION.value
_by_seq = attrgetter("seq")


class Finished(msgspec.Struct, array_like=True, gc=False):
    """A finished action of a run whose store keeps no rows (`memory://`), made compact.

    Its row and the numbers of its routine entries: only strings, numbers and
    bytes, so the garbage collector neither tracks nor walks it. A long run
    keeps these instead of its finished actions (`RunLog.compact`), and its
    collections no longer grow with the actions it went through.
    """

    row: ActionRow
    queued_seq: int | None
    running_seq: int | None
    running_at: float | None
    ended_seq: int | None


class RunLog:
    """A run's event log and its recorder."""

    __slots__ = ("events", "keep", "kept", "number", "recorder", "streaming")

    def __init__(self) -> None:
        self.events: list[EventRow] = []  # the entries kept, but the routine ones
        # Finished actions the run let go, compact (a store that keeps no rows).
        self.kept: list[Finished] = []
        # The next entry's number, kept or not. A routine transition only takes a
        # number: the action keeps it and its time (`rows` rebuilds the entry), and
        # the runtime streams it itself (`RunRecorder.routine`).
        self.number: Callable[[], int] = itertools.count().__next__
        # Whether entries are kept here too: always, unless the run spills (its
        # store streams every change and the run has grown past `KEEP_IN_MEMORY`).
        self.keep = True
        self.recorder: RunRecorder | None = None
        self.streaming: RunRecorder | None = None  # the recorder, if it wants every change

    def attach(self, recorder: RunRecorder) -> None:
        """Send the run's changes to `recorder` from now on."""
        self.recorder = recorder
        self.streaming = recorder if recorder.streams else None

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
        """Append one entry to the event log, now."""
        self.append(time.time(), kind.value, action, phase, cause, reason, requested_by, message)

    def append(
        self,
        at: float,
        kind: str,
        action: str | None,
        phase: str | None,
        cause: str | None,
        reason: str | None,
        by: str | None,
        message: str | None,
    ) -> None:
        """Append one entry (the per-action path: plain values, no keywords)."""
        row = EventRow(self.number(), at, kind, action, phase, cause, reason, by, message)
        if self.keep:
            self.events.append(row)
        if self.streaming is not None:
            self.streaming.event(row)

    def transition(
        self, at: float, action: str, phase: str, req: Request | None, message: str | None
    ) -> None:
        """Append an action's transition with its request (cause, reason, by) and message."""
        # `append`'s body, inline: a cancelled action records two of these.
        number = self.number()
        if req is not None:
            cause, reason = req.cause._value_, req.reason
            row = EventRow(number, at, ACTION_EVENT, action, phase, cause, reason, req.by, message)
        else:
            row = EventRow(number, at, ACTION_EVENT, action, phase, None, None, None, message)
        if self.keep:
            self.events.append(row)
        if self.streaming is not None:
            self.streaming.event(row)

    def routine(self, at: float, action: str, phase: str) -> int:
        """Number an action's routine transition, stream it, and return its number.

        The caller keeps the number (and the time) on the action: `rows`
        rebuilds the entry from them. (The per-action path does the same inline.)
        """
        number = self.number()
        if self.streaming is not None:
            self.streaming.routine(number, at, action, phase)
        return number

    def rows(self, actions: Iterable[ActionState]) -> list[EventRow]:
        """Return the event log in order: the kept entries and the routine ones of `actions`.

        The routine ones of the compact finished actions (`kept`) too.
        """
        rows = list(self.events)
        for action in actions:
            _add_routine(
                rows,
                action.name,
                (action.queued_seq, action.started_at, "QUEUED"),
                (action.running_seq, action.running_at, "RUNNING"),
                (action.ended_seq, action.ended_at, action.phase._value_),
            )
        for kept in self.kept:
            row = kept.row
            _add_routine(
                rows,
                row.name,
                (kept.queued_seq, row.started_at, "QUEUED"),
                (kept.running_seq, kept.running_at, "RUNNING"),
                (kept.ended_seq, row.ended_at, row.phase),
            )
        rows.sort(key=_by_seq)
        return rows

    def let_go(
        self,
        action: ActionState,
        actions: dict[int, ActionState],
        forgotten: Forgotten,
        keep: float,
    ) -> None:
        """Drop a finished action from `actions`: the store has its row, or this log.

        A store that streams every change has its row: the run spills, and the
        log keeps no entries any more (they are read back from the store).
        Otherwise (`memory://`) the log keeps it compact (`Finished`), once the
        run holds more than `keep` actions: a run that ends soon after (a
        fan-out of 10,000) would pay for it and gain nothing. `forgotten` keeps
        its phase and group for control requests.
        """
        streams = self.streaming is not None
        if streams and not forgotten.spilled:
            forgotten.spilled = True
            self.keep = False
        if (streams or len(actions) > keep) and actions.pop(action.seq, None) is not None:
            forgotten.add(action)
            if not streams:
                self.compact(action)

    def compact(self, action: ActionState) -> None:
        """Keep a finished action the run lets go as a `Finished` (its store keeps no rows)."""
        self.kept.append(
            Finished(
                action_row(action),
                action.queued_seq,
                action.running_seq,
                action.running_at,
                action.ended_seq,
            )
        )

    def action_rows(self, actions: Iterable[ActionState]) -> Iterable[ActionRow]:
        """The rows of `actions` and of the compact finished ones, in start order."""
        if not self.kept:
            return map(action_row, actions)
        return sorted([*(k.row for k in self.kept), *map(action_row, actions)], key=_by_seq)

    def payloads(
        self, actions: Iterable[ActionState]
    ) -> dict[str, tuple[bytes | None, bytes | None]]:
        """The recorded inputs and output of `actions` and of the compact finished ones."""
        found = {k.row.name: (k.row.inputs, k.row.output) for k in self.kept}
        found.update((a.name, (a.inputs, a.output)) for a in actions)
        return found

    def changed(self, action: ActionState) -> None:
        """Tell the store that the action changed (if it streams)."""
        if self.streaming is not None:
            self.streaming.changed(action, ACTION_ROWS)

    def run(self, record: RunRecord) -> None:
        """Send the run's current record to the store."""
        if self.recorder is not None:
            self.recorder.run(record)


def _routine_row(seq: int, at: float, action: str, phase: str) -> EventRow:
    return EventRow(seq, at, ACTION_EVENT, action, phase, None, None, None, None)


def _add_routine(
    rows: list[EventRow], action: str, *entries: tuple[int | None, float | None, str]
) -> None:
    """Append an action's routine entries that happened, `(number, time, phase)` each."""
    for seq, at, phase in entries:
        if seq is not None and at is not None:
            rows.append(_routine_row(seq, at, action, phase))


def action_row(action: ActionState) -> ActionRow:
    """Return the action's state as a row (on the loop; see `ACTION_ROWS` for other threads)."""
    error = action.error
    req = action.req
    phase = action.phase
    # A request is recorded once it stopped the action: `abort` is null otherwise.
    if req is not None and phase is not RUNNING and phase is not SUCCEEDED:
        reason, cause, by, at = req.reason, req.cause.value, req.by, req.at
    else:
        reason, cause, by, at = None, None, None, None
    parent = action.parent
    task = action.task
    return ActionRow(
        action.name,
        action.seq,
        parent.name if parent is not None else None,
        task.name,
        action.group,
        phase._value_,  # not `.value`: a Python-level property on 3.11
        action.attempt,
        action.started_at,
        action.ended_at,
        error[0] if error else None,
        error[1] if error else None,
        error[2] if error else None,
        reason,
        cause,
        by,
        at,
        action.cleanup_incomplete,
        action.key,
        action.replayed,
        action.inputs,
        action.output,
        task.options.runner.name,
    )


# What `action_row` reads of an action.
_ROW_FIELDS = (
    "name", "seq", "parent", "task", "group", "phase", "attempt", "started_at", "ended_at",
    "error", "req", "cleanup_incomplete", "key", "replayed", "inputs", "output",
)  # fmt: skip
_read_row_fields = attrgetter(*_ROW_FIELDS)


class _Copy:
    """The fields `action_row` reads, as one action had them at one instant."""

    __slots__ = _ROW_FIELDS


class _ActionRows:
    """How a streaming recorder builds an action's row (`store.RowBuilder`)."""

    __slots__ = ()

    build = staticmethod(action_row)

    @staticmethod
    def build_at_once(action: ActionState) -> ActionRow:
        """The row, from any thread: the action's fields are read in one C call.

        No other thread's Python code runs during that call, so the row is a
        state the action was in; every ending sets the terminal phase after
        what it records, so a terminal row is complete.
        """
        copy = _Copy()
        for field, value in zip(_ROW_FIELDS, _read_row_fields(action), strict=True):
            setattr(copy, field, value)
        return action_row(cast(ActionState, copy))


ACTION_ROWS = _ActionRows()
