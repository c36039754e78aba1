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
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from flowsdk._phases import ActionPhase, RunPhase
from flowsdk._records import (
    ActionRow,
    Event,
    EventRow,
    PruneReport,
    RunRecord,
    action_records,
)
from flowsdk.errors import (
    PermissionDeniedError,
    RunNotFoundError,
    StoreCorruptedError,
    StoreError,
)
from flowsdk.store._base import RequestHandler, RunRecorder, RunState, StoredRun
from flowsdk.store._judged import Judged
from flowsdk.store._location import check_store_file, sqlite_location
from flowsdk.store._prune import delete_runs_sqlite, file_size, give_back_space, prune_plan
from flowsdk.store._rows import close_names, events_from_rows, with_routine
from flowsdk.store._sqlite_actions import SQLiteActions, missing_action
from flowsdk.store._sqlite_dialect import SQLiteDialect
from flowsdk.store._sqlite_holds import runner_alive, sweep_released
from flowsdk.store._sqlite_readonly import cannot_write, open_read_only
from flowsdk.store._sqlite_requests import SQLiteRequests
from flowsdk.store._sqlite_schema import (
    ACTION_COLUMNS,
    APPLICATION_ID,
    EVENTS_AFTER,
    RUN_COLUMNS,
    SCHEMA_VERSION,
    create_store,
    mark_crashed,
    migrate,
    owner_decoder,
    run_record,
    translate,
    warn_if_others_can_write,
)
from flowsdk.store._sqlite_tokens import SQLiteTokens
from flowsdk.store._sqlite_trace import SQLiteTrace
from flowsdk.store._writer import RunWriter

__all__ = ["SQLiteStore"]

logger = logging.getLogger("flowsdk")

# How long a reader waits for the lock to record a crashed run before it leaves that
# to the next read (seconds): a `flowsdk show` never waits out a writer's busy timeout.
MARK_WAIT = 0.1


