"""The thread that records one live run in a SQL store and carries its control requests.

Dialect-neutral: what is SQL-specific (statements, error translation, how a
request is noticed) sits behind a `Dialect`; SQLite has one, and a second SQL
store writes only its own. The thread owns one connection. It writes the
run's changes in batched transactions (at most `MAX_BATCH` changes each),
keeps the runner's heartbeat, hands control requests to the run's loop and
writes their replies, and holds new actions back when it falls far behind
(`HIGH_WATER`). The event loop only ever appends to a deque, or to what it holds.

Action changes and events are held on the loop and handed over once a round
(`HeldChanges`, in `_held`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from flowsdk import _liveness
from flowsdk._liveness import HEARTBEAT_INTERVAL
from flowsdk._records import (
    ActionRow,
    ControlReply,
    ControlRequest,
    ControlResult,
    EventRow,
    LogRow,
    Outcome,
    ProgressRow,
    RunRecord,
)
from flowsdk.errors import ActionNotFoundError, StoreError, StoreLockedError
from flowsdk.store._base import RequestHandler, StoredRun
from flowsdk.store._batch import Batch, escape_text
from flowsdk.store._held import EVENT as _EVENT
from flowsdk.store._held import LOOP_BLOCKED_WARNING, HeldChanges
from flowsdk.store._rows import RoutineEvent

__all__ = ["HIGH_WATER", "LOW_WATER", "MAX_BATCH", "Dialect", "RunLost", "RunWriter"]

logger = logging.getLogger("flowsdk")

POLL_INTERVAL = 0.01  # how often a runner looks for control requests (and flushes)
MAX_BATCH = 4000  # changes written per transaction, at most
# Backpressure: past HIGH_WATER unwritten changes, new actions wait until the
# writer is back under LOW_WATER. A run cannot outrun its store without bound
# (memory, and the delay before a control request is answered).
HIGH_WATER = 20_000
LOW_WATER = 5_000

C = TypeVar("C")

_request_decoder = msgspec.msgpack.Decoder(ControlRequest)
_reply_encoder = msgspec.msgpack.Encoder()

# What the loop appends to the writer's deque: (kind, payload), or a row or routine event (`_held`).
_RUN, _REPLY, _LOOKUP, _CACHE, _PROGRESS, _LOG = range(2, 8)


class RunLost(StoreError):
    """The run was recorded `CRASHED` by another process while this runner lived on.

    That happens when its heartbeat went stale as seen from another host (the
    runner was paused, or cut off). Its work may already be running again in a
    retry, so this runner stops its bodies and writes nothing over the crash
    record but one event.
    """


class Dialect(Protocol[C]):
    """What the writer needs from one SQL database; `C` is its connection type.

    Every method runs on the writer's thread. A method that finds the store
    locked raises `StoreLockedError` (the writer keeps its changes and tries
    again); any other failure raises a `StoreError` naming the cause.
    """

    location: str
    """The store as shown in messages (a path, a URL without its password)."""

    def connect(self) -> C:
        """Open (creating the store if needed) the writer's connection."""

    def close(self, conn: C) -> None:
        """Close the connection."""

    def let_go(self, final: bool) -> None:
        """The run is over here (bodies stopped, writer ended): show others it is not held.

        `final`: its records are final (else its last writes failed: a reader records
        it CRASHED). Called on the run's loop.
        """

    def insert_run(
        self, conn: C, record: RunRecord, actions: list[ActionRow], events: list[EventRow]
    ) -> None:
        """Create the run's row, owned by this process, with its first rows, in one transaction.

        Raises:
            RunExistsError: that run (attempt) exists already.
        """

    def write(self, conn: C, name: str, attempt: int, batch: Batch) -> None:
        """Write one batch in one transaction.

        Raises:
            RunLost: the run is recorded `CRASHED`: nothing was written.
        """

    def heartbeat(self, conn: C, name: str, attempt: int) -> None:
        """Renew the runner's heartbeat.

        Raises:
            RunLost: the run is recorded `CRASHED`: nothing was written.
        """

    def note(self, conn: C, name: str, attempt: int, message: str) -> None:
        """Append one `warning` event to a run (after its crash record)."""

    def requests_may_be_waiting(self, conn: C) -> bool:
        """Whether another process may have sent a request since the last call (cheap)."""

    def claim_requests(self, conn: C, name: str) -> list[tuple[int, bytes]]:
        """Take the run's pending requests (id, body), so no other reader applies them."""

    def cache_lookup(self, conn: C, task: str, version: str, digest: str) -> bytes | None:
        """Return a cached output, if any."""

    def idle(self, conn: C) -> None:
        """A round found nothing to write: the store's housekeeping, while nobody waits."""


