"""Retention (`flowsdk prune`, SPEC §6): which runs go, and deleting them from a SQL store.

A run goes whole (every attempt, its actions, events and requests), and never
while it is live: the stores check again, inside the transaction that deletes,
that no attempt of it is running (a retry may have started since the runs
were listed). A SQLite file then gives the freed pages back to the file
system: new stores are created with `auto_vacuum = INCREMENTAL`, so
`PRAGMA incremental_vacuum` does it; a store created before that is converted
by one `VACUUM` at its first prune.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from datetime import datetime
from typing import Any

from flowsdk._records import RunRecord

__all__ = [
    "delete_runs_postgres",
    "delete_runs_sqlite",
    "file_size",
    "give_back_space",
    "prune_plan",
]

_UNFINISHED = ("QUEUED", "RUNNING", "STOPPING")
# Every table with rows of a run, and the column naming it: a pruned run leaves
# nothing behind (a new run of the same name would show what was left as its own).
_RUN_TABLES = (
    ("actions", "run"),
    ("events", "run"),
    ("routine_events", "run"),
    ("requests", "run"),
    ("progress", "run"),
    ("logs", "run"),
    ("runs", "name"),
)
_CHUNK = 400  # names per statement (SQLite limits bound parameters)
CHECKPOINT_WAIT = 5.0  # seconds a prune waits for another connection's checkpoint


def prune_plan(
    runs: list[RunRecord], *, before: datetime | None, keep: int | None
) -> tuple[list[RunRecord], list[RunRecord]]:
    """Split the runs a prune matches into (to delete, live), both newest first.

    `runs` are the latest attempts of the runs in scope (a `--phase` already
    applied), newest first. The `keep` newest are kept; of the rest, those
    that ended (or, live, started) before `before` match.
    """
    chosen = runs[keep:] if keep else list(runs)
    if before is not None:
        chosen = [r for r in chosen if (r.ended_at or r.started_at) < before]
    return [r for r in chosen if r.phase.terminal], [r for r in chosen if not r.phase.terminal]


def delete_runs_sqlite(conn: sqlite3.Connection, names: list[str]) -> tuple[set[str], int]:
    """Delete the named runs unless an attempt of one is live, in one write transaction.

    Returns the names deleted and how many attempts they had.
    """
    deleted: set[str] = set()
    attempts = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for i in range(0, len(names), _CHUNK):
            chunk = names[i : i + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            live = {
                r[0]
                for r in conn.execute(
                    f"SELECT DISTINCT name FROM runs WHERE name IN ({marks}) "
                    f"AND phase IN {_UNFINISHED}",
                    chunk,
                )
            }
            going = [n for n in chunk if n not in live]
            if not going:
                continue
            marks = ", ".join("?" * len(going))
            attempts += conn.execute(
                f"SELECT count(*) FROM runs WHERE name IN ({marks})", going
            ).fetchone()[0]
            for table, column in _RUN_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", going)
            deleted.update(going)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return deleted, attempts


def file_size(path: str) -> int:
    """The bytes a SQLite store takes: the file and its write-ahead log."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(path + suffix)
    return total


def give_back_space(
    conn: sqlite3.Connection, path: str, before: int, wait: float = CHECKPOINT_WAIT
) -> tuple[int, str | None]:
    """Return the freed pages of a SQLite store to the file system.

    `before` is the file's size (with its write-ahead log) before the prune.
    Returns the bytes given back and, if the file could not be compacted now
    (another process holds it), a note saying so: the space is then reused by
    new runs, and a later prune gives it back. A checkpoint that another
    connection is running (a live runner's, when it is idle) is waited for, up
    to `wait` seconds: SQLite answers busy at once then, without waiting itself.
    """
    note = None
    try:
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: INCREMENTAL
            # A store made before incremental vacuum: one VACUUM converts it.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("VACUUM")
        else:
            # Through sqlite3_exec, which steps the pragma until every free page is
            # gone (one `execute` would free a single page).
            conn.executescript("PRAGMA incremental_vacuum;")
        # In WAL mode the file shrinks when the log is written back into it.
        deadline = time.monotonic() + wait
        while conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:  # 1: busy
            if time.monotonic() >= deadline:
                note = (
                    "the file could not be compacted now (another process is copying its "
                    "write-ahead log); new runs reuse the freed space, and a later prune "
                    "gives it back"
                )
                break
            time.sleep(0.01)  # polls until the other checkpoint is over, up to the deadline
    except sqlite3.OperationalError as exc:
        note = (
            f"the file could not be compacted now ({exc}: another process is using it); "
            "new runs reuse the freed space, and a later prune gives it back"
        )
    return max(0, before - file_size(path)), note


def delete_runs_postgres(conn: Any, names: list[str]) -> tuple[set[str], int]:
    """Delete the named runs unless an attempt of one is live, in one transaction.

    The runs table is locked against new attempts (a retry starting) for the
    transaction's short life; PostgreSQL reuses the space itself (autovacuum).
    """
    with conn.transaction():
        conn.execute("LOCK TABLE flowsdk.runs IN SHARE ROW EXCLUSIVE MODE")
        live = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT name FROM flowsdk.runs WHERE name = ANY(%s) AND phase = ANY(%s)",
                (names, list(_UNFINISHED)),
            )
        }
        going = [n for n in names if n not in live]
        if not going:
            return set(), 0
        row = conn.execute(
            "SELECT count(*) FROM flowsdk.runs WHERE name = ANY(%s)", (going,)
        ).fetchone()
        for table, column in _RUN_TABLES:
            conn.execute(f"DELETE FROM flowsdk.{table} WHERE {column} = ANY(%s)", (going,))
    return set(going), int(row[0]) if row else 0
