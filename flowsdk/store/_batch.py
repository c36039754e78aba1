"""What one transaction of a run's writer writes (`Batch`), and how its text is made writable.

Built on the writer's thread from the operations the loop queued (`_writer`),
then written by a `Dialect` in one transaction.
"""

from __future__ import annotations

from typing import Any

import msgspec

from flowsdk._records import ActionRow, EventRow, LogRow, ProgressRow, RunRecord
from flowsdk.store._rows import RoutineEvent

__all__ = ["Batch", "escape_text"]


class Batch:
    """The changes one transaction writes, grouped by table, in order."""

    __slots__ = ("actions", "cached", "events", "logs", "progress", "replies", "routine", "run")

    def __init__(self) -> None:
        self.actions: dict[str, ActionRow] = {}  # the latest row of each action wins
        # An action's routine events (kind ACTION, no cause, reason, by or message).
        self.routine: list[RoutineEvent] = []
        self.events: list[EventRow] = []
        self.progress: list[ProgressRow] = []
        self.logs: list[LogRow] = []
        self.run: RunRecord | None = None
        self.replies: list[tuple[int, bytes]] = []  # (request id, encoded ControlReply)
        self.cached: list[tuple[str, str, str, bytes, float]] = []


def _escaped(value: Any) -> Any:
    """Return `value` with each string that UTF-8 cannot hold made valid (escaped).

    Structs are copied with their strings escaped, tuples and lists item by item;
    anything else (numbers, bytes, enum members) is returned as it is.
    """
    if type(value) is str:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, msgspec.Struct):
        fields = {f: _escaped(getattr(value, f)) for f in value.__struct_fields__}
        return msgspec.structs.replace(value, **fields)
    if isinstance(value, tuple | list):
        return type(value)(_escaped(item) for item in value)
    return value


def escape_text(batch: Batch) -> None:
    """Make every string of `batch` one that UTF-8 can hold (rare: `RunWriter._flush`)."""
    batch.actions = {name: _escaped(row) for name, row in batch.actions.items()}
    batch.routine = _escaped(batch.routine)
    batch.events = _escaped(batch.events)
    batch.progress = _escaped(batch.progress)
    batch.logs = _escaped(batch.logs)
    batch.run = _escaped(batch.run)
    batch.cached = _escaped(batch.cached)
