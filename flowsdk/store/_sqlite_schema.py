"""The SQLite store's file format: schema, migrations, encoders, row conversions, errors.

Shared by the store (`_sqlite.py`: reads, control requests, crash detection)
and the per-run writer (`_sqlite_run.py`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from flowsdk._liveness import Owner
from flowsdk._phases import RunPhase
from flowsdk._records import (
    ControlRequest,
    EventKind,
    RunRecord,
    StopInfo,
    StopMode,
    to_datetime,
)
from flowsdk.errors import (
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "ACTION_COLUMNS",
    "RUN_COLUMNS",
    "SCHEMA_VERSION",
    "mark_crashed",
    "run_record",
    "translate",
]

logger = logging.getLogger("flowsdk")

APPLICATION_ID = 0x466C6F77  # "Flow": marks the file as a flowsdk store
DEFAULT_BUSY_TIMEOUT = 5.0
POLL_INTERVAL = 0.01  # how often a runner looks for control requests (and flushes)
ANSWER_POLL = 0.005
MAX_BATCH = 4000  # changes written per transaction, at most
# Backpressure: past HIGH_WATER unwritten changes, new actions wait until the
# writer is back under LOW_WATER. A run cannot outrun its store without bound
# (memory, and the delay before a control request is answered).
HIGH_WATER = 20_000
LOW_WATER = 5_000
LOOP_BLOCKED_WARNING = 1.0  # seconds a callback may wait for the loop before we warn

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE runs (
            name TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            phase TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,
            task TEXT NOT NULL DEFAULT '',
            stop_mode TEXT, stop_reason TEXT, stop_by TEXT, stop_at REAL,
            owner BLOB,
            heartbeat REAL,
            root_spec BLOB,
            PRIMARY KEY (name, attempt)
        )""",
        "CREATE INDEX runs_started ON runs (started_at)",
        """CREATE TABLE actions (
            run TEXT NOT NULL,
            run_attempt INTEGER NOT NULL,
            name TEXT NOT NULL,
            seq INTEGER NOT NULL,
            parent TEXT,
            task TEXT NOT NULL,
            grp TEXT,
            phase TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            started_at REAL,
            ended_at REAL,
            error_type TEXT, error_message TEXT, error_traceback TEXT,
            abort_reason TEXT, abort_cause TEXT, abort_by TEXT, abort_at REAL,
            cleanup_incomplete INTEGER NOT NULL DEFAULT 0,
            key TEXT NOT NULL DEFAULT '',
            replayed INTEGER NOT NULL DEFAULT 0,
            inputs BLOB,
            output BLOB,
            PRIMARY KEY (run, run_attempt, name)
        )""",
        """CREATE TABLE events (
            run TEXT NOT NULL,
            run_attempt INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            action TEXT, phase TEXT, cause TEXT, reason TEXT, requested_by TEXT, message TEXT,
            PRIMARY KEY (run, run_attempt, seq)
        )""",
        """CREATE TABLE requests (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run TEXT NOT NULL,
            at REAL NOT NULL,
            body BLOB NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            answer BLOB,
            answered_at REAL
        )""",
        "CREATE INDEX requests_pending ON requests (run, state)",
        """CREATE TABLE cache (
            task TEXT NOT NULL,
            version TEXT NOT NULL,
            digest TEXT NOT NULL,
            output BLOB NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (task, version, digest)
        )""",
    ],
}
SCHEMA_VERSION = max(_MIGRATIONS)

_UNFINISHED = "('QUEUED', 'RUNNING', 'STOPPING')"
_request_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(ControlRequest)
_owner_decoder = msgspec.msgpack.Decoder(Owner)


class _Answer(msgspec.Struct, frozen=True):
    outcome: str
    phase: str
    message: str


_answer_decoder = msgspec.msgpack.Decoder(_Answer)

ACTION_COLUMNS = (
    "name, seq, parent, task, grp, phase, attempt, started_at, ended_at, "
    "error_type, error_message, error_traceback, abort_reason, abort_cause, abort_by, abort_at, "
    "cleanup_incomplete, key, replayed, inputs, output"
)
RUN_COLUMNS = (
    "name, attempt, phase, started_at, ended_at, task, stop_mode, stop_reason, stop_by, stop_at, "
    "owner, heartbeat"
)


def _ts(at: datetime | None) -> float | None:
    return None if at is None else at.timestamp()


@contextlib.contextmanager
def translate(path: str) -> Iterator[None]:
    """Turn sqlite3 errors into the store errors of SPEC §7, naming the file."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise StoreLockedError(
                f"the store {path} is locked by another process (waited for its busy timeout); "
                "try again when the other writer has finished"
            ) from None
        if "unable to open" in text or "disk I/O" in text or "readonly" in text:
            raise StoreError(f"the store {path} cannot be used: {text}") from None
        raise StoreCorruptedError(
            f"the store {path} is damaged ({text}); it was left untouched. Move it aside "
            "(or restore a backup) to start a new history"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise StoreCorruptedError(
            f"the store {path} is not a flowsdk store or is damaged ({exc}); it was left "
            "untouched. Move it aside (or restore a backup) to start a new history"
        ) from None


def mark_crashed(conn: sqlite3.Connection, name: str, attempt: int, now: float) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        phase = conn.execute(
            "SELECT phase FROM runs WHERE name = ? AND attempt = ?", (name, attempt)
        ).fetchone()[0]
        if RunPhase(phase).terminal:
            conn.execute("COMMIT")
            return
        seq = conn.execute(
            "SELECT coalesce(max(seq), -1) FROM events WHERE run = ? AND run_attempt = ?",
            (name, attempt),
        ).fetchone()[0]
        unfinished = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM actions WHERE run = ? AND run_attempt = ? "
                f"AND phase IN {_UNFINISHED} ORDER BY seq",
                (name, attempt),
            )
        ]
        conn.execute(
            "UPDATE actions SET phase = 'CRASHED', ended_at = ? WHERE run = ? AND run_attempt = ? "
            f"AND phase IN {_UNFINISHED}",
            (now, name, attempt),
        )
        rows = [
            (
                name,
                attempt,
                seq + 1 + i,
                now,
                EventKind.ACTION.value,
                action,
                "CRASHED",
                None,
                None,
                None,
                "runner gone",
            )
            for i, action in enumerate(unfinished)
        ]
        rows.append(
            (
                name,
                attempt,
                seq + 1 + len(unfinished),
                now,
                EventKind.RUN.value,
                None,
                "CRASHED",
                None,
                None,
                None,
                "runner gone",
            )
        )
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.execute(
            "UPDATE runs SET phase = 'CRASHED', ended_at = ? WHERE name = ? AND attempt = ?",
            (now, name, attempt),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    logger.warning("run %s: its runner is gone; recorded CRASHED", name)


def run_record(row: tuple[Any, ...]) -> RunRecord:
    name, attempt, phase, started, ended, task, mode, reason, by, at, _owner, _hb = row
    return RunRecord(
        name=name,
        phase=RunPhase(phase),
        started_at=datetime.fromtimestamp(started, UTC),
        ended_at=to_datetime(ended),
        attempt=attempt,
        stop=StopInfo(
            mode=StopMode(mode),
            reason=reason,
            requested_by=by,
            requested_at=datetime.fromtimestamp(at, UTC),
        )
        if mode
        else None,
        task=task,
    )
