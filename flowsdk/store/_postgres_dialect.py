"""The PostgreSQL side of the per-run writer: statements, liveness, and how requests arrive.

- The requests table is the source of truth; `NOTIFY` on `flowsdk_requests`
  (sent by the requester in the transaction that queues a request) only wakes
  the runner, and a slow poll (`SAFETY_POLL`) catches a lost notification.
  Requests are claimed with `FOR UPDATE SKIP LOCKED`, so each is applied once.
- The writer's session holds a session-level advisory lock for the run (a
  dead runner is seen at once from any host) and renews a lease on the
  server's clock every second (a hung runner is seen after `LEASE`).
- A session lost mid-run (server restarted, network cut) is reopened with
  backoff for up to the busy timeout; the batch that was being written is
  written again (every statement is idempotent), so no change is lost.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from msgspec.structs import astuple
from psycopg import errors as pg_errors

from flowsdk._liveness import (
    Owner,
    alive_here,
    host_identity,
    prior_runner_alive_error,
    process_start,
)
from flowsdk._records import ActionRow, EventRow, RunRecord
from flowsdk.errors import InvalidStateError, RunExistsError, StoreError
from flowsdk.store._batch import Batch
from flowsdk.store._postgres_schema import (
    ACTIONS_IN,
    COPY_ACTIONS,
    COPY_EVENTS,
    INSERT_ACTION,
    INSERT_EVENT,
    INSERT_ROUTINE_PACK,
    LAST_SEQ,
    REPLIES,
    REQUESTS,
    UPSERT_ACTIONS,
    PgTarget,
    connect,
    connection_lost,
    owner_decoder,
    owner_encoder,
    store_error,
)
from flowsdk.store._postgres_trace import POSTGRES_TRACE
from flowsdk.store._rows import pack_routine
from flowsdk.store._writer import RunLost

__all__ = ["SAFETY_POLL", "Link", "PostgresDialect"]

logger = logging.getLogger("flowsdk")

SAFETY_POLL = 1.0  # seconds between request checks when no notification came
T = TypeVar("T")


class Link:
    """The writer's session: the connection, the run's lock key, and what NOTIFY said."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.key: int | None = None
        self.notified = True  # look once at the start
        self.next_poll = 0.0


