"""The thread that records one live run in SQLite and carries its control requests.

It owns one connection. It writes the run's changes in batched transactions
(at most `MAX_BATCH` changes each), keeps the runner's heartbeat, watches
`PRAGMA data_version` for control requests from other processes and hands
them to the run's loop, and holds new actions back when it falls far behind
(`HIGH_WATER`). The event loop only ever appends to a deque.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

import msgspec

from flowsdk._liveness import HEARTBEAT_INTERVAL, this_process
from flowsdk._records import (
    ControlRequest,
    RunRecord,
)
from flowsdk.errors import (
    RunExistsError,
    StoreError,
    StoreLockedError,
)
from flowsdk.store._base import ControlAnswer, RequestHandler

if TYPE_CHECKING:
    from flowsdk._run import Run

from flowsdk.store._sqlite_schema import (
    ACTION_COLUMNS,
    HIGH_WATER,
    LOOP_BLOCKED_WARNING,
    LOW_WATER,
    MAX_BATCH,
    POLL_INTERVAL,
    _Answer,
    _request_decoder,
    _ts,
    translate,
)

if TYPE_CHECKING:
    from flowsdk.store._sqlite import SQLiteStore

__all__ = ["RunWriter"]

logger = logging.getLogger("flowsdk")


class RunWriter:
    """The thread that writes one live run to SQLite and carries its control requests."""

    streams = True

    def __init__(
        self,
        store: SQLiteStore,
        record: RunRecord,
        loop: asyncio.AbstractEventLoop,
        handler: RequestHandler,
    ) -> None:
        self._store = store
        self._record = record
        self._loop = loop
        self._handler = handler
        self._ops: collections.deque[tuple[int, Any]] = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._error: BaseException | None = None
        self._probe_sent: float | None = None
        self._relief: list[asyncio.Future[None]] = []
        self.started: asyncio.Future[None] = loop.create_future()
        self._finished: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._main, name=f"flowsdk-run-{record.name}", daemon=True
        )
        self._thread.start()

    # Called on the event loop: only appends to a deque (thread-safe, never blocks).
    def action(self, row: tuple[Any, ...]) -> None:
        """Record an action's state row."""
        self._ops.append((0, row))

    def event(self, row: tuple[Any, ...]) -> None:
        """Append an event row."""
        self._ops.append((1, row))

    def run(self, record: RunRecord) -> None:
        """Record the run's state; written promptly."""
        self._ops.append((2, record))
        self._wake.set()

    def finished(self, run: Run[Any]) -> None:
        """Nothing to do: every change was streamed already."""

    def congested(self) -> bool:
        """Whether the writer is far behind the run (see `HIGH_WATER`)."""
        return len(self._ops) > HIGH_WATER

    async def relieved(self) -> None:
        """Wait until the writer is back under `LOW_WATER` unwritten changes."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._relief.append(fut)
        self._wake.set()
        await fut

    async def cache_get(self, task: str, version: str, digest: str) -> bytes | None:
        """Look up the cache on the recorder's thread (the loop does not wait on SQLite)."""
        fut: asyncio.Future[bytes | None] = self._loop.create_future()
        self._ops.append((4, (task, version, digest, fut)))
        self._wake.set()
        return await fut

    def cache_put(self, task: str, version: str, digest: str, output: bytes) -> None:
        """Remember an output; written with the next batch."""
        self._ops.append((5, (task, version, digest, output, time.time())))

    async def stopped(self) -> None:
        """Wait for the thread to end (after it failed to create the run)."""
        await asyncio.shield(self._finished)
        self._thread.join()

    async def close(self) -> None:
        """Flush everything, stop the thread; raise `StoreError` if a write failed."""
        self._closing = True
        self._wake.set()
        await asyncio.shield(self._finished)
        self._thread.join()
        if self._error is not None:
            err = self._error
            self._error = None
            if isinstance(err, StoreError):
                raise err
            raise StoreError(
                f"writing run {self._record.name!r} to {self._store.path} failed: {err}"
            ) from err

    # -- the thread ------------------------------------------------------------------

    def _signal(self, fut: asyncio.Future[None], exc: BaseException | None = None) -> None:
        self._settle(fut, None, exc)

    def _main(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            try:
                conn = self._store.connect(create=True)
                assert conn is not None
                self._insert_run(conn)
            except BaseException as exc:
                self._signal(self.started, exc)
                return
            self._signal(self.started)
            self._serve(conn)
        except BaseException as exc:  # a failed write: reported by close()
            self._error = exc
            logger.error("run %s: writing to the store failed: %s", self._record.name, exc)
        finally:
            if conn is not None:
                conn.close()
            for fut in self._relief:  # nothing more will be written: nobody waits
                self._settle(fut, None, None)
            self._signal(self._finished)

    def _insert_run(self, conn: sqlite3.Connection) -> None:
        r = self._record
        owner = msgspec.msgpack.encode(this_process())
        with translate(self._store.path):
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT INTO runs (name, attempt, phase, started_at, task, owner, heartbeat) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        r.name,
                        r.attempt,
                        r.phase.value,
                        _ts(r.started_at),
                        r.task,
                        owner,
                        time.time(),
                    ),
                )
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK")
                raise RunExistsError(
                    f"a run named {r.name!r} already exists in {self._store.path}"
                    + (f" (attempt {r.attempt})" if r.attempt > 1 else "")
                    + "; choose another name"
                ) from None
            conn.execute("COMMIT")

    def _serve(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        self._poll_requests(conn)
        next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        while True:
            self._wake.wait(POLL_INTERVAL)
            self._wake.clear()
            closing = self._closing
            self._flush(conn)
            now_version = conn.execute("PRAGMA data_version").fetchone()[0]
            if now_version != version:
                # Under another writer's lock the requests stay pending: next round.
                with contextlib.suppress(StoreLockedError):
                    self._poll_requests(conn)
                    version = now_version
            if time.monotonic() >= next_heartbeat:
                next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
                self._probe_loop()
                # A heartbeat lost to a lock is replaced by the next one.
                with contextlib.suppress(StoreLockedError):
                    self._write(
                        conn,
                        lambda: conn.execute(
                            "UPDATE runs SET heartbeat = ? WHERE name = ? AND attempt = ?",
                            (time.time(), self._record.name, self._record.attempt),
                        ),
                    )
            if closing and not self._ops:
                return

    def _probe_loop(self) -> None:
        # Cancellation is cooperative: a body that blocks the loop (time.sleep in
        # an async def) delays every abort. Measure how long a callback waits for
        # the loop and say so once it runs again.
        if self._probe_sent is not None:
            return  # the previous probe has not run yet: the loop is still blocked
        sent = self._probe_sent = time.monotonic()

        def probe() -> None:
            self._probe_sent = None
            lag = time.monotonic() - sent
            if lag >= LOOP_BLOCKED_WARNING:
                logger.warning(
                    "run %s: the event loop was blocked for %.1f s; control requests and "
                    "cancellation wait until the loop regains control (is a task body calling "
                    "blocking code such as time.sleep?)",
                    self._record.name,
                    lag,
                )

        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(probe)

    def _write(self, conn: sqlite3.Connection, body: Any) -> None:
        with translate(self._store.path):
            conn.execute("BEGIN IMMEDIATE")
            try:
                body()
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _flush(self, conn: sqlite3.Connection) -> None:
        ops = self._ops
        if not ops:
            return
        # Bounded transactions: a busy run never holds the write lock for long,
        # so a control request from another process gets in between two of
        # them, and is read between them too (the loop comes back at once).
        batch: list[tuple[int, Any]] = []
        while ops and len(batch) < MAX_BATCH:
            batch.append(ops.popleft())
        if ops:
            self._wake.set()
        name, attempt = self._record.name, self._record.attempt
        actions: dict[str, tuple[Any, ...]] = {}
        events: list[tuple[Any, ...]] = []
        run: RunRecord | None = None
        answers: list[tuple[Any, ...]] = []
        cached: list[tuple[Any, ...]] = []
        lookups: list[tuple[Any, ...]] = []
        for kind, payload in batch:
            if kind == 0:
                actions[payload[0]] = (name, attempt, *payload)
            elif kind == 1:
                events.append((name, attempt, *payload))
            elif kind == 2:
                run = payload
            elif kind == 3:
                answers.append(payload)
            elif kind == 4:
                lookups.append(payload)
            else:
                cached.append(payload)

        def body() -> None:
            if actions:
                conn.executemany(
                    f"INSERT OR REPLACE INTO actions (run, run_attempt, {ACTION_COLUMNS}) VALUES "
                    f"({', '.join('?' * 23)})",
                    actions.values(),
                )
            if events:
                conn.executemany(
                    "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", events
                )
            if run is not None:
                stop = run.stop
                conn.execute(
                    "UPDATE runs SET phase = ?, ended_at = ?, stop_mode = ?, stop_reason = ?, "
                    "stop_by = ?, stop_at = ?, heartbeat = ? WHERE name = ? AND attempt = ?",
                    (
                        run.phase.value,
                        _ts(run.ended_at),
                        stop.mode.value if stop else None,
                        stop.reason if stop else None,
                        stop.requested_by if stop else None,
                        _ts(stop.requested_at) if stop else None,
                        time.time(),
                        name,
                        attempt,
                    ),
                )
            if answers:
                conn.executemany(
                    "UPDATE requests SET state = 'done', answer = ?, answered_at = ? WHERE id = ?",
                    answers,
                )
            if cached:
                conn.executemany("INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?, ?)", cached)

        try:
            self._write(conn, body)
        except StoreLockedError:
            # Keep the batch (in order) for the next round; nothing is dropped.
            ops.extendleft(reversed(batch))
            if self._closing:
                raise
            return
        # Answered after the batch's own writes, so a lookup sees what the same
        # run cached a moment before.
        for lookup in lookups:
            self._cache_lookup(conn, *lookup)
        if self._relief and len(ops) < LOW_WATER:
            waiting, self._relief = self._relief, []
            for fut in waiting:
                self._settle(fut, None, None)

    def _cache_lookup(
        self,
        conn: sqlite3.Connection,
        task: str,
        version: str,
        digest: str,
        fut: asyncio.Future[bytes | None],
    ) -> None:
        try:
            with translate(self._store.path):
                row = conn.execute(
                    "SELECT output FROM cache WHERE task = ? AND version = ? AND digest = ?",
                    (task, version, digest),
                ).fetchone()
        except StoreError as exc:
            self._settle(fut, None, exc)
            return
        self._settle(fut, row[0] if row else None, None)

    def _settle(self, fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
        def settle() -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(settle)

    def _poll_requests(self, conn: sqlite3.Connection) -> None:
        name = self._record.name
        with translate(self._store.path):
            rows = conn.execute(
                "SELECT id, body FROM requests WHERE run = ? AND state = 'pending' ORDER BY id",
                (name,),
            ).fetchall()
        if not rows:
            return
        self._write(
            conn,
            lambda: conn.executemany(
                "UPDATE requests SET state = 'delivered' WHERE id = ? AND state = 'pending'",
                [(r[0],) for r in rows],
            ),
        )
        for request_id, body in rows:
            try:
                request = _request_decoder.decode(body)
            except msgspec.DecodeError:
                self._answer(
                    request_id, ControlAnswer("refused", "", "the request could not be read")
                )
                continue
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._apply, request_id, request)

    def _apply(self, request_id: int, request: ControlRequest) -> None:
        # On the event loop: apply the request to the live run, then answer it.
        try:
            answer = self._handler(request)
        except Exception as exc:  # a bug must not kill the run; answer it instead
            logger.exception("run %s: applying %r failed", self._record.name, request)
            answer = ControlAnswer("refused", "", f"the runner could not apply the request: {exc}")
        self._answer(request_id, answer)

    def _answer(self, request_id: int, answer: ControlAnswer) -> None:
        body = msgspec.msgpack.encode(_Answer(answer.outcome, answer.phase, answer.message))
        self._ops.append((3, (body, time.time(), request_id)))
        self._wake.set()
