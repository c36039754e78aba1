"""The default store: one SQLite file shared by runners, the CLI and the console.

- WAL mode, so readers (`flowsdk show`) never wait for a runner's writes.
- A busy timeout: a writer that cannot get the lock in time raises
  `StoreLockedError`, never hangs.
- Numbered migrations keyed by `PRAGMA user_version`; a file that is not a
  flowsdk store, or is damaged, raises `StoreCorruptedError` and is never
  modified.
- Each live run has one thread that owns a connection: it writes the run's
  changes in batched transactions, keeps the runner's heartbeat, and watches
  `PRAGMA data_version` for control requests from other processes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import difflib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

from flowsdk._liveness import HEARTBEAT_INTERVAL, Owner, is_alive, this_process
from flowsdk._phases import AbortCause, ActionPhase, RunPhase
from flowsdk._records import (
    AbortInfo,
    ActionRecord,
    ControlRequest,
    ErrorInfo,
    EventKind,
    RunRecord,
    StopInfo,
    StopMode,
    event_from_row,
)
from flowsdk.errors import (
    RunExistsError,
    RunNotFoundError,
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
)
from flowsdk.store._base import ControlAnswer, RequestHandler, RunRecorder, StoredRun

if TYPE_CHECKING:
    from flowsdk._run import Run

__all__ = ["SQLiteStore"]

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

_ACTION_COLUMNS = (
    "name, seq, parent, task, grp, phase, attempt, started_at, ended_at, "
    "error_type, error_message, error_traceback, abort_reason, abort_cause, abort_by, abort_at, "
    "cleanup_incomplete, key, replayed, inputs, output"
)
_RUN_COLUMNS = (
    "name, attempt, phase, started_at, ended_at, task, stop_mode, stop_reason, stop_by, stop_at, "
    "owner, heartbeat"
)


def _dt(at: float | None) -> datetime | None:
    return None if at is None else datetime.fromtimestamp(at, UTC)


def _ts(at: datetime | None) -> float | None:
    return None if at is None else at.timestamp()


@contextlib.contextmanager
def _translate(path: str) -> Iterator[None]:
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


class SQLiteStore:
    """A store in one SQLite file (`sqlite:///relative/path.db`, `sqlite:////abs/path.db`).

    The URL may carry `?busy_timeout=SECONDS` (default 5). The file and its
    folder are created when the first run is recorded; reading a store that
    does not exist yet shows no runs and creates nothing.
    """

    supports_control = True

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "sqlite" or parts.netloc:
            raise ValueError(
                f"not a SQLite store URL: {url!r}; write sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db"
            )
        path = unquote(parts.path)
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise ValueError(f"the SQLite store URL {url!r} names no file")
        query = parse_qs(parts.query)
        try:
            self.busy_timeout = float(query.get("busy_timeout", [DEFAULT_BUSY_TIMEOUT])[0])
        except ValueError:
            raise ValueError(f"busy_timeout in {url!r} must be a number of seconds") from None
        self.url = url
        self.path = path
        self._reader: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    # -- connections -----------------------------------------------------------------

    def connect(self, *, create: bool) -> sqlite3.Connection | None:
        """Open a connection, creating and migrating the file if `create`.

        Returns None when the file does not exist and `create` is false.
        """
        if not os.path.exists(self.path):
            if not create:
                return None
            folder = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the store's folder {folder}: {exc}") from None
        elif os.path.isdir(self.path):
            raise StoreError(f"the store {self.path} is a directory, not a file")
        with _translate(self.path):
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                ready = self._check_and_migrate(conn, create=create)
            except BaseException:
                conn.close()
                raise
        if not ready:
            conn.close()  # an empty file: nothing to read yet, and reading writes nothing
            return None
        return conn

    def _check_and_migrate(self, conn: sqlite3.Connection, *, create: bool) -> bool:
        # Reading the header fails with "file is not a database" for a foreign file,
        # before anything is written.
        # One read transaction: a consistent view even while another process
        # creates the schema (tables and user_version commit together).
        conn.execute("BEGIN")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            conn.execute("COMMIT")
        if version == 0 and tables:
            raise StoreCorruptedError(
                f"{self.path} is a SQLite database but not a flowsdk store; it was left "
                "untouched. Point --store (or FLOWSDK_STORE) at another file"
            )
        if version and app_id != APPLICATION_ID:
            raise StoreCorruptedError(
                f"{self.path} is not a flowsdk store (application id {app_id:#x}); "
                "it was left untouched"
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.path} was written by a newer flowsdk (schema {version}, this one "
                f"knows {SCHEMA_VERSION}); upgrade flowsdk to use it"
            )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        if version < SCHEMA_VERSION:
            if not create and version == 0:
                return False
            self._migrate(conn, version)
        with contextlib.suppress(sqlite3.OperationalError):
            # WAL needs a write lock the first time; a reader may find it set already.
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return True

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            for step in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        del version

    def _read(self) -> sqlite3.Connection | None:
        with self._lock:
            if self._reader is None:
                self._reader = self.connect(create=False)
            return self._reader

    def close(self) -> None:
        """Close the store's reading connection (runs close their own)."""
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # -- writing a run -----------------------------------------------------------------

    async def open_run(
        self, record: RunRecord, loop: asyncio.AbstractEventLoop, handler: RequestHandler
    ) -> RunRecorder:
        """Create the run's row and start its recorder thread."""
        recorder = _RunRecorder(self, record, loop, handler)
        try:
            await recorder.started
        except BaseException:
            # The thread has nothing left to do but exit: do not leave it behind.
            await asyncio.shield(recorder.stopped())
            raise
        return recorder

    # -- reading -----------------------------------------------------------------------

    def reconcile(self) -> None:
        """Mark runs whose runner is gone (and their unfinished actions) CRASHED.

        Best effort: a store locked by a writer is left for the next read.
        """
        conn = self._read()
        if conn is None:
            return
        with _translate(self.path):
            rows = conn.execute(
                "SELECT name, attempt, owner, heartbeat FROM runs "
                "WHERE phase IN ('RUNNING', 'STOPPING')"
            ).fetchall()
        now = time.time()
        dead = [
            (name, attempt)
            for name, attempt, owner, heartbeat in rows
            if owner is not None and not is_alive(_owner_decoder.decode(owner), heartbeat, now=now)
        ]
        for name, attempt in dead:
            try:
                _mark_crashed(conn, name, attempt, now)
            except sqlite3.OperationalError:
                return  # locked: someone is writing; try on the next read

    def list_runs(
        self, *, phase: RunPhase | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Return the latest attempt of each run, newest first."""
        self.reconcile()
        conn = self._read()
        if conn is None:
            return []
        sql = (
            f"SELECT {_RUN_COLUMNS} FROM runs r WHERE attempt = "
            "(SELECT max(attempt) FROM runs WHERE name = r.name)"
        )
        params: list[Any] = []
        if phase is not None:
            sql += " AND phase = ?"
            params.append(phase.value)
        sql += " ORDER BY started_at DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with _translate(self.path):
            return [_run_record(row) for row in conn.execute(sql, params)]

    def load_run(self, name: str, attempt: int | None = None) -> StoredRun:
        """Return one attempt of a run (default: the latest)."""
        self.reconcile()
        conn = self._read()
        if conn is None:
            raise RunNotFoundError(f"no run named {name!r}: the store {self.path} has no runs yet")
        with _translate(self.path):
            if attempt is None:
                row = conn.execute(
                    f"SELECT {_RUN_COLUMNS} FROM runs WHERE name = ? ORDER BY attempt DESC LIMIT 1",
                    (name,),
                ).fetchone()
            else:
                row = conn.execute(
                    f"SELECT {_RUN_COLUMNS} FROM runs WHERE name = ? AND attempt = ?",
                    (name, attempt),
                ).fetchone()
            if row is None:
                raise self._not_found(conn, name, attempt)
            record = _run_record(row)
            rows = list(
                conn.execute(
                    f"SELECT {_ACTION_COLUMNS} FROM actions "
                    "WHERE run = ? AND run_attempt = ? ORDER BY seq",
                    (name, record.attempt),
                )
            )
            actions = [_action_record(name, r) for r in rows]
            payloads = {r[0]: (r[-2], r[-1]) for r in rows}
            events = [
                event_from_row(r)
                for r in conn.execute(
                    "SELECT seq, at, kind, action, phase, cause, reason, requested_by, message "
                    "FROM events WHERE run = ? AND run_attempt = ? ORDER BY seq",
                    (name, record.attempt),
                )
            ]
        return StoredRun(record, actions, events, payloads)

    def _not_found(
        self, conn: sqlite3.Connection, name: str, attempt: int | None
    ) -> RunNotFoundError:
        if attempt is not None:
            exists = conn.execute(
                "SELECT max(attempt) FROM runs WHERE name = ?", (name,)
            ).fetchone()[0]
            if exists:
                return RunNotFoundError(
                    f"run {name!r} has no attempt {attempt}; its latest is {exists}"
                )
        names = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT name FROM runs ORDER BY started_at DESC LIMIT 1000"
            )
        ]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(repr(n) for n in close)}?" if close else ""
        return RunNotFoundError(f"no run named {name!r} in {self.path}{hint}")

    # -- control -----------------------------------------------------------------------

    def request(self, request: ControlRequest, *, timeout: float) -> ControlAnswer:
        """Hand a control request to the run's runner and wait for its answer.

        The request is committed first, so it is never lost: if the runner does
        not answer in time, the error says it is recorded and will be applied
        when the runner reads it.
        """
        conn = self.connect(create=True)
        assert conn is not None
        try:
            with _translate(self.path):
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute(
                    "INSERT INTO requests (run, at, body) VALUES (?, ?, ?)",
                    (request.run, time.time(), _request_encoder.encode(request)),
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
                        answer = _answer_decoder.decode(row[1])
                        return ControlAnswer(answer.outcome, answer.phase, answer.message)
                    now = time.monotonic()
                    if now >= next_check:
                        next_check = now + 0.2
                        gone = self._runner_gone(conn, request.run)
                        if gone is not None:
                            conn.execute(
                                "UPDATE requests SET state = 'dropped' WHERE id = ?", (request_id,)
                            )
                            return gone
                    if now >= deadline:
                        raise StoreError(
                            f"the runner of run {request.run!r} did not answer within "
                            f"{timeout:g} s; the request is recorded (#{request_id}) and "
                            "will be applied when it reads it"
                        )
                    time.sleep(ANSWER_POLL)
        finally:
            conn.close()

    def _runner_gone(self, conn: sqlite3.Connection, run: str) -> ControlAnswer | None:
        row = conn.execute(
            "SELECT attempt, phase, owner, heartbeat FROM runs WHERE name = ? "
            "ORDER BY attempt DESC LIMIT 1",
            (run,),
        ).fetchone()
        attempt, phase, owner, heartbeat = row
        if RunPhase(phase).terminal:
            return ControlAnswer("already_ended", phase, f"run {run!r} already finished: {phase}")
        if owner is not None and not is_alive(_owner_decoder.decode(owner), heartbeat):
            with contextlib.suppress(sqlite3.OperationalError):
                _mark_crashed(conn, run, attempt, time.time())
            return ControlAnswer(
                "already_ended",
                RunPhase.CRASHED.value,
                f"the runner of run {run!r} is gone; the run is recorded CRASHED",
            )
        return None

    def runner_alive(self, record: RunRecord) -> bool:
        """Whether the process running `record` is alive (reads the owner row)."""
        conn = self._read()
        if conn is None:
            return False
        with _translate(self.path):
            row = conn.execute(
                "SELECT owner, heartbeat FROM runs WHERE name = ? AND attempt = ?",
                (record.name, record.attempt),
            ).fetchone()
        return bool(row and row[0] is not None and is_alive(_owner_decoder.decode(row[0]), row[1]))


def _mark_crashed(conn: sqlite3.Connection, name: str, attempt: int, now: float) -> None:
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


def _run_record(row: tuple[Any, ...]) -> RunRecord:
    name, attempt, phase, started, ended, task, mode, reason, by, at, _owner, _hb = row
    return RunRecord(
        name=name,
        phase=RunPhase(phase),
        started_at=datetime.fromtimestamp(started, UTC),
        ended_at=_dt(ended),
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


def _action_record(run: str, row: tuple[Any, ...]) -> ActionRecord:
    (
        name,
        _seq,
        parent,
        task,
        grp,
        phase,
        attempt,
        started,
        ended,
        etype,
        emsg,
        etb,
        areason,
        acause,
        aby,
        aat,
        incomplete,
        key,
        replayed,
        _inputs,
        _output,
    ) = row
    return ActionRecord(
        run=run,
        name=name,
        parent=parent,
        task=task,
        group=grp,
        phase=ActionPhase(phase),
        attempt=attempt,
        started_at=_dt(started),
        ended_at=_dt(ended),
        error=ErrorInfo(type=etype, message=emsg or "", traceback=etb or "") if etype else None,
        abort=AbortInfo(
            reason=areason, cause=AbortCause(acause), requested_by=aby, requested_at=_dt(aat)
        )
        if acause
        else None,
        cleanup_incomplete=bool(incomplete),
        key=key,
        replayed=bool(replayed),
    )


class _RunRecorder:
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
        with _translate(self._store.path):
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
        with _translate(self._store.path):
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
                    f"INSERT OR REPLACE INTO actions (run, run_attempt, {_ACTION_COLUMNS}) VALUES "
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
            with _translate(self._store.path):
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
        with _translate(self._store.path):
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
