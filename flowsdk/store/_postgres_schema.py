"""The PostgreSQL store's layout: URL, connections, migrations, error translation, liveness.

Shared by the store (`_postgres.py`: reads, control requests, crash
detection) and the per-run writer's dialect (`_postgres_dialect.py`). Every
table lives in the schema `flowsdk` of the database the URL names; the
schema is created on first write, the database never is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import msgspec
import psycopg
from psycopg import errors as pg_errors

from flowsdk._liveness import Owner, host_identity, process_alive
from flowsdk._phases import RunPhase
from flowsdk._records import ACTION_FIELDS, EVENT_FIELDS, EventKind
from flowsdk.errors import PermissionDeniedError, StoreError, StoreLockedError
from flowsdk.store._location import DEFAULT_BUSY_TIMEOUT
from flowsdk.store._postgres_url import PgTarget
from flowsdk.store._rows import (
    ACTION_COLUMN_NAMES,
    ACTION_COLUMNS,
    EVENT_COLUMNS,
    RUN_COLUMNS,
)
from flowsdk.store._trace_sql import table_statements

__all__ = [
    "ACTIONS_IN",
    "ACTION_COLUMNS",
    "COPY_ACTIONS",
    "COPY_EVENTS",
    "DEFAULT_BUSY_TIMEOUT",
    "ACTION_EVENTS",
    "EVENTS_AFTER",
    "EVENT_COLUMNS",
    "INSERT_ACTION",
    "INSERT_EVENT",
    "INSERT_ROUTINE_PACK",
    "LAST_SEQ",
    "LEASE",
    "LIVE_RUNS",
    "REPLIES",
    "REQUESTS",
    "RUN_COLUMNS",
    "SCHEMA_VERSION",
    "UPSERT_ACTIONS",
    "PgTarget",
    "connect",
    "connection_lost",
    "mark_crashed",
    "owner_decoder",
    "owner_encoder",
    "runner_gone",
    "store_error",
    "translate",
]

logger = logging.getLogger("flowsdk")

LEASE = 10.0  # a connected runner whose lease is older than this (server clock) is gone
REQUESTS = "flowsdk_requests"  # NOTIFY channel: a request was queued (payload: the run)
REPLIES = "flowsdk_replies"  # NOTIFY channel: a runner answered a request
_MIGRATION_LOCK = 0x466C6F77  # advisory lock key serialising migrations ("Flow")

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE flowsdk.runs (
            name TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            phase TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            ended_at DOUBLE PRECISION,
            task TEXT NOT NULL DEFAULT '',
            stop_mode TEXT, stop_reason TEXT, stop_by TEXT, stop_at DOUBLE PRECISION,
            owner BYTEA,
            heartbeat DOUBLE PRECISION,
            workdir TEXT NOT NULL DEFAULT '',
            lock_key BIGINT,
            PRIMARY KEY (name, attempt)
        )""",
        "CREATE INDEX runs_started ON flowsdk.runs (started_at)",
        "CREATE INDEX runs_task ON flowsdk.runs (task, started_at)",
        "CREATE SEQUENCE flowsdk.lock_keys",
        """CREATE TABLE flowsdk.actions (
            run TEXT NOT NULL,
            run_attempt INTEGER NOT NULL,
            name TEXT NOT NULL,
            seq INTEGER NOT NULL,
            parent TEXT,
            task TEXT NOT NULL,
            grp TEXT,
            phase TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            started_at DOUBLE PRECISION,
            ended_at DOUBLE PRECISION,
            error_type TEXT, error_message TEXT, error_traceback TEXT,
            abort_reason TEXT, abort_cause TEXT, abort_by TEXT, abort_at DOUBLE PRECISION,
            cleanup_incomplete BOOLEAN NOT NULL DEFAULT FALSE,
            key TEXT NOT NULL DEFAULT '',
            replayed BOOLEAN NOT NULL DEFAULT FALSE,
            inputs BYTEA,
            output BYTEA,
            PRIMARY KEY (run, run_attempt, name)
        )""",
        "CREATE INDEX actions_seq ON flowsdk.actions (run, run_attempt, seq)",
        """CREATE TABLE flowsdk.events (
            run TEXT NOT NULL,
            run_attempt INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL,
            action TEXT, phase TEXT, cause TEXT, reason TEXT, requested_by TEXT, message TEXT,
            PRIMARY KEY (run, run_attempt, seq)
        )""",
        """CREATE TABLE flowsdk.requests (
            id BIGSERIAL PRIMARY KEY,
            run TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            body BYTEA NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            answer BYTEA,
            answered_at DOUBLE PRECISION
        )""",
        "CREATE INDEX requests_pending ON flowsdk.requests (run, state)",
        """CREATE TABLE flowsdk.cache (
            task TEXT NOT NULL,
            version TEXT NOT NULL,
            digest TEXT NOT NULL,
            output BYTEA NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (task, version, digest)
        )""",
    ],
    # The console's tokens (SPEC §8): the SHA-256 of the secret, never the secret.
    2: [
        """CREATE TABLE flowsdk.tokens (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            digest TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            last_used_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION
        )"""
    ],
    # Progress reports and captured log records of actions (SPEC §2).
    3: table_statements("flowsdk.", "DOUBLE PRECISION"),
    # Where each action's body ran (SPEC §4, §9): "local" or "ray".
    4: ["ALTER TABLE flowsdk.actions ADD COLUMN executor TEXT NOT NULL DEFAULT 'local'"],
    # Keys keep only their last segment (the whole key is rebuilt from the parent
    # chain on reading), so a deep tree's store does not grow with the square of
    # its depth. The join reads the keys as they were before the statement.
    5: [
        """UPDATE flowsdk.actions c SET key = substr(c.key, length(p.key) + 1)
            FROM flowsdk.actions p
            WHERE p.run = c.run AND p.run_attempt = c.run_attempt AND p.name = c.parent
              AND left(c.key, length(p.key)) = p.key"""
    ],
    # The routine events of one write, packed into one row keyed by the last `seq`
    # in it (`_rows.pack_routine`), as the SQLite store keeps them; a store's older
    # routine rows stay in `events`, and readers take both.
    6: [
        """CREATE TABLE flowsdk.routine_events (
            run TEXT NOT NULL,
            run_attempt INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            packed BYTEA NOT NULL,
            PRIMARY KEY (run, run_attempt, last_seq)
        )"""
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)

