"""Reading a SQLite store this process cannot write (SPEC §5: readers with read-only access).

A user with read permission only, or a store on a read-only mount, can list
and show runs. The file is opened with `mode=ro`: SQLite then reads the
write-ahead log through the `-shm` index when that file exists (a runner is
live, or was). When the index does not exist and cannot be created (the
folder is not writable), the file is opened `immutable=1`: what the log holds
and was not yet copied into the file is not seen, so a live run may look a
little behind. Nothing is ever written: a run whose runner is gone is shown
`CRASHED` as judged, without recording it, and so are its unfinished actions,
as a writer would record them (`mark_crashed`).
"""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from urllib.parse import quote

import msgspec

from flowsdk._phases import ActionPhase, RunPhase
from flowsdk._records import ActionOutline, ActionRow, RunRecord

__all__ = [
    "as_judged",
    "cannot_write",
    "judged_outline",
    "judged_phase",
    "judged_rows",
    "open_read_only",
]

_UNFINISHED = frozenset(p.value for p in ActionPhase if not p.terminal)
_CRASHED = ActionPhase.CRASHED.value


def cannot_write(path: str) -> bool:
    """Whether this process cannot write the store file or create files next to it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.access(path, os.W_OK) or not os.access(folder, os.W_OK | os.X_OK):
        return True
    try:
        return os.statvfs(path).f_flag & os.ST_RDONLY != 0
    except OSError:
        return False


def open_read_only(path: str, busy_timeout: float) -> sqlite3.Connection:
    """Open the store for reading only: `mode=ro`, else `immutable=1` (see the module)."""
    base = "file:" + quote(os.path.abspath(path))
    for query in ("mode=ro", "mode=ro&immutable=1"):
        conn = sqlite3.connect(
            f"{base}?{query}",
            uri=True,
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            conn.close()
            if query.endswith("immutable=1"):
                raise
            continue
        return conn
    raise AssertionError("unreachable")


def as_judged(record: RunRecord, judged: dict[tuple[str, int], float]) -> RunRecord:
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