class PostgresDialect:
    """Statements, liveness and request detection of the PostgreSQL store, for `RunWriter`."""

    def __init__(self, target: PgTarget, run: str, attempt: int) -> None:
        self.location = target.display
        self._target = target
        self._run = run
        self._attempt = attempt
        self._key: int | None = None  # the run's advisory lock key, as its row records it

    # -- the session -------------------------------------------------------------------

    def connect(self) -> Link:
        """Open the writer's session (creating the schema if needed) and listen for requests."""
        conn = connect(self._target, create=True)
        assert conn is not None  # create=True always gives a connection
        link = Link(conn)
        try:
            self._listen(link)
        except psycopg.Error as exc:
            conn.close()
            raise store_error(exc, self._target) from None
        return link

    def _listen(self, link: Link) -> None:
        def heard(note: psycopg.Notify) -> None:
            if note.channel == REQUESTS and note.payload in (self._run, ""):
                link.notified = True

        link.conn.add_notify_handler(heard)
        link.conn.execute(f"LISTEN {REQUESTS}")
        link.conn.execute(ACTIONS_IN)

    def close(self, link: Link) -> None:
        """Close the session (which releases the run's advisory lock)."""
        link.conn.close()

    def let_go(self, final: bool) -> None:
        """Nothing to release here: the session's advisory lock goes with its connection."""

    def _reopen(self, link: Link) -> None:
        conn = connect(self._target, create=True)
        assert conn is not None
        old, link.conn = link.conn, conn
        old.close()
        self._listen(link)
        link.notified = True  # a request may have come while the session was away
        if link.key is not None:
            conn.execute("SELECT pg_advisory_lock(%s)", (link.key,))
            self._check_not_crashed(conn)

    def _check_not_crashed(self, conn: psycopg.Connection[Any]) -> None:
        # Its row gone (pruned) or another runner's (the name used again): lost too.
        row = conn.execute(
            "SELECT phase, lock_key FROM flowsdk.runs WHERE name = %s AND attempt = %s",
            (self._run, self._attempt),
        ).fetchone()
        if row is None or row[0] == "CRASHED" or row[1] != self._key:
            raise RunLost(
                f"run {self._run!r} was recorded CRASHED in {self.location} while its runner "
                f"(pid {os.getpid()}) was alive (its lease ran out); it stopped its bodies and "
                "recorded nothing more"
            )

    def _do(self, link: Link, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `work`, reopening a lost session with backoff for up to the busy timeout."""
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                return work(link.conn)
            except psycopg.Error as exc:
                if not connection_lost(link.conn, exc):
                    raise store_error(exc, self._target) from None
                lost: BaseException = exc
            now = time.monotonic()
            if deadline is None:
                deadline = now + self._target.busy_timeout
                logger.warning(
                    "run %s: lost the database session (%s); reconnecting for up to %g s",
                    self._run,
                    _first_line(lost),
                    self._target.busy_timeout,
                )
            while True:
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"the database {self.location} stayed unreachable for its busy timeout "
                        f"({self._target.busy_timeout:g} s): {_first_line(lost)}"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                try:
                    self._reopen(link)
                except StoreError as exc:
                    if "CRASHED" in str(exc):
                        raise
                    lost = exc
                    continue
                except psycopg.Error as exc:
                    lost = store_error(exc, self._target)
                    continue
                logger.warning("run %s: reconnected to the database", self._run)
                break

    # -- the run -------------------------------------------------------------------------

    def insert_run(
        self, link: Link, record: RunRecord, actions: list[ActionRow], events: list[EventRow]
    ) -> None:
        """Take the run's advisory lock, then create its row and first rows in one transaction."""
        pid = os.getpid()
        owner = owner_encoder.encode(
            Owner(host=host_identity(), pid=pid, started=process_start(pid))
        )
        conn = link.conn
        try:
            row = conn.execute("SELECT nextval('flowsdk.lock_keys')").fetchone()
            assert row is not None
            key = int(row[0])
            # Held by this session until it ends: its release tells every host the runner is gone.
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            link.key = self._key = key
            name, attempt = record.name, record.attempt
            with conn.transaction(), conn.cursor() as cur:
                if attempt > 1:
                    # Recorded CRASHED from another host, the attempt before may still
                    # run here (paused): this host can see it, and must not run its
                    # work twice.
                    cur.execute(
                        "SELECT owner FROM flowsdk.runs WHERE name = %s AND attempt = %s "
                        "AND phase = 'CRASHED'",
                        (name, attempt - 1),
                    )
                    row = cur.fetchone()
                    if row is not None and row[0] is not None:
                        prior = owner_decoder.decode(bytes(row[0]))
                        if alive_here(prior):
                            raise InvalidStateError(prior_runner_alive_error(name, attempt, prior))
                cur.execute(
                    "INSERT INTO flowsdk.runs (name, attempt, phase, started_at, task, owner, "
                    "heartbeat, workdir, lock_key) VALUES (%s, %s, %s, %s, %s, %s, "
                    "extract(epoch FROM clock_timestamp()), %s, %s)",
                    (
                        name,
                        attempt,
                        record.phase.value,
                        record.started_at.timestamp(),
                        record.task,
                        owner,
                        record.workdir,
                        key,
                    ),
                )
                # The root and its recorded inputs with the run: never recorded in part.
                if actions:
                    cur.executemany(
                        INSERT_ACTION,
                        _no_nul([(name, attempt, *astuple(r)) for r in actions]),
                    )
                if events:
                    cur.executemany(
                        INSERT_EVENT, _no_nul([(name, attempt, *astuple(e)) for e in events])
                    )
                # Requests still unanswered were for an attempt that has ended
                # (recorded CRASHED before its runner read them, or took them and never
                # answered): never this one's. Their requesters are told.
                cur.execute(
                    "UPDATE flowsdk.requests SET state = 'dropped' "
                    "WHERE run = %s AND state IN ('pending', 'delivered')",
                    (name,),
                )
        except pg_errors.UniqueViolation:
            if record.attempt > 1:
                raise RunExistsError(
                    f"attempt {record.attempt} of run {record.name!r} in {self.location} was "
                    "started meanwhile, by another retry; see it with flowsdk show"
                ) from None
            raise RunExistsError(
                f"a run named {record.name!r} already exists in {self.location}; "
                "choose another name"
            ) from None
        except psycopg.Error as exc:
            raise store_error(exc, self._target) from None

    def write(self, link: Link, name: str, attempt: int, batch: Batch) -> None:
        """Write one batch in one transaction (again, whole, after a lost session)."""
        actions = [(name, attempt, *astuple(r)) for r in batch.actions.values()]
        events = [(name, attempt, *astuple(e)) for e in batch.events]
        # Action names and phases hold no NUL: the pack needs no escaping.
        pack = (name, attempt, *pack_routine(batch.routine)) if batch.routine else None
        run = batch.run
        stop = run.stop if run is not None else None
        run_row = (
            None
            if run is None
            else (
                run.phase.value,
                None if run.ended_at is None else run.ended_at.timestamp(),
                stop.mode.value if stop else None,
                stop.reason if stop else None,
                stop.requested_by if stop else None,
                stop.requested_at.timestamp() if stop else None,
                name,
                attempt,
            )
        )

        tries = 0

        def work(conn: psycopg.Connection[Any]) -> None:
            nonlocal tries
            tries += 1
            # COPY on the first try; written again after a lost session, the batch may
            # have been committed already: idempotent INSERTs then.
            copy = tries == 1
            try:
                self._write(conn, batch, actions, events, pack, run_row, copy)
            except psycopg.DataError as exc:
                if "NUL" not in str(exc):
                    raise
                # PostgreSQL text cannot hold NUL: written as the visible escape `\x00`,
                # as a terminal shows it, rather than losing the whole batch.
                rows = _no_nul(actions), _no_nul(events)
                self._write(conn, batch, *rows, pack, _no_nul([run_row])[0], copy)

        self._do(link, work)

    def _write(
        self,
        conn: psycopg.Connection[Any],
        batch: Batch,
        actions: list[tuple[Any, ...]],
        events: list[tuple[Any, ...]],
        pack: tuple[Any, ...] | None,
        run_row: tuple[Any, ...] | None,
        copy: bool,
    ) -> None:
        with conn.transaction(), conn.cursor() as cur:
            # The run's row lock orders this batch against a reader marking it CRASHED.
            row = cur.execute(
                "SELECT phase FROM flowsdk.runs WHERE name = %s AND attempt = %s FOR UPDATE",
                (self._run, self._attempt),
            ).fetchone()
            if row is not None and row[0] == "CRASHED":
                self._check_not_crashed(conn)
            if copy:
                # COPY is several times faster than row-by-row INSERTs; actions go
                # through a session temp table to be upserted.
                if actions:
                    with cur.copy(COPY_ACTIONS) as pipe:
                        for action in actions:
                            pipe.write_row(action)
                    cur.execute(UPSERT_ACTIONS)
                if events:
                    with cur.copy(COPY_EVENTS) as pipe:
                        for event in events:
                            pipe.write_row(event)
            else:
                if actions:
                    cur.executemany(INSERT_ACTION, actions)
                if events:
                    cur.executemany(INSERT_EVENT, events)
            if pack is not None:
                cur.execute(INSERT_ROUTINE_PACK, pack)
            POSTGRES_TRACE.write(
                cur.executemany, self._run, self._attempt, batch.progress, batch.logs
            )
            if run_row is not None:
                cur.execute(
                    "UPDATE flowsdk.runs SET phase = %s, ended_at = %s, stop_mode = %s, "
                    "stop_reason = %s, stop_by = %s, stop_at = %s, "
                    "heartbeat = extract(epoch FROM clock_timestamp()) "
                    "WHERE name = %s AND attempt = %s",
                    run_row,
                )
            if batch.replies:
                now = time.time()
                cur.executemany(
                    "UPDATE flowsdk.requests SET state = 'done', answer = %s, "
                    "answered_at = %s WHERE id = %s",
                    [(body, now, request_id) for request_id, body in batch.replies],
                )
                cur.execute(f"NOTIFY {REPLIES}")
            if batch.cached:
                cur.executemany(
                    "INSERT INTO flowsdk.cache VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (task, version, digest) DO UPDATE SET "
                    "output = EXCLUDED.output, created_at = EXCLUDED.created_at",
                    batch.cached,
                )

    def heartbeat(self, link: Link, name: str, attempt: int) -> None:
        """Renew the runner's lease on the server's clock."""

        def work(conn: psycopg.Connection[Any]) -> None:
            row = conn.execute(
                "UPDATE flowsdk.runs SET heartbeat = extract(epoch FROM clock_timestamp()) "
                "WHERE name = %s AND attempt = %s AND phase <> 'CRASHED' RETURNING 1",
                (name, attempt),
            ).fetchone()
            if row is None:
                self._check_not_crashed(conn)

        self._do(link, work)

    def note(self, link: Link, name: str, attempt: int, message: str) -> None:
        """Append one `warning` event after the run's last one."""

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                row = conn.execute(LAST_SEQ, {"run": name, "attempt": attempt}).fetchone()
                assert row is not None
                event = EventRow(
                    row[0] + 1, time.time(), "warning", None, None, None, None, None, message
                )
                conn.execute(INSERT_EVENT, (name, attempt, *astuple(event)))

        self._do(link, work)

    def idle(self, link: Link) -> None:
        """Nothing to tidy: the server checkpoints its own log."""

    def requests_may_be_waiting(self, link: Link) -> bool:
        """Whether a notification named this run, or the safety poll is due (no round trip)."""
        conn = link.conn
        if conn.closed or conn.broken:
            return True  # the claim reopens the session
        try:
            pgconn = conn.pgconn
            pgconn.consume_input()
            while (note := pgconn.notifies()) is not None:
                payload = note.extra.decode("utf-8", "replace")
                if payload in (self._run, ""):
                    link.notified = True
        except psycopg.Error:
            return True
        now = time.monotonic()
        if link.notified or now >= link.next_poll:
            link.notified = False
            link.next_poll = now + SAFETY_POLL
            return True
        return False

    def claim_requests(self, link: Link, name: str) -> list[tuple[int, bytes]]:
        """Take the run's pending requests, oldest first; a request is claimed by one session."""

        def work(conn: psycopg.Connection[Any]) -> list[tuple[int, bytes]]:
            rows = conn.execute(
                "UPDATE flowsdk.requests SET state = 'delivered' WHERE id IN ("
                "SELECT id FROM flowsdk.requests WHERE run = %s AND state = 'pending' "
                "ORDER BY id FOR UPDATE SKIP LOCKED) RETURNING id, body",
                (name,),
            ).fetchall()
            return sorted((int(r[0]), bytes(r[1])) for r in rows)

        return self._do(link, work)

    def cache_lookup(self, link: Link, task: str, version: str, digest: str) -> bytes | None:
        """Return a cached output, if any."""

        def work(conn: psycopg.Connection[Any]) -> bytes | None:
            row = conn.execute(
                "SELECT output FROM flowsdk.cache WHERE task = %s AND version = %s AND digest = %s",
                (task, version, digest),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return self._do(link, work)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _no_nul(rows: Sequence[tuple[Any, ...] | None]) -> list[Any]:
    def clean(value: object) -> object:
        return value.replace("\x00", "\\x00") if isinstance(value, str) else value

    return [None if row is None else tuple(clean(v) for v in row) for row in rows]