owner_encoder = msgspec.msgpack.Encoder()
owner_decoder = msgspec.msgpack.Decoder(Owner)

_ACTION_COLS = ACTION_COLUMN_NAMES
# Idempotent, so a batch whose commit was lost with the connection can be written again.
INSERT_ACTION = (
    f"INSERT INTO flowsdk.actions (run, run_attempt, {ACTION_COLUMNS}) "
    f"VALUES ({', '.join(['%s'] * (2 + len(ACTION_FIELDS)))}) "
    "ON CONFLICT (run, run_attempt, name) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _ACTION_COLS if c != "name")
)
# The fast path of a batch: COPY, with the actions upserted from a session temp table.
ACTIONS_IN = (
    "CREATE TEMP TABLE IF NOT EXISTS actions_in (LIKE flowsdk.actions) ON COMMIT DELETE ROWS"
)
COPY_ACTIONS = f"COPY actions_in (run, run_attempt, {ACTION_COLUMNS}) FROM STDIN"
UPSERT_ACTIONS = (
    f"INSERT INTO flowsdk.actions (run, run_attempt, {ACTION_COLUMNS}) "
    f"SELECT run, run_attempt, {ACTION_COLUMNS} FROM actions_in "
    "ON CONFLICT (run, run_attempt, name) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _ACTION_COLS if c != "name")
)
COPY_EVENTS = f"COPY flowsdk.events (run, run_attempt, {EVENT_COLUMNS}) FROM STDIN"
INSERT_EVENT = (
    f"INSERT INTO flowsdk.events (run, run_attempt, {EVENT_COLUMNS}) "
    f"VALUES ({', '.join(['%s'] * (2 + len(EVENT_FIELDS)))}) ON CONFLICT DO NOTHING"
)
# Idempotent too: a pack is keyed by its last `seq`.
INSERT_ROUTINE_PACK = (
    "INSERT INTO flowsdk.routine_events (run, run_attempt, last_seq, packed) "
    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"
)
# The last `seq` of an attempt's event log (-1 when empty), in rows and in packs;
# named parameters: run, attempt.
LAST_SEQ = (
    "SELECT greatest("
    "coalesce((SELECT max(seq) FROM flowsdk.events "
    "WHERE run = %(run)s AND run_attempt = %(attempt)s), -1), "
    "coalesce((SELECT max(last_seq) FROM flowsdk.routine_events "
    "WHERE run = %(run)s AND run_attempt = %(attempt)s), -1))"
)
# An attempt's events after a cursor, rows and packs in one statement (one
# snapshot, as for SQLite); named parameters: run, attempt, cursor.
EVENTS_AFTER = (
    f"SELECT {EVENT_COLUMNS}, NULL::bytea FROM flowsdk.events "
    "WHERE run = %(run)s AND run_attempt = %(attempt)s AND seq > %(cursor)s "
    f"UNION ALL SELECT last_seq, {', '.join(['NULL'] * (len(EVENT_FIELDS) - 1))}, packed "
    "FROM flowsdk.routine_events "
    "WHERE run = %(run)s AND run_attempt = %(attempt)s AND last_seq > %(cursor)s"
)

