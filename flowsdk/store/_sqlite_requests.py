"""The SQLite store's control channel (SPEC §6): requests to a live runner, and their replies.

A mixin of `SQLiteStore`. A request is committed as a row first, so it is
never lost; the requester then polls the row for the runner's reply, checking
every 0.2 s whether the runner is gone. A refused request on an ended run is
written to its event log here (no runner writes that log any more). The
requests a live runner has not answered yet are read back here too
(`queued_requests`).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Protocol

from msgspec.structs import astuple

from flowsdk._phases import RunPhase
from flowsdk._records import (
    ControlReply,
    ControlRequest,
    ControlResult,
    EventRow,
    Outcome,
)
from flowsdk.errors import RunNotFoundError
from flowsdk.store._base import QueuedRequest, dropped_reply
from flowsdk.store._rows import queued_from_rows, queued_query
from flowsdk.store._sqlite_holds import runner_alive
from flowsdk.store._sqlite_schema import (
    ANSWER_POLL,
    INSERT_EVENT,
    LAST_SEQ,
    owner_decoder,
    reply_decoder,
    request_encoder,
    rollback,
    translate,
)

__all__ = ["SQLiteRequests"]

_QUEUED = queued_query("", "?")


class _Store(Protocol):
    """What the request methods need of `SQLiteStore`."""

    path: str

    def connect(self, *, create: bool) -> sqlite3.Connection | None: ...

    def _read(self) -> sqlite3.Connection | None: ...

    def _no_runs(self, name: str) -> str: ...

    def _not_found(
        self, conn: sqlite3.Connection, name: str, attempt: int | None
    ) -> RunNotFoundError: ...

    def _latest(
        self, conn: sqlite3.Connection, name: str
    ) -> tuple[int, str, bytes | None, float]: ...

    def _mark_gone(
        self, conn: sqlite3.Connection, name: str, attempt: int, heartbeat: float | None
    ) -> bool: ...

    def _runner_gone(self, conn: sqlite3.Connection, run: str) -> ControlResult | None: ...


class SQLiteRequests:
    """Control-channel methods of `SQLiteStore` (`ControlChannel`, `Store.note_request`)."""

    def request(self: _Store, request: ControlRequest, *, timeout: float) -> ControlReply:
        """Hand a control request to the run's runner and wait for its reply.

        The request is committed first, so it is never lost: if the runner does
        not answer in time, the reply is `queued` and the request is applied
        when the runner reads it.
        """
        conn = self.connect(create=True)
        assert conn is not None
        try:
            with translate(self.path):
                # Never copy the write-ahead log back into the file on this commit
                # (SQLite does it on whichever commit finds 1,000 pages logged: tens
                # of ms): the live runner's writer does it between its rounds.
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute(
                    "INSERT INTO requests (run, at, body) VALUES (?, ?, ?)",
                    (request.run, time.time(), request_encoder.encode(request)),
                )
                conn.execute("COMMIT")
                request_id = cur.lastrowid
                deadline = time.monotonic() + timeout
                next_check = time.monotonic() + 0.2
                while True:
                    row = conn.execute(
                        "SELECT state, answer FROM requests WHERE id = ?", (request_id,)
                    ).fetchone()
                    if row[0] == "done":
                        return reply_decoder.decode(row[1])
                    if row[0] == "dropped":  # by the next attempt: for an ended one
                        return dropped_reply(request.run)
                    now = time.monotonic()
                    if now >= next_check:
                        next_check = now + 0.2
                        gone = self._runner_gone(conn, request.run)
                        if gone is not None:
                            conn.execute(
                                "UPDATE requests SET state = 'dropped' WHERE id = ?", (request_id,)
                            )
                            return ControlReply(gone)
                    if now >= deadline:
                        phase = self._latest(conn, request.run)[1]
                        return ControlReply(
                            ControlResult(
                                outcome=Outcome.QUEUED,
                                phase=phase,
                                message=f"the runner of run {request.run!r} did not answer "
                                f"within {timeout:g} s (is its event loop blocked?); the request "
                                f"is recorded (#{request_id}) and will be applied when it reads it",
                            )
                        )
                    time.sleep(ANSWER_POLL)
        finally:
            conn.close()

    def queued_requests(self: _Store, name: str) -> list[QueuedRequest]:
        """Return the requests to a run its runner has not answered yet, oldest first.

        One keyed statement when there is none (what `watch` reads every poll);
        when there are some, the run's runner is checked too, as `run_state`
        does: one that is gone never answers them, so none is listed (and its
        run is recorded CRASHED, unless this process cannot write the store).
        """
        conn = self._read()
        if conn is None:
            raise RunNotFoundError(self._no_runs(name))
        with translate(self.path):
            rows = conn.execute(_QUEUED, (name, name)).fetchall()
            found = queued_from_rows(rows, lambda: self._runner_gone(conn, name) is not None)
            if found is None:
                raise self._not_found(conn, name, None)
        return found

    def _runner_gone(self: _Store, conn: sqlite3.Connection, run: str) -> ControlResult | None:
        attempt, phase, owner, heartbeat = self._latest(conn, run)
        if RunPhase(phase).terminal:
            return ControlResult(
                outcome=Outcome.ALREADY_ENDED,
                phase=phase,
                message=f"run {run!r} already finished: {phase}",
            )
        if owner is not None and not runner_alive(
            self.path, run, attempt, owner_decoder.decode(owner), heartbeat
        ):
            self._mark_gone(conn, run, attempt, heartbeat)
            return ControlResult(
                outcome=Outcome.ALREADY_ENDED,
                phase=RunPhase.CRASHED.value,
                message=f"the runner of run {run!r} is gone; the run is recorded CRASHED",
            )
        return None

    def note_request(
        self: _Store, name: str, action: str | None, message: str, requested_by: str
    ) -> None:
        """Append a `request` event to the latest attempt of an ended run."""
        conn = self.connect(create=False)
        if conn is None:
            return
        try:
            with translate(self.path):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    attempt = self._latest(conn, name)[0]
                    last = conn.execute(LAST_SEQ, {"run": name, "attempt": attempt}).fetchone()
                    seq = last[0] + 1
                    row = EventRow(
                        seq, time.time(), "request", action, None, None, None, requested_by, message
                    )
                    conn.execute(INSERT_EVENT, (name, attempt, *astuple(row)))
                    conn.execute("COMMIT")
                except BaseException:
                    rollback(conn)
                    raise
        finally:
            conn.close()
