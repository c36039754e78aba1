"""A run whose runner is gone, as a reader that may not record it shows it (SPEC §5).

A reader that may not write the store (a SQLite file it may only read, a
PostgreSQL role with SELECT only) judges a gone runner's run as a writer's read
would record it, and records nothing: the run `CRASHED`, its unfinished actions
`CRASHED` too, each ended at the runner's last heartbeat but never before it
started, and the run ended then, or at the latest time one of its actions
started or ended (`mark_crashed` of each store). The event log gets no judged
entries: it is what was recorded.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from flowsdk._phases import ActionPhase, RunPhase
from flowsdk._records import ActionOutline, ActionRow, RunRecord

__all__ = ["Judged"]

_UNFINISHED = frozenset(p.value for p in ActionPhase if not p.terminal)
_CRASHED = ActionPhase.CRASHED.value


class Judged:
    """The runs a reader judged gone: `(run, attempt) -> (last heartbeat, the run's end)`.

    Each view of such a run is passed through it: the run's record, its action
    rows, its outline, one action's phase. A run recorded as ended meanwhile
    (its owner's read recorded it) is shown as recorded.
    """

    __slots__ = ("gone",)

    def __init__(self) -> None:
        self.gone: dict[tuple[str, int], tuple[float, float]] = {}

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.gone

    def note(self, name: str, attempt: int, heartbeat: float, end: float | None) -> None:
        """Judge the attempt gone: its runner's last heartbeat, its latest action time."""
        self.gone[name, attempt] = (heartbeat, heartbeat if end is None else max(heartbeat, end))

    def record(self, record: RunRecord) -> RunRecord:
        """The run's record as judged: CRASHED, ended as `mark_crashed` would end it."""
        found = self.gone.get((record.name, record.attempt))
        if found is None or record.phase.terminal:
            return record
        return msgspec.structs.replace(
            record, phase=RunPhase.CRASHED, ended_at=datetime.fromtimestamp(found[1], UTC)
        )

    def rows(self, name: str, attempt: int, rows: list[ActionRow]) -> list[ActionRow]:
        """The attempt's action rows as judged: the unfinished ones CRASHED."""
        found = self.gone.get((name, attempt))
        if found is None:
            return rows
        heartbeat = found[0]
        return [
            msgspec.structs.replace(
                r, phase=_CRASHED, ended_at=max(heartbeat, r.started_at or heartbeat)
            )
            if r.phase in _UNFINISHED
            else r
            for r in rows
        ]

    def outline(self, name: str, attempt: int, found: list[ActionOutline]) -> list[ActionOutline]:
        """The attempt's outline as judged (`rows`)."""
        if (name, attempt) not in self.gone:
            return found
        return [
            ActionOutline(a.name, a.parent, _CRASHED) if a.phase in _UNFINISHED else a
            for a in found
        ]

    def phase(self, name: str, attempt: int, phase: str) -> str:
        """One of the attempt's phases (an action's, or the run's) as judged."""
        if (name, attempt) in self.gone and phase in _UNFINISHED:
            return _CRASHED
        return phase