# The events of one action (named params run, attempt, action, needle: `routine_needle`):
# its own rows, and the packs its name occurs in (`of_action` keeps its events of them).
ACTION_EVENTS = (
    f"SELECT {EVENT_COLUMNS}, NULL::bytea FROM flowsdk.events "
    "WHERE run = %(run)s AND run_attempt = %(attempt)s AND action = %(action)s "
    f"UNION ALL SELECT last_seq, {', '.join(['NULL'] * (len(EVENT_FIELDS) - 1))}, packed "
    "FROM flowsdk.routine_events WHERE run = %(run)s AND run_attempt = %(attempt)s "
    "AND position(%(needle)s::bytea in packed) > 0"
)

# The unfinished runs with what tells whether their runner lives: its lease's
# age on the server's clock, whether its session still holds its advisory
# lock, and whether the lease predates the server's last start (a restart
# drops every session: the runner gets its lease's time to reconnect).
LIVE_RUNS = """SELECT r.name, r.attempt, r.owner,
    extract(epoch FROM clock_timestamp()) - r.heartbeat,
    r.lock_key IS NULL OR EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND l.classid = (r.lock_key >> 32)::oid AND l.objid = (r.lock_key & 4294967295)::oid),
    r.heartbeat < extract(epoch FROM pg_postmaster_start_time()),
    coalesce(r.heartbeat, extract(epoch FROM clock_timestamp()))
    FROM flowsdk.runs r WHERE r.phase IN ('RUNNING', 'STOPPING')"""


def store_error(exc: psycopg.Error, target: PgTarget) -> StoreError | PermissionDeniedError:
    """Turn a psycopg error into the store error of SPEC §7 that says what happened."""
    where = target.display
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return PermissionDeniedError(
            f"the database role of {where} lacks a privilege flowsdk needs ({text}); "
            "see the README's scale-out section for the grants"
        )
    if isinstance(
        exc,
        pg_errors.LockNotAvailable | pg_errors.DeadlockDetected | pg_errors.SerializationFailure,
    ):
        return StoreLockedError(
            f"the store {where} is locked by another session past its busy timeout ({text})"
        )
    if isinstance(exc, psycopg.OperationalError):
        if "does not exist" in text and "database" in text:
            return StoreError(
                f"the database {target.database!r} of {where} does not exist; flowsdk never "
                "creates one: create it (createdb) or point --store at another"
            )
        if "authentication" in text or "password" in text or "no pg_hba.conf entry" in text:
            return StoreError(f"the database server of {where} refuses the login: {text}")
        return StoreError(f"the database {where} cannot be reached: {text}")
    return StoreError(f"the database {where} failed: {text}")


@contextlib.contextmanager
def translate(target: PgTarget) -> Iterator[None]:
    """Turn psycopg errors raised inside into store errors naming the database."""
    try:
        yield
    except psycopg.Error as exc:
        raise store_error(exc, target) from None


