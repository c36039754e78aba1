"""The shared control plane: one PostgreSQL database for runners and operators on many hosts.

- Every table is in the schema `flowsdk` of the database the URL names
  (`postgresql://user@host:5432/db`, libpq conventions: `PGPASSWORD`,
  `~/.pgpass`, `sslmode`); `?busy_timeout=SECONDS` (default 5) is flowsdk's.
- Each live run has one writer thread (`_writer.py`, with `PostgresDialect`)
  that owns a session: batched writes, a lease, an advisory lock, requests.
- A reader notices a runner that is gone (SPEC §5, §9: its session ended, or
  its lease is older than 10 s on the server's clock, or on this host its
  process ended) and records the run CRASHED.
- A control request is a row plus a `NOTIFY`; the requester waits for the
  runner's `NOTIFY` on `flowsdk_replies`, and checks the row on its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import msgspec
import psycopg
from msgspec.structs import astuple
from psycopg import errors as pg_errors

from flowsdk._phases import ActionPhase, RunPhase
from flowsdk._records import (
    ActionRow,
    ControlReply,
    ControlRequest,
    ControlResult,
    Event,
    EventRow,
    Outcome,
    PruneReport,
    RunRecord,
    action_records,
)
from flowsdk.errors import RunNotFoundError
from flowsdk.store._base import (
    QueuedRequest,
    RequestHandler,
    RunRecorder,
    RunState,
    StoredRun,
    dropped_reply,
)
from flowsdk.store._judged import Judged
from flowsdk.store._postgres_actions import PostgresActions, missing_action
from flowsdk.store._postgres_dialect import Link, PostgresDialect
from flowsdk.store._postgres_schema import (
    ACTION_COLUMNS,
    EVENTS_AFTER,
    INSERT_EVENT,
    LAST_SEQ,
    LIVE_RUNS,
    REPLIES,
    REQUESTS,
    RUN_COLUMNS,
    PgTarget,
    connect,
    connection_lost,
    mark_crashed,
    runner_gone,
    store_error,
)
from flowsdk.store._postgres_tokens import PostgresTokens
from flowsdk.store._postgres_trace import PostgresTrace
from flowsdk.store._prune import delete_runs_postgres, prune_plan
from flowsdk.store._rows import (
    close_names,
    events_from_rows,
    queued_from_rows,
    queued_query,
    run_record,
    with_routine,
)
from flowsdk.store._writer import RunWriter

__all__ = ["PostgresStore"]

T = TypeVar("T")
RUNNER_CHECK = 0.2  # how often a waiting requester checks that the runner still lives
_request_encoder = msgspec.msgpack.Encoder()
_reply_decoder = msgspec.msgpack.Decoder(ControlReply)
_QUEUED = queued_query("flowsdk.", "%s")
Conn = psycopg.Connection[Any]


class PostgresStore(PostgresActions, PostgresTokens, PostgresTrace):
    """A store in a PostgreSQL database (`postgresql://user@host:5432/db`).

    Opening it does no I/O; the schema is created when the first run is
    recorded. Reading a database without it shows no runs and creates nothing.
    """

    in_process = False

    def __init__(self, url: str) -> None:
        self._target = PgTarget(url)
        self.url = url
        self._reader: Conn | None = None
        self._requesters: list[Conn] = []  # idle sessions for control requests
        self._lock = threading.Lock()
        self._judged = Judged()  # what a role that may not write judged gone

    def __repr__(self) -> str:
        return f"PostgresStore({self._target.display!r})"

    # -- sessions ------------------------------------------------------------------------

    def _read(self, work: Callable[[Conn], T], empty: Callable[[], T]) -> T:
        """Run `work` on the reading session (opened once, reopened once if it was lost)."""
        with self._lock:
            for last in (False, True):
                if self._reader is None or self._reader.closed:
                    self._reader = connect(self._target, create=False)
                if self._reader is None:
                    return empty()
                try:
                    return work(self._reader)
                except psycopg.Error as exc:
                    if last or not connection_lost(self._reader, exc):
                        raise store_error(exc, self._target) from None
                    self._reader.close()
                    self._reader = None
            raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the store's sessions (runs close their own)."""
        with self._lock:
            for conn in [self._reader, *self._requesters]:
                if conn is not None:
                    conn.close()
            self._reader, self._requesters = None, []

    # -- writing a run -------------------------------------------------------------------

    async def open_run(
        self,
        record: RunRecord,
        loop: asyncio.AbstractEventLoop,
        handler: RequestHandler,
        *,
        actions: Sequence[ActionRow] = (),
        events: Sequence[EventRow] = (),
        on_lost: Callable[[str], None] | None = None,
    ) -> RunRecorder:
        """Create the run's row with its first rows, and start its writer thread."""
        dialect = PostgresDialect(self._target, record.name, record.attempt)
        recorder: RunWriter[Link] = RunWriter(
            dialect,
            record,
            loop,
            handler,
            first=(list(actions), list(events)),
            fail_wait=self._target.busy_timeout,
            final_wait=10 * self._target.busy_timeout,
            on_lost=on_lost,
        )
        try:
            await recorder.started
        except BaseException:
            await asyncio.shield(recorder.stopped())
            raise
        return recorder

    # -- liveness ------------------------------------------------------------------------

    def _reconcile(self, conn: Conn, name: str | None = None) -> None:
        sql = LIVE_RUNS + (" AND r.name = %s" if name is not None else "")
        rows = conn.execute(sql, (name,) if name is not None else ()).fetchall()
        for run, attempt, owner, age, held, before_restart, heartbeat in rows:
            if (run, attempt) in self._judged or not runner_gone(
                owner, age, bool(held), bool(before_restart)
            ):
                continue
            try:
                mark_crashed(conn, run, attempt)
            except pg_errors.InsufficientPrivilege:
                # A role that may only read: the run is shown CRASHED as judged, and so
                # are its unfinished actions, as SQLite's readers show them (`Judged`).
                latest = conn.execute(
                    "SELECT max(greatest(started_at, ended_at)) FROM flowsdk.actions "
                    "WHERE run = %s AND run_attempt = %s",
                    (run, attempt),
                ).fetchone()
                end = None if latest is None else latest[0]
                self._judged.note(run, attempt, float(heartbeat), end)
            except pg_errors.LockNotAvailable:
                return  # locked by its writer: judged again on the next read

    def reconcile(self) -> None:
        """Mark runs whose runner is gone (and their unfinished actions) CRASHED."""
        self._read(self._reconcile, lambda: None)

    # -- reading -------------------------------------------------------------------------

    def prune(
        self, *, before: datetime | None, keep: int | None, phase: RunPhase | None
    ) -> PruneReport:
        """Delete ended runs (never a live one); PostgreSQL manages the space it frees."""
        doomed, live = prune_plan(self.list_runs(phase=phase), before=before, keep=keep)
        if not doomed:
            return PruneReport(deleted=[], attempts=0, live=live)
        names = [r.name for r in doomed]
        gone, attempts = self._read(
            lambda conn: delete_runs_postgres(conn, names), lambda: (set(), 0)
        )
        live += [r for r in doomed if r.name not in gone]
        return PruneReport(
            deleted=[r for r in doomed if r.name in gone], attempts=attempts, live=live
        )

    def list_runs(
        self, *, phase: RunPhase | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Return the latest attempt of each run, newest first."""

        def work(conn: Conn) -> list[RunRecord]:
            self._reconcile(conn)
            sql = (
                f"SELECT DISTINCT ON (name) {RUN_COLUMNS} FROM flowsdk.runs "
                "ORDER BY name, attempt DESC"
            )
            sql = f"SELECT * FROM ({sql}) latest"
            params: list[Any] = []
            if phase is not None:
                sql += " WHERE phase = %s"
                params.append(phase.value)
            sql += " ORDER BY started_at DESC"
            if limit is not None:
                sql += " LIMIT %s"
                params.append(limit)
            found = [self._judged.record(run_record(r)) for r in conn.execute(sql, params)]
            if phase is not None:  # judged CRASHED since its row said otherwise
                found = [r for r in found if r.phase is phase]
            return found

        return self._read(work, list)

    def load_run(self, name: str, attempt: int | None = None) -> StoredRun:
        """Return one attempt of a run (default: the latest)."""

        def work(conn: Conn) -> StoredRun:
            self._reconcile(conn, name)
            record = self._run(conn, name, attempt)
            rows = [
                ActionRow(*r)
                for r in conn.execute(
                    f"SELECT {ACTION_COLUMNS} FROM flowsdk.actions "
                    "WHERE run = %s AND run_attempt = %s ORDER BY seq",
                    (name, record.attempt),
                )
            ]
            rows = self._judged.rows(name, record.attempt, rows)
            payloads = {r.name: (r.inputs, r.output) for r in rows}
            # Read now (one consistent picture), turned into `Event`s only if asked for.
            events = _event_rows(conn, name, record.attempt, -1)
            return StoredRun(
                record,
                lambda: action_records(name, rows),
                lambda: events_from_rows(events),
                payloads,
            )

        return self._read(work, lambda: self._none_yet(name))

    def note_request(self, name: str, action: str | None, message: str, requested_by: str) -> None:
        """Append a `request` event to the latest attempt of an ended run."""
        conn = connect(self._target, create=False)
        if conn is None:
            return
        try:
            with conn.transaction():
                attempt = self._latest(conn, name)[0]
                # The run's row lock orders this event against any other writer of its log.
                conn.execute(
                    "SELECT 1 FROM flowsdk.runs WHERE name = %s AND attempt = %s FOR UPDATE",
                    (name, attempt),
                )
                row = conn.execute(LAST_SEQ, {"run": name, "attempt": attempt}).fetchone()
                assert row is not None
                seq = row[0] + 1
                event = EventRow(
                    seq, time.time(), "request", action, None, None, None, requested_by, message
                )
                conn.execute(INSERT_EVENT, (name, attempt, *astuple(event)))
        except psycopg.Error as exc:
            raise store_error(exc, self._target) from None
        finally:
            conn.close()

    def load_record(self, name: str, attempt: int | None = None) -> RunRecord:
        """Return one attempt's run record alone (default: the latest)."""
        return self._read(lambda conn: self._run(conn, name, attempt), lambda: self._none_yet(name))

    def _none_yet(self, name: str) -> NoReturn:
        raise RunNotFoundError(
            f"no run named {name!r}: the store {self._target.display} has no runs yet"
        )

    def _run_row(self, conn: Conn, name: str, attempt: int | None) -> tuple[Any, ...]:
        if attempt is None:
            row = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM flowsdk.runs WHERE name = %s "
                "ORDER BY attempt DESC LIMIT 1",
                (name,),
            ).fetchone()
        else:
            row = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM flowsdk.runs WHERE name = %s AND attempt = %s",
                (name, attempt),
            ).fetchone()
        if row is None:
            raise self._not_found(conn, name, attempt)
        return tuple(row)

    def _run(self, conn: Conn, name: str, attempt: int | None) -> RunRecord:
        """One attempt's record (default: the latest), as this reader judges it."""
        return self._judged.record(run_record(self._run_row(conn, name, attempt)))

    def _latest(self, conn: Conn, name: str) -> tuple[int, str]:
        row = conn.execute(
            "SELECT attempt, phase FROM flowsdk.runs WHERE name = %s ORDER BY attempt DESC LIMIT 1",
            (name,),
        ).fetchone()
        if row is None:
            raise self._not_found(conn, name, None)
        attempt = int(row[0])
        return attempt, self._judged.phase(name, attempt, str(row[1]))

    def run_state(self, name: str, action: str | None = None) -> RunState:
        """Return the latest attempt's phase (and `action`'s) by keyed lookups."""

        def work(conn: Conn) -> RunState:
            attempt, phase = self._latest(conn, name)
            if not RunPhase(phase).terminal:
                self._reconcile(conn, name)
                attempt, phase = self._latest(conn, name)
            target = None
            if action is not None:
                row = conn.execute(
                    "SELECT phase FROM flowsdk.actions WHERE run = %s AND run_attempt = %s "
                    "AND name = %s",
                    (name, attempt, action),
                ).fetchone()
                if row is None:
                    raise missing_action(conn, name, attempt, action)
                target = ActionPhase(self._judged.phase(name, attempt, row[0]))
            return RunState(name, attempt, RunPhase(phase), target)

        return self._read(work, lambda: self._none_yet(name))

    def root_task_workdir(self, task: str) -> str | None:
        """Return the working directory of the latest run whose root task is `task`."""

        def work(conn: Conn) -> str | None:
            row = conn.execute(
                "SELECT workdir FROM flowsdk.runs WHERE task = %s ORDER BY started_at DESC LIMIT 1",
                (task,),
            ).fetchone()
            return None if row is None else str(row[0])

        return self._read(work, lambda: None)

    def events_since(self, name: str, cursor: int, *, attempt: int | None = None) -> list[Event]:
        """Return the events of a run (latest attempt by default) with `seq > cursor`."""

        def work(conn: Conn) -> list[Event]:
            chosen = self._latest(conn, name)[0] if attempt is None else attempt
            if attempt is not None:
                self._run_row(conn, name, attempt)
            return events_from_rows(_event_rows(conn, name, chosen, cursor))

        return self._read(work, lambda: self._none_yet(name))

    def queued_requests(self, name: str) -> list[QueuedRequest]:
        """Return the requests to a run its runner has not answered yet, oldest first.

        One keyed statement when there is none; when there are some, the run's
        runner is judged too, as `run_state` does: one that is gone never
        answers them, so none is listed.
        """

        def work(conn: Conn) -> list[QueuedRequest]:
            rows = conn.execute(_QUEUED, (name, name)).fetchall()
            found = queued_from_rows(rows, lambda: self._runner_gone(conn, name) is not None)
            if found is None:
                raise self._not_found(conn, name, None)
            return found

        return self._read(work, lambda: self._none_yet(name))

    def _not_found(self, conn: Conn, name: str, attempt: int | None) -> RunNotFoundError:
        if attempt is not None:
            row = conn.execute(
                "SELECT max(attempt) FROM flowsdk.runs WHERE name = %s", (name,)
            ).fetchone()
            if row is not None and row[0]:
                return RunNotFoundError(
                    f"run {name!r} has no attempt {attempt}; its latest is {row[0]}"
                )
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM flowsdk.runs GROUP BY name ORDER BY max(started_at) DESC "
                "LIMIT 1000"
            )
        ]
        hint = close_names(name, names)
        return RunNotFoundError(f"no run named {name!r} in {self._target.display}{hint}")

    # -- control -------------------------------------------------------------------------

    def _requesting(self) -> Conn:
        # One session per request under way: threads (the console's) never wait for
        # each other's answers, and an idle session is reused.
        with self._lock:
            while self._requesters:
                idle = self._requesters.pop()
                if not (idle.closed or idle.broken):
                    return idle
        conn = connect(self._target, create=True)
        assert conn is not None
        return conn

    def request(self, request: ControlRequest, *, timeout: float) -> ControlReply:
        """Queue a control request for the run's runner, wake it, and wait for its reply.

        The request is committed first, so it is never lost: if the runner does
        not answer in time, the reply is `queued` and the request is applied
        when the runner reads it.
        """
        conn = self._requesting()
        try:
            # Listening only while a request waits: an idle session that listened would
            # let notifications pile up unread, holding back the server's queue.
            conn.execute(f"LISTEN {REPLIES}")
            try:
                reply = self._request(conn, request, timeout)
            finally:
                if not (conn.closed or conn.broken):
                    conn.execute("UNLISTEN *")
        except psycopg.Error as exc:
            conn.close()
            raise store_error(exc, self._target) from None
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._requesters.append(conn)
        return reply

    def _request(self, conn: Conn, request: ControlRequest, timeout: float) -> ControlReply:
        wake = request.run if len(request.run.encode()) < 4000 else ""  # NOTIFY payload limit
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO flowsdk.requests (run, at, body) VALUES (%s, %s, %s) RETURNING id",
                (request.run, time.time(), _request_encoder.encode(request)),
            ).fetchone()
            conn.execute("SELECT pg_notify(%s, %s)", (REQUESTS, wake))
        assert row is not None
        request_id = int(row[0])
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + RUNNER_CHECK
        while True:
            found = conn.execute(
                "SELECT state, answer FROM flowsdk.requests WHERE id = %s", (request_id,)
            ).fetchone()
            if found is not None and found[0] == "done":
                return _reply_decoder.decode(found[1])
            if found is not None and found[0] == "dropped":  # by the next attempt
                return dropped_reply(request.run)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + RUNNER_CHECK
                gone = self._runner_gone(conn, request.run)
                if gone is not None:
                    conn.execute(
                        "UPDATE flowsdk.requests SET state = 'dropped' WHERE id = %s "
                        "AND state <> 'done'",
                        (request_id,),
                    )
                    return ControlReply(gone)
            if now >= deadline:
                phase = self._latest(conn, request.run)[1]
                return ControlReply(
                    ControlResult(
                        outcome=Outcome.QUEUED,
                        phase=phase,
                        message=f"the runner of run {request.run!r} did not answer within "
                        f"{timeout:g} s (is its event loop blocked?); the request is recorded "
                        f"(#{request_id}) and will be applied when it reads it",
                    )
                )
            # Woken by the runner's NOTIFY on any reply; the row says whether it is ours.
            wait = max(0.0, min(next_check, deadline) - now)
            for _ in conn.notifies(timeout=wait, stop_after=1):
                pass

    def _runner_gone(self, conn: Conn, run: str) -> ControlResult | None:
        attempt, phase = self._latest(conn, run)
        if not RunPhase(phase).terminal:
            self._reconcile(conn, run)
            attempt, phase = self._latest(conn, run)
            if phase == RunPhase.CRASHED.value:
                return ControlResult(
                    outcome=Outcome.ALREADY_ENDED,
                    phase=phase,
                    message=f"the runner of run {run!r} is gone; the run is recorded CRASHED",
                )
            return None
        del attempt
        return ControlResult(
            outcome=Outcome.ALREADY_ENDED,
            phase=phase,
            message=f"run {run!r} already finished: {phase}",
        )


def _event_rows(conn: Conn, name: str, attempt: int, cursor: int) -> list[tuple[Any, ...]]:
    found = conn.execute(EVENTS_AFTER, {"run": name, "attempt": attempt, "cursor": cursor})
    return with_routine(found, cursor)