class RunWriter(HeldChanges, Generic[C]):
    """The thread that writes one live run through a `Dialect` and carries its requests."""

    streams = True

    def __init__(
        self,
        dialect: Dialect[C],
        record: RunRecord,
        loop: asyncio.AbstractEventLoop,
        handler: RequestHandler,
        *,
        first: tuple[list[ActionRow], list[EventRow]] = ([], []),
        fail_wait: float = 5.0,
        final_wait: float = 50.0,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self._dialect = dialect
        self._on_lost = on_lost
        self._first = first
        # How long the run's last writes may wait for a lock (SPEC §5: ten busy timeouts).
        self._final_wait = final_wait
        # How long a write that fails (not a lock) is tried again before the run is given up.
        self._fail_wait = fail_wait
        self._failing_since: float | None = None
        self._retry_delay = 0.05
        self._final_deadline: float | None = None
        self._lock_warned_at = 0.0
        self._record = record
        self._handler = handler
        super().__init__(loop)
        self._wake = threading.Event()
        self._closing = False
        self._error: BaseException | None = None
        self._probe_sent: float | None = None
        # This thread's own lateness (it waits POLL_INTERVAL at a time): when it
        # was as late as the loop, the whole process was not scheduled.
        self._waiting_since: float | None = None
        self._late = 0.0
        self._relief: list[asyncio.Future[None]] = []
        # The runner starts no new body after `lease_until` until its heartbeat is
        # renewed (`renewed`): the futures of the bodies waiting for that.
        self.lease_until = time.time() + _liveness.HOLD_AFTER
        self._holding: list[asyncio.Future[None]] = []
        self.started: asyncio.Future[None] = loop.create_future()
        self._finished: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._main, name=f"flowsdk-run-{record.name}", daemon=True
        )
        self._thread.start()

    # Called on the event loop: only appends to a deque (thread-safe, never blocks).
    def progress(self, row: ProgressRow) -> None:
        """Record one progress report (written with the next batch)."""
        self._ops.append((_PROGRESS, row))

    def log(self, row: LogRow) -> None:
        """Record one log record (written with the next batch; any thread)."""
        self._ops.append((_LOG, row))

    def run(self, record: RunRecord) -> None:
        """Record the run's state; written promptly."""
        self._send_held()
        self._ops.append((_RUN, record))
        self._wake.set()

    def finished(self, stored: StoredRun) -> None:
        """Nothing to do: every change was streamed already."""

    def congested(self) -> bool:
        """Whether the writer is far behind the run (see `HIGH_WATER`)."""
        return len(self._ops) + len(self._held_events) > HIGH_WATER

    async def relieved(self) -> None:
        """Wait until the writer is back under `LOW_WATER` unwritten changes."""
        self._send_held()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._relief.append(fut)
        self._wake.set()
        await fut

    async def renewed(self) -> None:
        """Wait until the heartbeat is renewed (at once); the first body to wait says why.

        Older than `HOLD_AFTER`, the runner was paused or could not write: another host
        may have retried its run, and a body started now could do its work twice (SPEC
        §5). Found `CRASHED` instead, the run's bodies are cancelled (`RunLost`).
        """
        if not self._holding:
            logger.warning(
                "run %s: its heartbeat was last renewed %.1f s ago (the process was paused, "
                "or the store was locked); new actions wait until it is renewed, so that "
                "no work runs twice if another host took this runner for dead",
                self._record.name,
                time.time() - self.lease_until + _liveness.HOLD_AFTER,
            )
        fut: asyncio.Future[None] = self._loop.create_future()
        self._holding.append(fut)
        self._wake.set()
        await fut

    async def cache_get(self, task: str, version: str, digest: str) -> bytes | None:
        """Look up the cache on the writer's thread (the loop never waits on the database)."""
        fut: asyncio.Future[bytes | None] = self._loop.create_future()
        self._ops.append((_LOOKUP, (task, version, digest, fut)))
        self._wake.set()
        return await fut

    def cache_put(self, task: str, version: str, digest: str, output: bytes) -> None:
        """Remember an output; written with the next batch."""
        self._ops.append((_CACHE, (task, version, digest, output, time.time())))

    async def stopped(self) -> None:
        """Wait for the thread to end (after it failed to create the run)."""
        await asyncio.shield(self._finished)
        self._thread.join()
        self._dialect.let_go(final=True)  # nothing recorded

    async def close(self) -> None:
        """Flush everything, stop the thread; raise `StoreError` if a write failed."""
        self._send_held()
        self._closing = True
        self._wake.set()
        await asyncio.shield(self._finished)
        self._thread.join()
        self._dialect.let_go(final=self._error is None)
        if self._error is not None:
            err = self._error
            self._error = None
            if isinstance(err, StoreError):
                raise err
            raise StoreError(
                f"writing run {self._record.name!r} to {self._dialect.location} failed: {err}"
            ) from err

    # -- the thread ------------------------------------------------------------------

    def _main(self) -> None:
        conn: C | None = None
        try:
            try:
                conn = self._dialect.connect()
                began = time.time()
                self._dialect.insert_run(conn, self._record, *self._first)
            except BaseException as exc:
                self._settle(self.started, None, exc)
                return
            self.lease_until = began + _liveness.HOLD_AFTER  # the first heartbeat: the run row
            self._settle(self.started, None, None)
            try:
                self._serve(conn)
            except RunLost as lost:
                self._error = lost
                self._lost(conn, lost)
        except BaseException as exc:  # a failed write: reported by close()
            self._error = exc
            logger.error("run %s: writing to the store failed: %s", self._record.name, exc)
            # A run is never left running unrecorded: its bodies are stopped.
            if self._on_lost is not None and not self._closing:
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(
                        self._on_lost, f"the store could not be written: {exc}"
                    )
        finally:
            if conn is not None:
                self._dialect.close(conn)
            # Nothing more will be written: nobody waits. (A body waiting for the
            # heartbeat was cancelled first, with the run's other bodies: `on_lost`.)
            for fut in (*self._relief, *self._holding):
                self._settle(fut, None, None)
            self._settle(self._finished, None, None)

    def _serve(self, conn: C) -> None:
        dialect = self._dialect
        name, attempt = self._record.name, self._record.attempt
        with contextlib.suppress(StoreLockedError):
            self._take_requests(conn)
        next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        while True:
            began = self._waiting_since = time.monotonic()
            cpu = time.process_time()
            self._wake.wait(POLL_INTERVAL)
            self._waiting_since = None
            self._check_scheduled(began, cpu)
            self._wake.clear()
            closing = self._closing
            if not self._flush(conn) and not closing:
                # Housekeeping that fails loses nothing (the changes are written
                # already); a store in trouble fails the next write, which says so.
                with contextlib.suppress(StoreError):
                    dialect.idle(conn)
            # After the flush: the loop's answer is written next round.
            self._ask_for_held()
            # Under another writer's lock the requests stay pending: next round.
            with contextlib.suppress(StoreLockedError):
                if dialect.requests_may_be_waiting(conn):
                    self._take_requests(conn)
            if self._holding or time.monotonic() >= next_heartbeat:
                next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
                self._probe_loop()
                # A heartbeat lost to a lock is replaced by the next one.
                with contextlib.suppress(StoreLockedError):
                    dialect.heartbeat(conn, name, attempt)
                    self._renewed(time.time())  # written just now (a wait for the lock before)
            if closing and not self._ops:
                return

    def _renewed(self, at: float) -> None:
        """The heartbeat written by `at` is renewed: bodies may start until `HOLD_AFTER` on."""
        self.lease_until = at + _liveness.HOLD_AFTER
        if self._holding:
            waiting, self._holding = self._holding, []
            for fut in waiting:
                self._settle(fut, None, None)

    def _lost(self, conn: C, lost: RunLost) -> None:
        """Stop recording: one event, tell the run, then drop every change until the end."""
        name, attempt = self._record.name, self._record.attempt
        message = (
            f"this runner (pid {os.getpid()}) found run {name!r} recorded CRASHED: its "
            "heartbeat went stale as seen from another host; it cancelled its bodies and "
            "recorded nothing more"
        )
        logger.error("run %s: %s", name, message)
        with contextlib.suppress(StoreError):
            self._dialect.note(conn, name, attempt, message)
        if self._on_lost is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_lost, str(lost))
        for fut in self._relief:
            self._settle(fut, None, None)
        self._relief = []
        while True:  # the run's teardown still appends changes: let them go
            self._wake.wait(POLL_INTERVAL)
            self._wake.clear()
            closing = self._closing
            while self._ops:
                op = self._ops.popleft()
                if type(op) is tuple and op[0] == _LOOKUP:
                    self._settle(op[1][3], None, None)
            if closing:
                return

    def _check_scheduled(self, began: float, cpu: float) -> None:
        """Say so when this thread woke far later than it asked and the process used no CPU.

        Neither a body nor the GIL delays this thread's wake-up (it waits in
        `Event.wait`, without the GIL): the process itself was stopped
        (SIGSTOP, Ctrl-Z) or not given a CPU. Liveness on this host does not
        depend on it (it is judged by the process, SPEC §5).
        """
        late = time.monotonic() - began - POLL_INTERVAL
        self._late = max(self._late, late)
        if late >= LOOP_BLOCKED_WARNING and time.process_time() - cpu < late / 4:
            logger.warning(
                "run %s: the process was not scheduled for %.1f s (stopped, or the machine "
                "is overloaded); control requests and cancellation waited meanwhile",
                self._record.name,
                late,
            )

    def _probe_loop(self) -> None:
        # Cancellation is cooperative: a body that blocks the loop (time.sleep in
        # an async def) delays every abort. Measure how long a callback waits for
        # the loop and say so once it runs again.
        if self._probe_sent is not None:
            return  # the previous probe has not run yet: the loop is still blocked
        sent = self._probe_sent = time.monotonic()
        cpu = time.process_time()
        self._late = 0.0

        def probe() -> None:
            self._probe_sent = None
            now = time.monotonic()
            lag = now - sent
            if lag < LOOP_BLOCKED_WARNING:
                return
            waiting = self._waiting_since
            late = max(self._late, now - waiting - POLL_INTERVAL if waiting is not None else 0)
            if time.process_time() - cpu < lag / 4 and late > lag / 2:
                # This thread was as late as the loop and no CPU was used: the
                # process was not scheduled (`_check_scheduled` says so), no body
                # blocked the loop.
                return
            logger.warning(
                "run %s: the event loop was blocked for %.1f s; control requests and "
                "cancellation wait until the loop regains control (a task body calling "
                "blocking code such as time.sleep does this, and so do tens of thousands of "
                "actions made ready at once)",
                self._record.name,
                lag,
            )

        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(probe)

    def _flush(self, conn: C) -> bool:
        """Write the next batch of changes; return whether there was one."""
        ops = self._ops
        if not ops:
            return False
        # Bounded transactions: a busy run never holds the write lock for long,
        # so a control request from another process gets in between two of
        # them, and is read between them too (the loop comes back at once).
        taken: list[Any] = []
        while ops and len(taken) < MAX_BATCH:
            taken.append(ops.popleft())
        self._answer_left -= len(taken)
        if ops:
            self._wake.set()
        batch = Batch()
        lookups: list[Any] = []
        for op in taken:
            queued = type(op)  # the two commonest operations come without a kind (`_held`)
            if queued is RoutineEvent:
                batch.routine.append(op)
                continue
            if queued is ActionRow:
                batch.actions[op.name] = op
                continue
            kind, payload = op
            if kind == _EVENT:
                batch.events.append(payload)
            elif kind == _PROGRESS:
                batch.progress.append(payload)
            elif kind == _LOG:
                batch.logs.append(payload)
            elif kind == _RUN:
                batch.run = payload
            elif kind == _REPLY:
                batch.replies.append(payload)
            elif kind == _LOOKUP:
                lookups.append(payload)
            else:
                batch.cached.append(payload)
        try:
            try:
                self._dialect.write(conn, self._record.name, self._record.attempt, batch)
            except UnicodeEncodeError:
                # Text from the workflow that UTF-8 cannot hold (a lone surrogate, as
                # `os.fsdecode` makes of a file name's bytes): written again, made
                # visible (`_batch.escape_text`). The first try was rolled back.
                escape_text(batch)
                self._dialect.write(conn, self._record.name, self._record.attempt, batch)
        except StoreLockedError:
            # Keep the changes (in order) for the next round; nothing is dropped.
            ops.extendleft(reversed(taken))
            if self._closing:
                self._wait_for_final_writes()
            return True
        except RunLost:
            raise
        except StoreError as exc:
            # Disk full, an I/O error: keep the changes and try again with backoff,
            # for up to the busy timeout (ten of them for the last writes).
            ops.extendleft(reversed(taken))
            self._back_off(exc)
            return True
        self._failing_since = None
        # Answered after the batch's own writes, so a lookup sees what the same
        # run cached a moment before.
        for task, version, digest, fut in lookups:
            try:
                found = self._dialect.cache_lookup(conn, task, version, digest)
            except StoreError as exc:
                self._settle(fut, None, exc)
            else:
                self._settle(fut, found, None)
        if self._relief and len(ops) < LOW_WATER:
            waiting, self._relief = self._relief, []
            for fut in waiting:
                self._settle(fut, None, None)
        return True

    def _back_off(self, exc: StoreError) -> None:
        """Wait before writing again after a failed write; raise `exc` once past the limit."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._retry_delay = 0.05
            logger.warning(
                "run %s: writing to %s failed (%s); trying again for up to %g s",
                self._record.name,
                self._dialect.location,
                exc,
                self._final_wait if self._closing else self._fail_wait,
            )
        limit = self._final_wait if self._closing else self._fail_wait
        if now - self._failing_since >= limit:
            raise exc
        time.sleep(self._retry_delay)
        self._retry_delay = min(self._retry_delay * 2, 1.0)

    def _wait_for_final_writes(self) -> None:
        """The run has ended but the store is locked: keep trying, and say so, for a while.

        Raises:
            StoreLockedError: still locked after `final_wait` seconds.
        """
        now = time.monotonic()
        if self._final_deadline is None:
            self._final_deadline = now + self._final_wait
        if now >= self._final_deadline:
            raise StoreLockedError(
                f"the run {self._record.name!r} has ended but {self._dialect.location} stayed "
                f"locked for {self._final_wait:g} s; its last changes could not be recorded"
            )
        if now - self._lock_warned_at >= 5.0:
            self._lock_warned_at = now
            logger.warning(
                "run %s: has ended; waiting for the lock on %s to record its last changes "
                "(up to %.0f s more)",
                self._record.name,
                self._dialect.location,
                self._final_deadline - now,
            )

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

    def _take_requests(self, conn: C) -> None:
        for request_id, body in self._dialect.claim_requests(conn, self._record.name):
            try:
                request = _request_decoder.decode(body)
            except msgspec.DecodeError:
                self._reply(request_id, _refused("the request could not be read"))
                continue
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._apply, request_id, request)

    def _apply(self, request_id: int, request: ControlRequest) -> None:
        # On the event loop: apply the request to the live run, then reply.
        try:
            reply = ControlReply(self._handler(request))
        except ActionNotFoundError as exc:
            reply = ControlReply(not_found=str(exc))
        except Exception as exc:  # a bug must not kill the run; answer the request instead
            logger.exception("run %s: applying %r failed", self._record.name, request)
            reply = _refused(f"the runner could not apply the request: {exc}")
        self._send_held()  # what the request changed is written no later than the reply
        self._reply(request_id, reply)

    def _reply(self, request_id: int, reply: ControlReply) -> None:
        self._ops.append((_REPLY, (request_id, _reply_encoder.encode(reply))))
        self._wake.set()


def _refused(message: str) -> ControlReply:
    return ControlReply(ControlResult(outcome=Outcome.REFUSED, phase="", message=message))