def connection_lost(conn: psycopg.Connection[Any] | None, exc: BaseException) -> bool:
    """Whether `exc` means the session is gone (server stopped, network cut): worth a reconnect."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    if conn is None or conn.closed or conn.broken:
        return True
    state = exc.sqlstate or ""
    return state.startswith("08") or state in ("57P01", "57P02", "57P03")


def connect(target: PgTarget, *, create: bool) -> psycopg.Connection[Any] | None:
    """Open an autocommit connection with the schema migrated (created only if `create`).

    Returns None when the database has no flowsdk schema yet and `create` is false.

    Raises:
        StoreError: unreachable, login refused, no such database, newer schema,
            or tables under flowsdk's names that flowsdk did not create.
    """
    with translate(target):
        conn = psycopg.connect(
            target.conninfo,
            autocommit=True,
            connect_timeout=max(2, round(target.busy_timeout)),
            application_name="flowsdk",
        )
        try:
            ms = int(target.busy_timeout * 1000)
            conn.execute(f"SET lock_timeout = {ms}")
            if not _migrate(conn, target, create=create):
                conn.close()
                return None
        except BaseException:
            conn.close()
            raise
    return conn


def _version(conn: psycopg.Connection[Any]) -> int | None:
    if conn.execute("SELECT to_regclass('flowsdk.schema_version')").fetchone() == (None,):
        return None
    row = conn.execute("SELECT version FROM flowsdk.schema_version").fetchone()
    return None if row is None else int(row[0])


def _migrate(conn: psycopg.Connection[Any], target: PgTarget, *, create: bool) -> bool:
    version = _version(conn)
    if version == SCHEMA_VERSION:
        return True
    if version is not None and version > SCHEMA_VERSION:
        raise StoreError(
            f"the store {target.display} was written by a newer flowsdk (schema {version}, this "
            f"one knows {SCHEMA_VERSION}); upgrade flowsdk to use it"
        )
    if version is None and not create:
        return False
    with conn.transaction():
        # Numbered steps, all in one transaction, one migrating session at a time.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        version = _version(conn)
        if version is None:
            foreign = conn.execute(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'flowsdk'"
            ).fetchone()
            if foreign is not None and foreign[0]:
                raise StoreError(
                    f"the database of {target.display} has a schema named flowsdk that flowsdk "
                    "did not create; it was left untouched. Use another database"
                )
            conn.execute("CREATE SCHEMA IF NOT EXISTS flowsdk")
            conn.execute("CREATE TABLE flowsdk.schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO flowsdk.schema_version VALUES (0)")
            version = 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {target.display} was written by a newer flowsdk (schema {version})"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute("UPDATE flowsdk.schema_version SET version = %s", (SCHEMA_VERSION,))
    return True


def runner_gone(owner: bytes | None, age: float | None, held: bool, before_restart: bool) -> bool:
    """Whether a run's runner is gone, from a row of `LIVE_RUNS` (SPEC §5, §9).

    On this host, the process decides: a live runner is never declared
    crashed, however stale its lease (paused, loop blocked), and a dead one is
    gone at once. From another host: gone when its session no longer holds
    its advisory lock, or when its lease is older than `LEASE`.
    """
    if owner is None:
        return False
    who = owner_decoder.decode(owner)
    if who.host == host_identity():
        return not process_alive(who.pid, who.started)
    if age is not None and age > LEASE:
        return True
    if held:
        return False
    return not before_restart


def mark_crashed(conn: psycopg.Connection[Any], name: str, attempt: int) -> bool:
    """Record a run whose runner is gone, and its unfinished actions, CRASHED (one transaction).

    Their end is the runner's last heartbeat. Returns False when the run had
    ended meanwhile.
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT phase, coalesce(heartbeat, extract(epoch FROM clock_timestamp())) "
            "FROM flowsdk.runs WHERE name = %s AND attempt = %s FOR UPDATE",
            (name, attempt),
        ).fetchone()
        if row is None or RunPhase(row[0]).terminal:
            return False
        end = float(row[1])
        seq_row = conn.execute(LAST_SEQ, {"run": name, "attempt": attempt}).fetchone()
        seq = int(seq_row[0]) if seq_row else -1
        crashed = sorted(
            (r[1], r[0])
            for r in conn.execute(
                # Ended at the last heartbeat (SPEC §5), never before it started.
                "UPDATE flowsdk.actions SET phase = 'CRASHED', ended_at = greatest(%s, started_at) "
                "WHERE run = %s AND run_attempt = %s "
                "AND phase IN ('QUEUED', 'RUNNING', 'STOPPING') RETURNING name, seq",
                (end, name, attempt),
            ).fetchall()
        )
        unfinished = [action for _, action in crashed]
        gone = (None, None, None, "runner gone")  # cause, reason, requested_by, message
        events: list[tuple[Any, ...]] = [
            (name, attempt, seq + 1 + i, end, EventKind.ACTION.value, action, "CRASHED", *gone)
            for i, action in enumerate(unfinished)
        ]
        last = seq + 1 + len(unfinished)
        events.append((name, attempt, last, end, EventKind.RUN.value, None, "CRASHED", *gone))
        with conn.cursor() as cur:
            cur.executemany(INSERT_EVENT, events)
        conn.execute(
            "UPDATE flowsdk.runs SET phase = 'CRASHED', ended_at = greatest(%s, (SELECT "
            "max(greatest(started_at, ended_at)) FROM flowsdk.actions "
            "WHERE run = %s AND run_attempt = %s)) WHERE name = %s AND attempt = %s",
            (end, name, attempt, name, attempt),
        )
    logger.warning("run %s: its runner is gone; recorded CRASHED", name)
    return True
