"""The SQLite store's file format: schema, migrations, encoders, row conversions, errors.

Shared by the store (`_sqlite.py`: reads, control requests, crash detection)
and the per-run writer (`_sqlite_run.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import stat
from collections.abc import Iterator
from datetime import datetime

import msgspec

from flowsdk._liveness import Owner
from flowsdk._phases import RunPhase
from flowsdk._records import (
    EVENT_FIELDS,
    ControlReply,
    EventKind,
)
from flowsdk.errors import (
    PermissionDeniedError,
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
)
from flowsdk.store._location import cannot_create
from flowsdk.store._rows import ACTION_COLUMNS, EVENT_COLUMNS, RUN_COLUMNS, run_record
from flowsdk.store._trace_sql import table_statements

__all__ = [
    "ACTION_COLUMNS",
    "APPLICATION_ID",
    "ACTION_EVENTS",
    "EVENTS_AFTER",
    "EVENT_COLUMNS",
    "INSERT_EVENT",
    "INSERT_ROUTINE_PACK",
    "LAST_SEQ",
    "MIGRATIONS",
    "RUN_COLUMNS",
    "SCHEMA_VERSION",
    "create_store",
    "mark_crashed",
    "migrate",
    "owner_decoder",
    "reply_decoder",
    "request_encoder",
    "rollback",
    "run_record",
    "translate",
    "ts",
    "warn_if_others_can_write",
]

logger = logging.getLogger("flowsdk")

APPLICATION_ID = 0x466C6F77  # "Flow": marks the file as a flowsdk store
ANSWER_POLL = 0.005  # how often a requester looks for the runner's reply

# The column definitions of actions and events as schema 1 created them (the
# first migration and the seventh, which rebuilds both tables, share them).
# Frozen: a later column is added by a later migration, never here.
_ACTION_COLUMNS_V1 = """
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
"""
_EVENT_COLUMNS_V1 = """
            run TEXT NOT NULL,
            run_attempt INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            action TEXT, phase TEXT, cause TEXT, reason TEXT, requested_by TEXT, message TEXT,