class SQLiteStore(SQLiteActions, SQLiteRequests, SQLiteTokens, SQLiteTrace):
    """A store in one SQLite file (`sqlite:///relative/path.db`, `sqlite:////abs/path.db`).

    The URL may carry `?busy_timeout=SECONDS` (default 5) and no other
    parameter: a typo is a `ValueError`, never ignored. The file and its
    folder are created when the first run is recorded; reading a store that
    does not exist yet shows no runs and creates nothing.
    """

    in_process = False

    def __init__(self, url: str) -> None:
        path, self.busy_timeout = sqlite_location(url)
        self.url = url
        self.path = path
        self._reader: sqlite3.Connection | None = None
        self.read_only = False
        """Whether this process reads the store without being able to write it."""
        # Runs whose runner is gone, as a read-only reader judges them: (name, attempt)
        # -> last heartbeat. Shown CRASHED, never recorded by this process.
        self._judged = Judged()
        self._lock = threading.Lock()
        self._checked_mode = False

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    def _no_runs(self, name: str) -> str:
        where = os.path.abspath(self.path)
        relative = (
            ""
            if os.path.isabs(self.path)
            else (
                f" (the store path {self.path!r} is relative to the working directory, "
                f"{os.getcwd()}: run where the runs were started, or pass --store / FLOWSDK_STORE)"
            )
        )
        return f"no run named {name!r}: the store {where} has no runs yet{relative}"

    # -- connections -----------------------------------------------------------------

    def connect(self, *, create: bool) -> sqlite3.Connection | None:
        """Open a connection, creating and migrating the file if `create`.

        Returns None when the file does not exist and `create` is false.

        Raises:
            StoreCorruptedError: the file is not a flowsdk store (an empty file included).
            StoreError: the path is not a regular file (a directory, a device, a
                file of /proc), or the file cannot be used or created.
        """
        if not os.path.exists(self.path):
            if not create:
                return None
            if os.path.islink(self.path):
                # SQLite would create the link's target, empty, outside `create_store`.
                raise StoreError(
                    f"cannot create the store {self.path}: it is a symbolic link to "
                    f"{os.readlink(self.path)}, which does not exist; remove the link or "
                    "point --store (or FLOWSDK_STORE) at another file"
                )
            create_store(self.path)
        else:
            check_store_file(self.path)
        self._warn_if_others_can_write()
        with translate(self.path):
            if not create and cannot_write(self.path):
                self.read_only = True
                conn = open_read_only(self.path, self.busy_timeout)
            else:
                conn = sqlite3.connect(
                    self.path,
                    timeout=self.busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
            try:
                ready = self._check_and_migrate(conn, create=create)
            except BaseException:
                conn.close()
                raise
        if not ready:
            conn.close()  # no tables yet: nothing to read, and reading writes nothing
            return None
        return conn

    def _warn_if_others_can_write(self) -> None:
        if not self._checked_mode:
            self._checked_mode = True
            warn_if_others_can_write(self.path)

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
            if self.read_only and not create:
                raise PermissionDeniedError(
                    f"the store {self.path} has schema {version}, older than this flowsdk's "
                    f"({SCHEMA_VERSION}), and this user cannot write it to upgrade it; run any "
                    "flowsdk command on it once as a user who may write it"
                )
            migrate(conn, self.path)
        if self.read_only and not create:
            return True
        with contextlib.suppress(sqlite3.OperationalError):
            # WAL needs a write lock the first time; a reader may find it set already.
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return True

    def _connect_for_writing(self) -> sqlite3.Connection:
        conn = self.connect(create=True)
        assert conn is not None  # create=True always gives a connection
        return conn

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
        self,
        record: RunRecord,
        loop: asyncio.AbstractEventLoop,
        handler: RequestHandler,
        *,
        actions: Sequence[ActionRow] = (),
        events: Sequence[EventRow] = (),
        on_lost: Callable[[str], None] | None = None,
    ) -> RunRecorder:
        """Create the run's row with its first rows, and start its recorder thread."""
        dialect = SQLiteDialect(self.path, self._connect_for_writing)
        recorder = RunWriter(
            dialect,
            record,
            loop,
            handler,
            first=(list(actions), list(events)),
            fail_wait=self.busy_timeout,
            final_wait=10 * self.busy_timeout,
            on_lost=on_lost,
        )
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
        with translate(self.path):
            rows = conn.execute(
                "SELECT name, attempt, owner, heartbeat FROM runs "
                "WHERE phase IN ('RUNNING', 'STOPPING')"
            ).fetchall()
        now = time.time()
        dead = [
            (name, attempt, heartbeat)
            for name, attempt, owner, heartbeat in rows
            if owner is not None
            and not runner_alive(
                self.path, name, attempt, owner_decoder.decode(owner), heartbeat, now
            )
        ]
        if self.read_only:
            for name, attempt, heartbeat in dead:
                self._judge(conn, name, attempt, heartbeat if heartbeat is not None else now)
            return
        for name, attempt, heartbeat in dead:
            if not self._mark_gone(conn, name, attempt, heartbeat):
                return  # locked: someone is writing; try on the next read

    def _judge(self, conn: sqlite3.Connection, name: str, attempt: int, heartbeat: float) -> None:
        """Judge a gone runner's attempt CRASHED in this reader's views (`Judged`), once.

        One read of its latest action time: the run ends no earlier, as recorded.
        """
        if (name, attempt) in self._judged:
            return
        with translate(self.path):
            (end,) = conn.execute(
                "SELECT max(max(started_at, coalesce(ended_at, started_at))) FROM actions "
                "WHERE run = ? AND run_attempt = ?",
                (name, attempt),
            ).fetchone()
        self._judged.note(name, attempt, heartbeat, end)

    def _mark_gone(
        self, conn: sqlite3.Connection, name: str, attempt: int, heartbeat: float | None
    ) -> bool:
        """Record a run whose runner is gone CRASHED, ended at its last heartbeat.

        A reader never waits out the busy timeout for this: when another process
        holds the lock, the run is left for the next read (return False).
        """
        conn.execute(f"PRAGMA busy_timeout = {int(MARK_WAIT * 1000)}")
        try:
            mark_crashed(conn, name, attempt, heartbeat if heartbeat is not None else time.time())
        except sqlite3.OperationalError:
            return False
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return True

    def prune(
        self, *, before: datetime | None, keep: int | None, phase: RunPhase | None
    ) -> PruneReport:
        """Delete ended runs (never a live one) and give the space back to the file system."""
        self.reconcile()  # a run whose runner is gone is CRASHED, so it can go
        if self._read() is None:
            return PruneReport(deleted=[], attempts=0, live=[])
        doomed, live = prune_plan(self.list_runs(phase=phase), before=before, keep=keep)
        if not doomed:
            return PruneReport(deleted=[], attempts=0, live=live, freed_bytes=0)
        size = file_size(self.path)
        conn = self._connect_for_writing()
        try:
            with translate(self.path):
                gone, attempts = delete_runs_sqlite(conn, [r.name for r in doomed])
                freed, note = give_back_space(conn, self.path, size)
            sweep_released(self.path)  # the locks runners gone left beside the store
        finally:
            conn.close()
        # A run retried meanwhile is live again: it stays, and is named as such.
        live += [r for r in doomed if r.name not in gone]
        return PruneReport(
            deleted=[r for r in doomed if r.name in gone],
            attempts=attempts,
            live=live,
            freed_bytes=freed,
            note=note,
        )

    def list_runs(
        self, *, phase: RunPhase | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Return the latest attempt of each run, newest first."""
        self.reconcile()
        conn = self._read()
        if conn is None:
            return []
        sql = (
            f"SELECT {RUN_COLUMNS} FROM runs r WHERE attempt = "
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
        with translate(self.path):
            found = [run_record(row) for row in conn.execute(sql, params)]
        if self._judged.gone:
            found = [self._judged.record(r) for r in found]
            if phase is not None:
                found = [r for r in found if r.phase is phase]
        return found

    def load_run(self, name: str, attempt: int | None = None) -> StoredRun:
        """Return one attempt of a run (default: the latest)."""
        self.reconcile()
        conn = self._read()
        if conn is None:
            raise RunNotFoundError(self._no_runs(name))
        with translate(self.path):
            record = self._record(conn, name, attempt)
            rows = [
                ActionRow(*r)
                for r in conn.execute(
                    f"SELECT {ACTION_COLUMNS} FROM actions "
                    "WHERE run = ? AND run_attempt = ? ORDER BY seq",
                    (name, record.attempt),
                )
            ]
            rows = self._judged.rows(name, record.attempt, rows)
            payloads = {r.name: (r.inputs, r.output) for r in rows}
            # Read now (one consistent picture), turned into `Event`s only if asked for.
            events = self._event_rows(conn, name, record.attempt, -1)
        return StoredRun(
            record, lambda: action_records(name, rows), lambda: events_from_rows(events), payloads
        )

    def load_record(self, name: str, attempt: int | None = None) -> RunRecord:
        """Return one attempt's run record alone (default: the latest)."""
        conn = self._read()
        if conn is None:
            raise RunNotFoundError(self._no_runs(name))
        with translate(self.path):
            return self._record(conn, name, attempt)

    def _record(self, conn: sqlite3.Connection, name: str, attempt: int | None) -> RunRecord:
        """One attempt's run record (default: the latest), by primary key."""
        if attempt is None:
            row = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE name = ? ORDER BY attempt DESC LIMIT 1",
                (name,),
            ).fetchone()
        else:
            row = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE name = ? AND attempt = ?",
                (name, attempt),
            ).fetchone()
        if row is None:
            raise self._not_found(conn, name, attempt)
        return self._judged.record(run_record(row))

    def _event_rows(
        self, conn: sqlite3.Connection, name: str, attempt: int, cursor: int
    ) -> list[tuple[Any, ...]]:
        found = conn.execute(EVENTS_AFTER, {"run": name, "attempt": attempt, "cursor": cursor})
        return with_routine(found, cursor)

    def _latest(self, conn: sqlite3.Connection, name: str) -> tuple[int, str, bytes | None, float]:
        row = conn.execute(
            "SELECT attempt, phase, owner, heartbeat FROM runs WHERE name = ? "
            "ORDER BY attempt DESC LIMIT 1",
            (name,),
        ).fetchone()
        if row is None:
            raise self._not_found(conn, name, None)
        return row  # type: ignore[no-any-return]

    def run_state(self, name: str, action: str | None = None) -> RunState:
        """Return the latest attempt's phase (and `action`'s) by primary-key lookups."""
        conn = self._read()
        if conn is None:
            raise RunNotFoundError(self._no_runs(name))
        with translate(self.path):
            attempt, phase, owner, heartbeat = self._latest(conn, name)
            live = not RunPhase(phase).terminal
            if (
                live
                and owner is not None
                and not runner_alive(
                    self.path, name, attempt, owner_decoder.decode(owner), heartbeat
                )
            ):
                if self.read_only:  # judged gone, not recorded: as this reader's reads say
                    gone_at = heartbeat if heartbeat is not None else time.time()
                    self._judge(conn, name, attempt, gone_at)
                    phase = RunPhase.CRASHED.value
                else:
                    self._mark_gone(conn, name, attempt, heartbeat)
                    attempt, phase, _, _ = self._latest(conn, name)
            target = None
            if action is not None:
                row = conn.execute(
                    "SELECT phase FROM actions WHERE run = ? AND run_attempt = ? AND name = ?",
                    (name, attempt, action),
                ).fetchone()
                if row is None:
                    raise missing_action(conn, name, attempt, action)
                target = ActionPhase(self._judged.phase(name, attempt, row[0]))
        return RunState(name, attempt, RunPhase(phase), target)

    def root_task_workdir(self, task: str) -> str | None:
        """Return the working directory of the latest run whose root task is `task`."""
        conn = self._read()
        if conn is None:
            return None
        with translate(self.path):
            row = conn.execute(
                "SELECT workdir FROM runs WHERE task = ? ORDER BY started_at DESC LIMIT 1", (task,)
            ).fetchone()
        return None if row is None else str(row[0])

    def events_since(self, name: str, cursor: int, *, attempt: int | None = None) -> list[Event]:
        """Return the events of a run (latest attempt by default) with `seq > cursor`."""
        conn = self._read()
        if conn is None:
            raise RunNotFoundError(self._no_runs(name))
        with translate(self.path):
            if attempt is None:
                attempt = self._latest(conn, name)[0]
            elif (
                conn.execute(
                    "SELECT 1 FROM runs WHERE name = ? AND attempt = ?", (name, attempt)
                ).fetchone()
                is None
            ):
                raise self._not_found(conn, name, attempt)
            return events_from_rows(self._event_rows(conn, name, attempt, cursor))

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
        hint = close_names(name, names)
        return RunNotFoundError(f"no run named {name!r} in {self.path}{hint}")
