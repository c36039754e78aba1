"""A run whose runner is gone, as a reader that may not record it shows it (SPEC §5).

A reader that may not write the store (a SQLite file it may only read, a
PostgreSQL role with SELECT only) judges a gone runner's run as a writer's read
would record it, and records nothing: the run `CRASHED`, ended at the runner's
last heartbeat, and so its unfinished actions, each ended then but never before
it started (`mark_crashed` of each store). The store keeps what it judged as
`(run, attempt) -> last heartbeat` (epoch seconds); the event log gets no
judged entries: it is what was recorded.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from flowsdk._phases import ActionPhase, RunPhase
from flowsdk._records import ActionOutline, ActionRow, RunRecord

__all__ = ["Judged", "as_judged", "judged_outline", "judged_phase", "judged_rows"]

Judged = dict[tuple[str, int], float]
"""What a reader judged: `(run, attempt) -> the gone runner's last heartbeat`."""

_UNFINISHED = frozenset(p.value for p in ActionPhase if not p.terminal)
_CRASHED = ActionPhase.CRASHED.value


def as_judged(record: RunRecord, judged: Judged) -> RunRecord:
    """The record as a reader judges it: CRASHED at its last heartbeat if its runner is gone."""
    heartbeat = judged.get((record.name, record.attempt))
    if heartbeat is None or record.phase.terminal:
        return record
    return msgspec.structs.replace(
        record, phase=RunPhase.CRASHED, ended_at=datetime.fromtimestamp(heartbeat, UTC)
    )


def judged_rows(rows: list[ActionRow], gone_at: float | None) -> list[ActionRow]:
    """The rows as a reader judges them: unfinished ones CRASHED if the runner is gone.

    `gone_at` is the gone runner's last heartbeat (None: not judged gone). Each
    ends then, but never before it started, as `mark_crashed` records them.
    """
    if gone_at is None:
        return rows
    return [
        msgspec.structs.replace(r, phase=_CRASHED, ended_at=max(gone_at, r.started_at or gone_at))
        if r.phase in _UNFINISHED
        else r
        for r in rows
    ]


def judged_outline(found: list[ActionOutline], gone_at: float | None) -> list[ActionOutline]:
    """An outline as a reader judges it (`judged_rows`)."""
    if gone_at is None:
        return found
    return [
        ActionOutline(a.name, a.parent, _CRASHED) if a.phase in _UNFINISHED else a for a in found
    ]


def judged_phase(phase: str, gone_at: float | None) -> str:
    """One action's phase as a reader judges it (`judged_rows`)."""
    return _CRASHED if gone_at is not None and phase in _UNFINISHED else phase