"""

# The columns of actions and events at schema 7, in their order then (later
# migrations may add columns: these lists stay as they were).
_ACTIONS_V7 = (
    "run, run_attempt, name, seq, parent, task, grp, phase, attempt, started_at, ended_at, "
    "error_type, error_message, error_traceback, abort_reason, abort_cause, abort_by, abort_at, "
    "cleanup_incomplete, key, replayed, inputs, output, executor"
)
_EVENTS_V7 = "run, run_attempt, seq, at, kind, action, phase, cause, reason, requested_by, message"

MIGRATIONS: dict[int, list[str]] = {
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
        f"CREATE TABLE actions ({_ACTION_COLUMNS_V1} PRIMARY KEY (run, run_attempt, name))",
        f"CREATE TABLE events ({_EVENT_COLUMNS_V1} PRIMARY KEY (run, run_attempt, seq))",
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
    # The working directory a run was started in: a detached retry runs there.
    2: ["ALTER TABLE runs ADD COLUMN workdir TEXT NOT NULL DEFAULT ''"],
    # The console's tokens (SPEC §8): the SHA-256 of the secret, never the secret.
    3: [
        """CREATE TABLE tokens (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            digest TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_used_at REAL,
            revoked_at REAL
        )"""
    ],
    # Progress reports and captured log records of actions (SPEC §2).
    4: table_statements("", "REAL"),
    # Where each action's body ran (SPEC §4, §9): "local" or "ray".
    5: ["ALTER TABLE actions ADD COLUMN executor TEXT NOT NULL DEFAULT 'local'"],
    # Keys keep only their last segment (the whole key is rebuilt from the parent
    # chain on reading), so a deep tree's store does not grow with the square of
    # its depth. Computed from the old keys before any is changed.
    6: [
        """CREATE TEMP TABLE key_segments (
            run TEXT NOT NULL, run_attempt INTEGER NOT NULL, name TEXT NOT NULL,
            segment TEXT NOT NULL, PRIMARY KEY (run, run_attempt, name)
        )""",
        """INSERT INTO key_segments
            SELECT c.run, c.run_attempt, c.name, substr(c.key, length(p.key) + 1)
            FROM actions c JOIN actions p
              ON p.run = c.run AND p.run_attempt = c.run_attempt AND p.name = c.parent
            WHERE substr(c.key, 1, length(p.key)) = p.key""",
        """UPDATE actions SET key = (
                SELECT segment FROM key_segments s WHERE s.run = actions.run
                AND s.run_attempt = actions.run_attempt AND s.name = actions.name)
            WHERE parent IS NOT NULL AND EXISTS (
                SELECT 1 FROM key_segments s WHERE s.run = actions.run
                AND s.run_attempt = actions.run_attempt AND s.name = actions.name)""",
        "DROP TABLE key_segments",
    ],
    # Actions and events are kept in their primary key's order (`WITHOUT ROWID`):
    # one B-tree per table instead of a table and its key's index, so each row
    # written costs one insert, not two, and takes less room.
    7: [
        f"CREATE TABLE actions_keyed ({_ACTION_COLUMNS_V1} "
        "executor TEXT NOT NULL DEFAULT 'local', "
        "PRIMARY KEY (run, run_attempt, name)) WITHOUT ROWID",
        f"INSERT INTO actions_keyed SELECT {_ACTIONS_V7} FROM actions",
        "DROP TABLE actions",
        "ALTER TABLE actions_keyed RENAME TO actions",
        f"CREATE TABLE events_keyed ({_EVENT_COLUMNS_V1} "
        "PRIMARY KEY (run, run_attempt, seq)) WITHOUT ROWID",
        f"INSERT INTO events_keyed SELECT {_EVENTS_V7} FROM events",
        "DROP TABLE events",
        "ALTER TABLE events_keyed RENAME TO events",
    ],
    # The routine events of one write, packed into one row keyed by the last
    # `seq` in it (`_rows.pack_routine`): a third of the bytes of a row each, and
    # one insert per write instead of three per action. A store's older routine
    # rows stay in `events`; readers take both.
    8: [
        "CREATE TABLE routine_events (run TEXT NOT NULL, run_attempt INTEGER NOT NULL, "
        "last_seq INTEGER NOT NULL, packed BLOB NOT NULL, "
        "PRIMARY KEY (run, run_attempt, last_seq)) WITHOUT ROWID",
    ],
    # A NaN report is kept, as NULL. SQLite stores any NaN it is given as NULL (no
    # REAL can hold one), so `value REAL NOT NULL` made `INSERT OR IGNORE` drop
    # the report without a word. NULL is then the only way a NaN can be stored,
    # and a report's value is never None otherwise: the writes stay as they were,
    # and readers turn NULL back into NaN (`_trace_sql`). Infinities are REALs.
    # SQLite cannot drop a NOT NULL: the table is rebuilt, its rows kept.
    9: [
        """CREATE TABLE progress_nan (
            run TEXT NOT NULL,
            run_attempt INTEGER NOT NULL,
            action TEXT NOT NULL,
            n INTEGER NOT NULL,
            at REAL NOT NULL,
            name TEXT NOT NULL,
            step BIGINT,
            value REAL,
            PRIMARY KEY (run, run_attempt, action, n)
        )""",
        "INSERT INTO progress_nan SELECT run, run_attempt, action, n, at, name, step, value "
        "FROM progress",
        "DROP TABLE progress",
        "ALTER TABLE progress_nan RENAME TO progress",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)

_UNFINISHED = "('QUEUED', 'RUNNING', 'STOPPING')"
request_encoder = msgspec.msgpack.Encoder()
reply_decoder = msgspec.msgpack.Decoder(ControlReply)
owner_decoder = msgspec.msgpack.Decoder(Owner)


INSERT_EVENT = (
    f"INSERT INTO events (run, run_attempt, {EVENT_COLUMNS}) "
    f"VALUES ({', '.join('?' * (2 + len(EVENT_FIELDS)))})"
)
INSERT_ROUTINE_PACK = (
    "INSERT INTO routine_events (run, run_attempt, last_seq, packed) VALUES (?, ?, ?, ?)"
)
# The last `seq` of an attempt's event log (-1 when empty), in rows and in packs;
# named parameters (a mapping): run, attempt.
LAST_SEQ = (
    "SELECT max("
    "coalesce((SELECT max(seq) FROM events WHERE run = :run AND run_attempt = :attempt), -1), "
    "coalesce((SELECT max(last_seq) FROM routine_events "
    "WHERE run = :run AND run_attempt = :attempt), -1))"
)
# An attempt's events after a cursor, rows and packs in one statement (one
# snapshot: a write committed between two reads could put a pack's events before
# the rows of the same write); named parameters: run, attempt, cursor.
# `_rows.with_routine` unpacks and orders them.
EVENTS_AFTER = (
    f"SELECT {EVENT_COLUMNS}, NULL FROM events "
    "WHERE run = :run AND run_attempt = :attempt AND seq > :cursor "
    f"UNION ALL SELECT last_seq, {', '.join(['NULL'] * (len(EVENT_FIELDS) - 1))}, packed "
    "FROM routine_events WHERE run = :run AND run_attempt = :attempt AND last_seq > :cursor"
)

# The events of one action (named params run, attempt, action, needle: `routine_needle`):
# its own rows, and the packs its name occurs in (`of_action` keeps its events of them).
ACTION_EVENTS = (
    f"SELECT {EVENT_COLUMNS}, NULL FROM events "
    "WHERE run = :run AND run_attempt = :attempt AND action = :action "
    f"UNION ALL SELECT last_seq, {', '.join(['NULL'] * (len(EVENT_FIELDS) - 1))}, packed "
    "FROM routine_events WHERE run = :run AND run_attempt = :attempt "
    "AND instr(packed, :needle) > 0"
)


def ts(at: datetime | None) -> float | None:
    """Turn an aware datetime into epoch seconds (how times are stored)."""
    return None if at is None else at.timestamp()


@contextlib.contextmanager
def translate(path: str) -> Iterator[None]:
    """Turn sqlite3 errors into the store errors of SPEC §7, naming the file."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise  # a constraint the caller expects (a run name taken): not damage
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise StoreLockedError(
                f"the store {path} is locked by another process (waited for its busy timeout); "
                "try again when the other writer has finished"
            ) from None
        if "readonly" in text:
            raise PermissionDeniedError(
                f"the store {path} cannot be written by this user ({text}); ask its owner, "
                "or point --store (or FLOWSDK_STORE) at a store you may write"
            ) from None
        if "is full" in text:
            raise StoreError(
                f"the store {path} cannot be written: disk full ({text}); what was written "
                "before is intact. Free some space (or move the store) and try again"
            ) from None
        if "disk I/O" in text and (limit := _file_size_limit_reached(path)) is not None:
            raise StoreError(
                f"the store {path} cannot be written: this process's file-size limit "
                f"({limit:,} bytes, `ulimit -f`) was reached ({text}); what was written before "
                "is intact. Raise the limit (or prune the store) and try again"
            ) from None
        if "unable to open" in text or "disk I/O" in text:
            raise StoreError(f"the store {path} cannot be used: {text}") from None
        raise StoreCorruptedError(
            f"the store {path} is damaged ({text}); it was left untouched. Move it aside "
            "(or restore a backup) to start a new history"
        ) from None
    except (sqlite3.InterfaceError, sqlite3.ProgrammingError) as exc:
        # A value SQLite cannot take, or a statement misused: flowsdk's fault, not the file's.
        raise StoreError(
            f"the store {path} could not be written ({exc}); nothing in it was changed "
            "or damaged. This is a flowsdk bug: please report it"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise StoreCorruptedError(
            f"the store {path} is not a flowsdk store or is damaged ({exc}); it was left "
            "untouched. Move it aside (or restore a backup) to start a new history"
        ) from None


def _file_size_limit_reached(path: str) -> int | None:
    """The process's file-size limit, if the store's file or its log is at it (`EFBIG`).

    SQLite reports a write refused for that limit as a plain "disk I/O error".
    """
    try:
        import resource  # here: not on every platform, and only on this error
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        return None
    for name in (path, f"{path}-wal", f"{path}-journal"):
        with contextlib.suppress(OSError):
            # The refused write started at or below the limit: one page (of up to
            # 64 KiB, with its frame header) from it at most.
            if os.path.getsize(name) > soft - 65_600:
                return int(soft)
    return None


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not done so itself.

    On some errors (a full disk) SQLite rolls back on its own; a second
    ROLLBACK would then fail and hide the error that matters.
    """
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def migrate(conn: sqlite3.Connection, location: str = "") -> None:
    """Bring the store's schema to `SCHEMA_VERSION` in one transaction (under the write lock).

    Upgrading a store that has a history is said in a log record: a migration that
    rewrites a table (schema 7) takes a while on a large store, and other
    processes wait for its lock meanwhile.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have migrated meanwhile.
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if 0 < current < SCHEMA_VERSION:
            logger.warning(
                "upgrading the store %s from schema %d to %d in one transaction; "
                "other processes using it wait until it is done",
                location,
                current,
                SCHEMA_VERSION,
            )
        for step in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def create_store(path: str) -> None:
    """Create a store file whole: its schema written in a private file, then linked into place.

    Readers never see a half-made store, and two processes creating one store
    at once end with one of the two files. The file and a folder it creates
    are readable and writable by their owner only.

    Raises:
        StoreError: the folder or the file cannot be created.
    """
    folder = os.path.dirname(os.path.abspath(path))
    # Errors name the path as the user wrote it, never the private file made on the way.
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fresh = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.new")
        os.close(os.open(fresh, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise cannot_create(path, exc) from None
    try:
        with (
            translate(path),
            contextlib.closing(sqlite3.connect(fresh, isolation_level=None)) as conn,
        ):
            # Before the first table: a prune gives freed pages back (`incremental_vacuum`).
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            migrate(conn)
        try:
            os.link(fresh, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        except OSError:
            if not os.path.exists(path):  # no hard links on this file system
                os.rename(fresh, path)
    except OSError as exc:
        raise cannot_create(path, exc) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fresh)


def warn_if_others_can_write(path: str) -> None:
    """Name a store file that other users can write in a warning (SPEC §5)."""
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            logger.warning(
                "the store %s can be written by other users (mode %o): anyone who can "
                "write it can abort runs and choose what a retry imports; "
                "run 'chmod 600 %s' to keep it yours",
                path,
                stat.S_IMODE(mode),
                path,
            )


def mark_crashed(conn: sqlite3.Connection, name: str, attempt: int, now: float) -> None:
    """Record a run whose runner is gone, and its unfinished actions, CRASHED (one transaction)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        phase = conn.execute(
            "SELECT phase FROM runs WHERE name = ? AND attempt = ?", (name, attempt)
        ).fetchone()[0]
        if RunPhase(phase).terminal:
            conn.execute("COMMIT")
            return
        seq = conn.execute(LAST_SEQ, {"run": name, "attempt": attempt}).fetchone()[0]
        unfinished = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM actions WHERE run = ? AND run_attempt = ? "
                f"AND phase IN {_UNFINISHED} ORDER BY seq",
                (name, attempt),
            )
        ]
        # Ended at the last heartbeat (SPEC §5), but never before it started: an action
        # may start after the runner's last heartbeat, and so may the run's last end.
        conn.execute(
            "UPDATE actions SET phase = 'CRASHED', ended_at = max(?, started_at) "
            f"WHERE run = ? AND run_attempt = ? AND phase IN {_UNFINISHED}",
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
        conn.executemany(INSERT_EVENT, rows)
        conn.execute(
            "UPDATE runs SET phase = 'CRASHED', ended_at = max(?, coalesce((SELECT "
            "max(max(started_at, coalesce(ended_at, started_at))) FROM actions "
            "WHERE run = ? AND run_attempt = ?), ?)) WHERE name = ? AND attempt = ?",
            (now, name, attempt, now, name, attempt),
        )
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    logger.warning("run %s: its runner is gone; recorded CRASHED", name)
