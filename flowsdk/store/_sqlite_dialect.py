"""The SQLite side of the per-run writer: its statements, and how it notices requests.

A request from another process is noticed through `PRAGMA data_version`,
which changes whenever another connection commits: one cheap read per round
of the writer instead of a query on the requests table.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import Any

import msgspec
from msgspec.structs import astuple

from flowsdk._liveness import alive_here, prior_runner_alive_error, this_process
from flowsdk._records import ACTION_FIELDS, EVENT_FIELDS, ActionRow, EventRow, RunRecord
from flowsdk.errors import InvalidStateError, RunExistsError
from flowsdk.store._batch import Batch
from flowsdk.store._rows import (
    ACTION_COLUMN_NAMES,
    NO_DETAIL,
    ROUTINE_COLUMNS,
    RoutineEvent,
    pack_routine,
)
from flowsdk.store._sqlite_holds import RunnerHold, holds_run
from flowsdk.store._sqlite_schema import (
    INSERT_EVENT,
    INSERT_ROUTINE_PACK,
    LAST_SEQ,
    owner_decoder,
    rollback,
    translate,
    ts,
)
from flowsdk.store._sqlite_trace import SQLITE_TRACE
from flowsdk.store._writer import RunLost

__all__ = ["SQLiteDialect"]

# The sqlite3 module binds only exact int, float and str without asking its
# adapter registry; None, bool and bytes each cost a registry lookup and two
# failed attribute lookups (`__adapt__`, `__conform__`), about half of what
# writing a row costs. Registered as what they already bind as (None stays
# NULL, a bool its integer, bytes itself), they take one dictionary lookup and
# a C call instead: for bytes, `bytes.__bytes__`, which returns its argument
# (calling the type `bytes` parses arguments and looks `__bytes__` up: 600 ns
# a value against 370). `setdefault`: an adapter the application registered wins.
for _type, _same in ((type(None), {}.get), (bool, int), (bytes, bytes.__bytes__)):
    sqlite3.adapters.setdefault((_type, sqlite3.PrepareProtocol), _same)

# Most rows leave many columns NULL (an action's error and abort fields, an
# event's cause and reason): they are written by statements that name only the
# columns they set, so that no NULL is bound at all. Columns left out take their
# default, which is what the row holds: NULL, or 0 for a flag that is False.
_INSERT_ROUTINE = f"INSERT INTO events (run, run_attempt, {ROUTINE_COLUMNS})"
_INSERT_EVENT = f"INSERT INTO events (run, run_attempt, {', '.join(EVENT_FIELDS)})"
_FLAGS = tuple(i for i, f in enumerate(ACTION_FIELDS) if f in ("cleanup_incomplete", "replayed"))
_Shape = tuple[tuple[type, ...], tuple[object, ...]]
_plans: dict[_Shape, tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]], int]] = {}

# Rows go many to a statement (`SELECT ?, ?, * FROM (VALUES (...), (...), ...)`,
# the run's name and attempt bound once, not in every row): one step of SQLite's
# program, and one release of the GIL (each is a hand-over to the event loop's
# thread), per statement instead of per row. A statement stays under SQLite's
# oldest limit on parameters, and holds a power of two of rows, so that a few
# statements of each kind are prepared once and then found in the cache.
MAX_PARAMETERS = 999
# A writer that found nothing to write copies the write-ahead log back into the
# file itself, at most this often (seconds), so that the log stays small: the
# copy costs about 0.05 ms a page, with SQLite's own threshold at 1,000 pages
# (and whichever commit crosses it, a control request's included, pays for it).
CHECKPOINT_EVERY = 0.25
# The writer's page cache, in KiB: about what its largest transaction (`MAX_BATCH`
# changes) writes, so that one seldom spills to the log before its commit.
WRITER_CACHE_KIB = 512
_statements: dict[tuple[str, str, int], str] = {}


def _insert_rows(
    conn: sqlite3.Connection,
    insert: str,
    head: tuple[Any, ...],
    values: list[Any],
    width: int,
    select: str = "*",
) -> None:
    """Run `insert` (`INSERT ... (run, run_attempt, ...)`) for rows of `width` values each.

    `head` is bound once per statement. `values` holds the rows' values one
    after the other: no tuple per row, as a batch of rows held as tuples would
    be thousands of objects for the garbage collector to count and walk.
    `select` picks the inserted values from a row's (`column1`, `column2`, ...).
    """
    most = 1 << ((MAX_PARAMETERS - 2) // width).bit_length() - 1
    start, left = 0, len(values) // width
    while left:
        n = most if left >= most else 1 << left.bit_length() - 1
        statement = _statements.get((insert, select, n))
        if statement is None:
            one = f"({', '.join('?' * width)})"
            statement = _statements[insert, select, n] = (
                f"{insert} SELECT ?, ?, {select} FROM (VALUES " + ", ".join([one] * n) + ")"
            )
        end = start + n * width
        conn.execute(statement, [*head, *values[start:end]])
        start = end
        left -= n


def _plan(shape: _Shape) -> tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]], int]:
    """The insert, and the values it takes, for action rows of one shape."""
    types, flags = shape
    false_flags = {i for i, value in zip(_FLAGS, flags, strict=True) if value is False}
    keep = [i for i, t in enumerate(types) if t is not type(None) and i not in false_flags]
    columns = ", ".join(ACTION_COLUMN_NAMES[i] for i in keep)
    insert = f"INSERT OR REPLACE INTO actions (run, run_attempt, {columns})"
    pick = itemgetter(*keep)  # at least name, seq, task, phase, attempt, key: always a tuple
    _plans[shape] = plan = (insert, pick, len(keep))
    return plan


def _write_actions(
    conn: sqlite3.Connection, name: str, attempt: int, rows: Iterable[ActionRow]
) -> None:
    by_shape: dict[str, tuple[list[Any], int]] = {}
    head = (name, attempt)
    i, j = _FLAGS
    for row in rows:
        values = astuple(row)
        shape = (tuple(map(type, values)), (values[i], values[j]))
        insert, pick, width = _plans.get(shape) or _plan(shape)
        known = by_shape.get(insert)
        if known is None:
            known = by_shape[insert] = ([], width)
        known[0].extend(pick(values))
    for insert, (params, width) in by_shape.items():
        _insert_rows(conn, insert, head, params, width)


def _write_events(
    conn: sqlite3.Connection,
    name: str,
    attempt: int,
    rows: Iterable[EventRow],
    routine: list[RoutineEvent],
) -> None:
    head = (name, attempt)
    plain: list[Any] = []  # events of other kinds with nothing after their phase
    other: list[Any] = []
    for row in rows:
        values = astuple(row)
        if values[5:] == NO_DETAIL:
            plain.extend(values[:5])
        else:
            other.extend(values)
    if routine:
        conn.execute(INSERT_ROUTINE_PACK, (name, attempt, *pack_routine(routine)))
    if plain:
        _insert_rows(conn, _INSERT_ROUTINE, head, plain, 5)
    if other:
        _insert_rows(conn, _INSERT_EVENT, head, other, len(EVENT_FIELDS))


class SQLiteDialect:
    """Statements and request detection of the SQLite store, for `RunWriter`."""

    def __init__(self, path: str, connect: Callable[[], sqlite3.Connection]) -> None:
        self.location = path
        self._connect = connect
        self._data_version: int | None = None
        self._logged = False  # committed since the log was last copied back
        self._checkpointed_at = 0.0
        self._hold: RunnerHold | None = None  # the run's lock, from before it is recorded
        self._owner: bytes | None = None  # this runner, as its run's row records it

    def connect(self) -> sqlite3.Connection:
        """Open the writer's connection (creating and migrating the file if needed).

        Its page cache is `WRITER_CACHE_KIB`: the writer appends, and reads again
        only the right edges of a few B-trees. SQLite's default (2 MB) would fill
        with pages it never reads again, a step in the run's memory in its
        second wave of writes.
        """
        conn = self._connect()
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        return conn

    def close(self, conn: sqlite3.Connection) -> None:
        """Close the connection."""
        conn.close()

    def let_go(self, final: bool) -> None:
        """Release the run's lock (`_sqlite_holds`): this runner no longer holds the run."""
        if self._hold is not None:
            self._hold.release(final)
            self._hold = None

    def _transaction(self, conn: sqlite3.Connection, body: Callable[[], object]) -> None:
        with translate(self.location):
            conn.execute("BEGIN IMMEDIATE")
            try:
                body()
            except BaseException:
                rollback(conn)
                raise
            conn.execute("COMMIT")
        self._logged = True

    def idle(self, conn: sqlite3.Connection) -> None:
        """Copy the write-ahead log back into the file, if this writer added to it.

        `PASSIVE`: it never waits for a reader or another writer; what it cannot
        copy yet is copied next time.
        """
        now = time.monotonic()
        if not self._logged or now - self._checkpointed_at < CHECKPOINT_EVERY:
            return
        self._logged = False
        self._checkpointed_at = now
        with translate(self.location):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def insert_run(
        self,
        conn: sqlite3.Connection,
        record: RunRecord,
        actions: list[ActionRow],
        events: list[EventRow],
    ) -> None:
        """Create the run's row, owned by this process, with its first rows, in one transaction."""
        owner = self._owner = msgspec.msgpack.encode(this_process())
        name, attempt = record.name, record.attempt
        # Held before the run's row exists: a reader never finds a live run unheld.
        self._hold = RunnerHold(self.location, name, attempt, this_process())
        if not self._hold.take():
            self._hold = None  # judged by this process alone (an older store's way)

        def body() -> None:
            if attempt > 1:
                # Recorded CRASHED from another host, the attempt before may still run
                # here (paused): this host can see it, and must not run its work twice.
                row = conn.execute(
                    "SELECT owner FROM runs WHERE name = ? AND attempt = ? AND phase = 'CRASHED'",
                    (name, attempt - 1),
                ).fetchone()
                if row is not None and row[0] is not None:
                    prior = owner_decoder.decode(row[0])
                    held = holds_run(self.location, name, attempt - 1, prior)
                    if alive_here(prior) and held is not False:
                        raise InvalidStateError(prior_runner_alive_error(name, attempt, prior))
            conn.execute(
                "INSERT INTO runs (name, attempt, phase, started_at, task, owner, heartbeat, "
                "workdir) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    attempt,
                    record.phase.value,
                    ts(record.started_at),
                    record.task,
                    owner,
                    time.time(),
                    record.workdir,
                ),
            )
            _write_actions(conn, name, attempt, actions)
            _write_events(conn, name, attempt, events, [])
            # Requests still unanswered were for an attempt that has ended (recorded
            # CRASHED before its runner read them, or took them and never answered):
            # never this one's. Their requesters are told; `queued_requests` lists none.
            conn.execute(
                "UPDATE requests SET state = 'dropped' "
                "WHERE run = ? AND state IN ('pending', 'delivered')",
                (name,),
            )

        try:
            self._transaction(conn, body)
        except BaseException as exc:
            self.let_go(final=True)  # not recorded: nothing to hold
            if not isinstance(exc, sqlite3.IntegrityError):
                raise
            if record.attempt > 1:
                raise RunExistsError(
                    f"attempt {record.attempt} of run {record.name!r} in {self.location} was "
                    "started meanwhile, by another retry; see it with flowsdk show"
                ) from None
            raise RunExistsError(
                f"a run named {record.name!r} already exists in {self.location}; "
                "choose another name"
            ) from None

    def _check_not_lost(self, conn: sqlite3.Connection, name: str, attempt: int) -> None:
        # Read inside the write transaction: once a reader has recorded the run CRASHED,
        # no batch of this runner can overwrite the crash record.
        # Its row gone (pruned) or another runner's (the name used again): lost too.
        row = conn.execute(
            "SELECT phase, owner FROM runs WHERE name = ? AND attempt = ?", (name, attempt)
        ).fetchone()
        if row is None or row[0] == "CRASHED" or row[1] != self._owner:
            raise RunLost(
                f"run {name!r} was recorded CRASHED in {self.location} (or pruned, and its name "
                f"used again) while its runner (pid {os.getpid()}) was alive; it stopped its "
                "bodies and recorded nothing more"
            )

    def write(self, conn: sqlite3.Connection, name: str, attempt: int, batch: Batch) -> None:
        """Write one batch in one transaction (none once the run is recorded CRASHED)."""

        def body() -> None:
            self._check_not_lost(conn, name, attempt)
            if batch.actions:
                _write_actions(conn, name, attempt, batch.actions.values())
            if batch.events or batch.routine:
                _write_events(conn, name, attempt, batch.events, batch.routine)
            SQLITE_TRACE.write(conn.executemany, name, attempt, batch.progress, batch.logs)
            run = batch.run
            if run is not None:
                stop = run.stop
                conn.execute(
                    "UPDATE runs SET phase = ?, ended_at = ?, stop_mode = ?, stop_reason = ?, "
                    "stop_by = ?, stop_at = ?, heartbeat = ? WHERE name = ? AND attempt = ?",
                    (
                        run.phase.value,
                        ts(run.ended_at),
                        stop.mode.value if stop else None,
                        stop.reason if stop else None,
                        stop.requested_by if stop else None,
                        ts(stop.requested_at) if stop else None,
                        time.time(),
                        name,
                        attempt,
                    ),
                )
            if batch.replies:
                now = time.time()
                conn.executemany(
                    "UPDATE requests SET state = 'done', answer = ?, answered_at = ? WHERE id = ?",
                    [(body, now, request_id) for request_id, body in batch.replies],
                )
            if batch.cached:
                conn.executemany(
                    "INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?, ?)", batch.cached
                )

        self._transaction(conn, body)

    def heartbeat(self, conn: sqlite3.Connection, name: str, attempt: int) -> None:
        """Renew the runner's heartbeat (unless the run is recorded CRASHED)."""

        def body() -> None:
            self._check_not_lost(conn, name, attempt)
            conn.execute(
                "UPDATE runs SET heartbeat = ? WHERE name = ? AND attempt = ?",
                (time.time(), name, attempt),
            )

        self._transaction(conn, body)

    def note(self, conn: sqlite3.Connection, name: str, attempt: int, message: str) -> None:
        """Append one `warning` event after the run's last one."""

        def body() -> None:
            seq = conn.execute(LAST_SEQ, {"run": name, "attempt": attempt}).fetchone()[0] + 1
            row = EventRow(seq, time.time(), "warning", None, None, None, None, None, message)
            conn.execute(INSERT_EVENT, (name, attempt, *astuple(row)))

        self._transaction(conn, body)

    def _version(self, conn: sqlite3.Connection) -> int:
        with translate(self.location):
            version: int = conn.execute("PRAGMA data_version").fetchone()[0]
        return version

    def requests_may_be_waiting(self, conn: sqlite3.Connection) -> bool:
        """Whether another connection has committed since the requests were last claimed."""
        return self._version(conn) != self._data_version

    def claim_requests(self, conn: sqlite3.Connection, name: str) -> list[tuple[int, bytes]]:
        """Mark the run's pending requests delivered and return them, oldest first."""
        # Read before the query and kept only once the claim succeeded: a claim
        # lost to a lock is tried again on the next round.
        version = self._version(conn)
        with translate(self.location):
            rows: list[tuple[int, bytes]] = conn.execute(
                "SELECT id, body FROM requests WHERE run = ? AND state = 'pending' ORDER BY id",
                (name,),
            ).fetchall()
        if rows:
            self._transaction(
                conn,
                lambda: conn.executemany(
                    "UPDATE requests SET state = 'delivered' WHERE id = ? AND state = 'pending'",
                    [(r[0],) for r in rows],
                ),
            )
        self._data_version = version
        return rows

    def cache_lookup(
        self, conn: sqlite3.Connection, task: str, version: str, digest: str
    ) -> bytes | None:
        """Return a cached output, if any."""
        with translate(self.location):
            row = conn.execute(
                "SELECT output FROM cache WHERE task = ? AND version = ? AND digest = ?",
                (task, version, digest),
            ).fetchone()
        return row[0] if row else None
