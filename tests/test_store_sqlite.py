"""The SQLite store (SPEC §5): its file, its schema, locks, damage and races.

Runs are started in-process with `flowsdk.run(..., store=URL)` or, where a
second process matters, by a runner from tests/runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import sqlite3
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

import flowsdk
from flowsdk import ActionPhase, EventKind, RunPhase
from flowsdk._records import AbortRequest
from flowsdk.errors import (
    RunNotFoundError,
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
)
from flowsdk.store import SQLiteStore
from flowsdk.store._sqlite_schema import SCHEMA_VERSION, translate
from flowsdk.testing import Gate
from tests.runners.harness import ROOT, Runner, sqlite_url, sync
from tests.support import as_schema_7, assert_clean

EXIT_RUN_EXISTS = 3  # tests/runners/_common.py
EXIT_STORE_ERROR = 5  # tests/runners/store_io.py

env = flowsdk.TaskEnvironment("sqlite_tests")
ran: list[str] = []


@env.task
async def noop() -> str:
    ran.append("noop")
    return "done"


@pytest.fixture(autouse=True)
def _forget_runs() -> None:
    ran.clear()


@contextlib.contextmanager
def write_lock(path: Path, mode: str = "IMMEDIATE") -> Iterator[None]:
    """Hold the store's write lock from another connection (`BEGIN IMMEDIATE|EXCLUSIVE`)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"BEGIN {mode}")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def pragma(path: Path, name: str) -> object:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every file of `folder` (its subfolders' too) and its bytes; a folder has None."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in folder.rglob("*")
    }


# -- the file ----------------------------------------------------------------------------


def test_reading_a_missing_store_lists_nothing_and_creates_nothing(tmp_path: Path) -> None:
    """The store file (and its folder) appears when the first run is recorded, not on a read."""
    path = tmp_path / "sub" / "s.db"
    with flowsdk.Client(sqlite_url(path)) as client:
        assert client.runs() == []
        with pytest.raises(RunNotFoundError, match="nope"):
            client.get_run("nope")
        with pytest.raises(RunNotFoundError, match="nope"):
            client.abort("nope")
    assert not (tmp_path / "sub").exists()
    flowsdk.run(noop, name="first", store=sqlite_url(path))
    assert path.is_file()


def test_an_empty_store_file_is_refused_like_a_corrupt_one_and_left_empty(
    tmp_path: Path,
) -> None:
    """SPEC §5: a 0-byte file is not a new store, for readers as for runners."""
    path = tmp_path / "s.db"
    path.touch()
    with (
        flowsdk.Client(sqlite_url(path)) as client,
        pytest.raises(StoreCorruptedError, match="empty file"),
    ):
        client.runs()
    ran.clear()
    with pytest.raises(StoreCorruptedError, match="empty file"):
        flowsdk.run(noop, name="first", store=sqlite_url(path))
    assert ran == []
    assert path.read_bytes() == b""


def test_a_new_store_and_its_folder_are_private_to_their_owner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SPEC §5: created 0700 / 0600 whatever the umask; a store others can write is named."""
    path = tmp_path / "private" / "s.db"
    old = os.umask(0o022)
    try:
        flowsdk.run(noop, name="first", store=sqlite_url(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".new")] == []
    path.chmod(0o666)
    with caplog.at_level("WARNING", logger="flowsdk"), flowsdk.Client(sqlite_url(path)) as client:
        assert [r.name for r in client.runs()] == ["first"]
    assert any("can be written by other users" in r.getMessage() for r in caplog.records)


def test_a_new_store_is_in_wal_mode_at_the_latest_schema_version(tmp_path: Path) -> None:
    """A fresh store: WAL journal (readers never wait for writers), the latest `user_version`."""
    path = tmp_path / "s.db"
    flowsdk.run(noop, name="first", store=sqlite_url(path))
    assert pragma(path, "journal_mode") == "wal"
    assert pragma(path, "user_version") == SCHEMA_VERSION == 9


def test_a_store_of_schema_1_is_migrated_and_keeps_its_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store written before the working directory was recorded: migrated in place, runs kept."""
    path = tmp_path / "s.db"
    flowsdk.run(noop, name="old", store=sqlite_url(path))
    with flowsdk.Client(sqlite_url(path)) as client:
        events = client.get_run("old").events
    with contextlib.closing(sqlite3.connect(path)) as conn:
        # Before schema 8 routine events were rows of their own, not packed.
        packed = conn.execute("SELECT count(*) FROM routine_events").fetchone()[0]
        as_schema_7(conn)
        assert packed
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == len(events)
        # Before schema 7 both tables had a rowid.
        for table, key in (("actions", "name"), ("events", "seq")):
            conn.execute(f"CREATE TABLE old_{table} AS SELECT * FROM {table}")
            conn.execute(f"DROP TABLE {table}")
            conn.execute(f"CREATE TABLE {table} AS SELECT * FROM old_{table} WHERE 0")
            conn.execute(f"CREATE UNIQUE INDEX {table}_key ON {table} (run, run_attempt, {key})")
            conn.execute(f"INSERT INTO {table} SELECT * FROM old_{table}")
            conn.execute(f"DROP TABLE old_{table}")
        conn.commit()
        # What schema 1 was: the same tables without runs.workdir, actions.executor,
        # the tokens and the progress and logs.
        conn.execute("ALTER TABLE runs DROP COLUMN workdir")
        conn.execute("ALTER TABLE actions DROP COLUMN executor")
        conn.execute("DROP TABLE tokens")
        conn.execute("DROP TABLE progress")
        conn.execute("DROP TABLE logs")
        conn.execute("PRAGMA user_version = 1")
    assert pragma(path, "user_version") == 1
    with caplog.at_level("WARNING", logger="flowsdk"):
        flowsdk.run(noop, name="new", store=sqlite_url(path))
    upgrades = [r.getMessage() for r in caplog.records if "upgrading the store" in r.getMessage()]
    assert upgrades == [
        f"upgrading the store {path} from schema 1 to {SCHEMA_VERSION} in one "
        "transaction; other processes using it wait until it is done"
    ]
    assert pragma(path, "user_version") == SCHEMA_VERSION
    migrated = SQLiteStore(sqlite_url(path))
    assert not migrated.token_mode()  # the tokens table is there, empty
    migrated.close()
    with flowsdk.Client(sqlite_url(path)) as client:
        old, new = client.get_run("old").record, client.get_run("new").record
        executors = [a.executor for a in client.get_run("old").actions]
    assert (old.phase, old.workdir) == (RunPhase.SUCCEEDED, "")
    assert (new.phase, new.workdir) == (RunPhase.SUCCEEDED, os.getcwd())
    assert executors == ["local"]  # an action recorded before executors were
    with flowsdk.Client(sqlite_url(path)) as client:
        # The old run's routine events, rows of their own, are read as they were; the
        # new run's are packed.
        assert client.get_run("old").events == events
        assert [e.phase for e in client.get_run("new").events if e.action == "a0"] == [
            ActionPhase.QUEUED,
            ActionPhase.RUNNING,
            ActionPhase.SUCCEEDED,
        ]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM routine_events WHERE run = 'new'").fetchone()[0]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert "WITHOUT ROWID" in tables["actions"]
    assert "WITHOUT ROWID" in tables["events"]


def test_a_store_from_a_newer_flowsdk_raises_store_error_and_is_untouched(
    tmp_path: Path,
) -> None:
    """A higher `user_version`: StoreError naming both schema versions; the file is unchanged."""
    path = tmp_path / "s.db"
    flowsdk.run(noop, name="first", store=sqlite_url(path))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = listing(tmp_path)
    ran.clear()
    with pytest.raises(StoreError) as reading, flowsdk.Client(sqlite_url(path)) as client:
        client.runs()
    with pytest.raises(StoreError) as running:
        flowsdk.run(noop, name="second", store=sqlite_url(path))
    assert listing(tmp_path) == before
    assert ran == []
    for exc in (reading.value, running.value):
        assert not isinstance(exc, StoreCorruptedError)
        assert re.search(rf"\b{SCHEMA_VERSION + 1}\b", str(exc))
        assert re.search(rf"\b{SCHEMA_VERSION}\b", str(exc))


def test_a_database_of_another_application_raises_store_corrupted_error(tmp_path: Path) -> None:
    """Another application's SQLite file: StoreCorruptedError, and it is left as it was."""
    path = tmp_path / "s.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (9.5)")
        conn.commit()
    before = listing(tmp_path)
    with pytest.raises(StoreCorruptedError) as reading, flowsdk.Client(sqlite_url(path)) as client:
        client.runs()
    with pytest.raises(StoreCorruptedError) as running:
        flowsdk.run(noop, name="first", store=sqlite_url(path))
    assert listing(tmp_path) == before
    assert ran == []
    assert str(path) in str(reading.value)
    assert str(path) in str(running.value)


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(5).randbytes(8192))


def _garbage_header(path: Path) -> None:
    flowsdk.run(noop, name="earlier", store=sqlite_url(path))
    data = path.read_bytes()
    path.write_bytes(b"not a database! " * 6 + data[96:])


def _truncated(path: Path) -> None:
    flowsdk.run(noop, name="earlier", store=sqlite_url(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_random_bytes, _garbage_header, _truncated])
def test_a_damaged_store_raises_store_corrupted_error_and_is_never_rewritten(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    """Corrupt store (random bytes, bad header, truncated): fail fast, file byte-for-byte kept."""
    path = tmp_path / "s.db"
    damage(path)
    ran.clear()
    before = listing(tmp_path)
    url = sqlite_url(path)
    with pytest.raises(StoreCorruptedError) as running:
        flowsdk.run(noop, name="fresh", store=url)
    with flowsdk.Client(url) as client:
        with pytest.raises(StoreCorruptedError) as listing_runs:
            client.runs()
        with pytest.raises(StoreCorruptedError):
            client.get_run("earlier")
        with pytest.raises(StoreCorruptedError):
            client.abort("earlier")
    assert listing(tmp_path) == before
    assert ran == []
    assert str(path) in str(running.value)
    assert str(path) in str(listing_runs.value)


# -- locks -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["EXCLUSIVE", "IMMEDIATE"])
def test_starting_a_run_on_a_locked_store_raises_store_locked_error(
    tmp_path: Path, mode: str
) -> None:
    """StoreLockedError after busy_timeout, no half-started run; reads still work (WAL).

    In WAL mode `BEGIN EXCLUSIVE` takes the same lock as `BEGIN IMMEDIATE`:
    readers go on reading the last committed state under either.
    """
    path = tmp_path / "s.db"
    url = sqlite_url(path) + "?busy_timeout=0.2"
    flowsdk.run(noop, name="earlier", store=url)
    ran.clear()
    with write_lock(path, mode):
        with pytest.raises(StoreLockedError):
            flowsdk.run(noop, name="late", store=url)
        with flowsdk.Client(url) as client:
            during = [r.name for r in client.runs()]
            earlier = client.get_run("earlier").phase
    with flowsdk.Client(url) as client:
        after = [r.name for r in client.runs()]
        with pytest.raises(RunNotFoundError):
            client.get_run("late")
    assert ran == []
    assert (during, earlier, after) == (["earlier"], RunPhase.SUCCEEDED, ["earlier"])


def test_control_on_a_locked_store_fails_loudly_and_is_never_applied_later(
    tmp_path: Path,
) -> None:
    """Client.abort under another writer's lock raises StoreLockedError; nothing is queued."""
    path = tmp_path / "s.db"
    url = sqlite_url(path)
    with Runner("control.py", url, "p6", "one_child") as runner:
        runner.started(2)
        with flowsdk.Client(url + "?busy_timeout=0.2") as client:
            with write_lock(path), pytest.raises(StoreLockedError):
                client.abort("p6", "a1", reason="during-lock")
            sync(client, "p6")
            live = client.get_run("p6")
            client.abort("p6", "a1", reason="after-lock")
            assert runner.finish() == 0
            run = client.get_run("p6")
    assert [a.phase for a in live.actions] == [ActionPhase.RUNNING] * 2
    requests = [e for e in run.events if e.kind is EventKind.REQUEST]
    assert [e.reason for e in requests] == ["after-lock"]


@pytest.mark.slow
def test_a_runner_survives_a_lock_held_past_its_busy_timeout(tmp_path: Path) -> None:
    """A lock held across a heartbeat delays the runner's writes; none is lost."""
    path = tmp_path / "s.db"
    url = sqlite_url(path) + "?busy_timeout=0.2"
    with Runner("store_io.py", url, "p6b", "lock_across_heartbeat") as runner:
        runner.started(1)
        with flowsdk.Client(url) as client:
            with write_lock(path):
                runner.send()
                runner.expect("SLEPT")
                during = client.get_run("p6b").phase
            code = runner.finish()
            run = client.get_run("p6b")
    assert during is RunPhase.RUNNING
    assert code == 0, runner.output
    assert run.phase is RunPhase.SUCCEEDED
    assert [a.phase for a in run.actions] == [ActionPhase.SUCCEEDED] * 3
    assert_clean(run)


# -- two processes -----------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["new-store", "existing-store"])
def test_two_runners_starting_the_same_run_name_exactly_one_wins(
    tmp_path: Path, existing: bool
) -> None:
    """Two runners of one run name start at once: one runs, the other gets RunExistsError.

    No record is mixed.
    """
    url = sqlite_url(tmp_path / "s.db")
    if existing:
        flowsdk.run(noop, name="earlier", store=url)
    with (
        Runner("store_io.py", url, "p7", "same_name", "A") as a,
        Runner("store_io.py", url, "p7", "same_name", "B") as b,
    ):
        a.expect("READY")
        b.expect("READY")
        a.send()
        b.send()
        first = {ident: r.expect_any("STARTED", "EXISTS")[0] for ident, r in (("A", a), ("B", b))}
        [winner] = [ident for ident, word in first.items() if word == "STARTED"]
        loser = b if winner == "A" else a
        assert loser.finish() == EXIT_RUN_EXISTS, loser.output
        assert (a if winner == "A" else b).finish() == 0
        with flowsdk.Client(url) as client:
            run = client.get_run("p7")
            names = sorted(r.name for r in client.runs())
    assert sorted(first.values()) == ["EXISTS", "STARTED"]
    assert names == (["earlier", "p7"] if existing else ["p7"])
    assert [a.task for a in run.actions] == [f"p7{winner}.contender"]
    assert [e.seq for e in run.events] == list(range(len(run.events)))
    assert [e.phase for e in run.events if e.kind is EventKind.RUN] == ["RUNNING", "SUCCEEDED"]
    assert_clean(run)


def test_readers_never_wait_for_a_runner_that_is_writing(tmp_path: Path) -> None:
    """WAL: a second process reads a run while its runner writes, with busy_timeout=0.

    The runner keeps a few batches ahead of the reads (tests/runners/store_io.py `writer`),
    never more: each read loads the whole run, so a runner free to write on would make
    every read slower than the last on a busy machine.
    """
    path = tmp_path / "s.db"
    url = sqlite_url(path)
    with (
        Runner("store_io.py", url, "busy", "writer") as runner,
        flowsdk.Client(url + "?busy_timeout=0") as reader,
        flowsdk.Client(url) as control,
    ):
        runner.expect("BATCH")
        snapshots = []
        for _ in range(20):
            snapshots.append(reader.get_run("busy"))
            runner.send("go")  # one more batch
            runner.expect("BATCH")
        sync(control, "busy")
        snapshots.append(reader.get_run("busy"))
        assert runner.finish() == 0
    for snapshot in snapshots:
        assert [e.seq for e in snapshot.events] == list(range(len(snapshot.events)))
    counts = [len(s.actions) for s in snapshots]
    assert counts == sorted(counts)
    assert counts[-1] >= 20 * 20


def test_a_write_failure_mid_run_is_reported_and_never_recorded_as_success(
    tmp_path: Path,
) -> None:
    """Writes fail (file size limit): teardown completes, flowsdk.run raises StoreError."""
    # A short busy timeout: failing writes are retried for one, the last ones for ten.
    url = sqlite_url(tmp_path / "s.db") + "?busy_timeout=0.5"
    with Runner("store_io.py", url, "p8", "disk_full") as runner:
        runner.expect("LIMITED")
        code = runner.finish()
    with flowsdk.Client(url) as client:
        run = client.get_run("p8")
    assert code == EXIT_STORE_ERROR, runner.output
    assert "CLEANUP a1" in runner.lines
    assert any(line.startswith("STORE-ERROR StoreError") for line in runner.lines)
    assert run.phase in (RunPhase.FAILED, RunPhase.CRASHED)
    assert all(a.phase.terminal for a in run.actions)


# -- benchmarks ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_store.py", "bench_abort.py"])
def test_benchmark_runs_quick_and_prints_its_table(
    tmp_path: Path, script: str, request: pytest.FixtureRequest
) -> None:
    """benchmarks/<script> --quick runs to the end and prints its table (no timing asserted)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The session's server, not a second one: the benchmark makes its own database there.
    # Without PostgreSQL here the benchmark reports its PostgreSQL rows as n/a.
    with contextlib.suppress(pytest.skip.Exception):
        env["FLOWSDK_TEST_POSTGRES"] = request.getfixturevalue("postgres_server").admin_url
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "target" in done.stdout
    assert "|" in done.stdout


# -- reads and last writes under another writer's lock -----------------------------------------


def test_a_read_never_waits_for_the_lock_to_record_a_crash_and_dates_it_by_the_heartbeat(
    tmp_path: Path,
) -> None:
    """A dead runner found under a lock is left RUNNING for now; later CRASHED at its last beat.

    The store's busy timeout is two minutes here: a read that waited for the lock to
    write CRASHED would overrun the test's timeout.
    """
    path = tmp_path / "s.db"
    url = sqlite_url(path)
    with Runner("control.py", url, "gone", "one_child") as runner:
        runner.started(2)
        with flowsdk.Client(url) as client:
            sync(client, "gone")
        runner.proc.kill()
        runner.proc.wait(timeout=30)
        killed_at = time.time()
    slow = url + "?busy_timeout=120"
    with write_lock(path), flowsdk.Client(slow) as client:
        assert [r.phase for r in client.runs()] == [RunPhase.RUNNING]
    with flowsdk.Client(slow) as client:
        run = client.get_run("gone")
    assert run.phase is RunPhase.CRASHED
    assert run.record.ended_at is not None
    assert run.record.ended_at.timestamp() <= killed_at  # its last heartbeat, not this read
    assert [a.phase for a in run.actions] == [ActionPhase.CRASHED] * 2


def test_the_last_writes_of_a_run_wait_for_a_lock_and_say_so(tmp_path: Path) -> None:
    """SPEC §5: a run that ends under another writer's lock waits (logging), then records."""
    path = tmp_path / "s.db"
    url = sqlite_url(path) + "?busy_timeout=1"
    with Runner("store_io.py", url, "late", "lock_across_heartbeat") as runner:
        runner.started(1)
        with write_lock(path):
            runner.send()
            runner.expect("SLEPT")
            runner.send()  # the run ends while the lock is still held
            runner.expect("run", "late:", "has", "ended;", "waiting", "for", "the", "lock")
        code = runner.finish()
    assert code == 0, runner.output
    with flowsdk.Client(url) as client:
        run = client.get_run("late")
    assert run.phase is RunPhase.SUCCEEDED
    assert_clean(run)


def test_a_runner_killed_right_after_creating_its_run_leaves_a_retryable_run(
    tmp_path: Path,
) -> None:
    """SPEC §5: the run's row and its root's inputs are written together; the run retries."""
    url = sqlite_url(tmp_path / "s.db")
    with Runner("die_after_start.py", url, "cut") as runner:
        assert runner.finish() == 137
    with flowsdk.Client(url) as client:
        crashed = client.get_run("cut")
        assert crashed.phase is RunPhase.CRASHED
        assert [(a.name, a.phase) for a in crashed.actions] == [("a0", ActionPhase.CRASHED)]
        retried = client.retry("cut")
    assert (retried.phase, retried.attempt, retried.result()) == (RunPhase.SUCCEEDED, 2, 42)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 600 KB tmpfs (root only), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_stops_the_run_and_is_reported_as_disk_full_not_as_damage(
    small_disk: Path,
) -> None:
    """SPEC §5: retried for the busy timeout, then the run is stopped: never runs unrecorded."""
    path = small_disk / "s.db"
    url = sqlite_url(path) + "?busy_timeout=0.5"
    env = flowsdk.TaskEnvironment("fill")
    made: list[int] = []
    stopped: list[str] = []

    @env.task
    async def big(i: int) -> bytes:
        made.append(i)
        return bytes(40_000) + i.to_bytes(4, "big")

    @env.task
    async def fill() -> int:
        try:
            for i in range(100_000):
                await big(i)
                await asyncio.sleep(0.001)  # the workload goes on while its writes fail
        except asyncio.CancelledError as exc:
            stopped.append(str(exc))
            raise
        return len(made)

    with pytest.raises(StoreError) as info:
        flowsdk.run(fill, name="filled", store=url)
    assert not isinstance(info.value, StoreCorruptedError)
    assert "disk full" in str(info.value)
    assert len(made) < 100_000  # stopped, not run on unrecorded
    [message] = stopped
    assert "the store could not be written" in message
    assert "disk full" in message
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


_FILE_SIZE_LIMITED = """
import asyncio, resource, sys
import flowsdk
from flowsdk.errors import StoreCorruptedError, StoreError

resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
env = flowsdk.TaskEnvironment("fill")

@env.task
async def big(i: int) -> bytes:
    return bytes(40_000) + i.to_bytes(4, "big")

@env.task
async def fill() -> None:
    for i in range(1_000):
        await big(i)
        await asyncio.sleep(0.001)

try:
    flowsdk.run(fill, name="filled", store=sys.argv[1])
except StoreCorruptedError as exc:
    print("DAMAGED", exc)
except StoreError as exc:
    print("STORE", exc)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="no file-size limit (RLIMIT_FSIZE) there")
def test_a_file_size_limit_is_named_as_such_not_as_a_disk_io_error(tmp_path: Path) -> None:
    """`ulimit -f` reached mid-run: the error says which limit, and the store stays whole."""
    path = tmp_path / "s.db"
    done = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMITED, sqlite_url(path) + "?busy_timeout=0.2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.startswith("STORE "), done.stdout + done.stderr
    assert "file-size limit (600,000 bytes" in done.stdout
    assert "ulimit -f" in done.stdout
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@env.task
async def wide_leaf(i: int) -> int:
    return i


@env.task
async def wide(n: int) -> int:
    return sum(await asyncio.gather(*(wide_leaf(i) for i in range(n))))


def test_a_wide_fan_out_keeps_every_event_in_order_across_the_writers_chunks(
    tmp_path: Path,
) -> None:
    """Rows are written many to a statement: no event or action is lost, reordered or changed."""
    n = 700  # several chunks of routine events, in one batch or in several
    sqlite = flowsdk.run(wide, n, name="wide", store=sqlite_url(tmp_path / "s.db"))
    memory = flowsdk.run(wide, n, name="wide", store="memory://")
    with flowsdk.Client(sqlite_url(tmp_path / "s.db")) as client:
        stored = client.get_run("wide").events
        actions = client.get_run("wide").actions
    assert sqlite.result() == sum(range(n))
    assert actions == sqlite.actions  # action rows too go many to a statement
    assert [e.seq for e in stored] == list(range(len(stored)))
    assert stored == sqlite.events
    shape = [(e.kind, e.action, e.phase, e.cause, e.reason) for e in stored]
    assert shape == [(e.kind, e.action, e.phase, e.cause, e.reason) for e in memory.events]
    assert sum(e.phase == "SUCCEEDED" and e.kind is EventKind.ACTION for e in stored) == n + 1


def test_routine_events_are_packed_and_read_back_after_any_cursor(tmp_path: Path) -> None:
    """A write's routine events are one packed row: a follower's cursor may fall inside one."""
    path = tmp_path / "s.db"
    n = 700
    flowsdk.run(wide, n, name="packed", store=sqlite_url(path))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT count(*) FROM events WHERE run = 'packed'").fetchone()[0]
        packs = conn.execute("SELECT count(*) FROM routine_events WHERE run = 'packed'")
        packed = packs.fetchone()[0]
    store = SQLiteStore(sqlite_url(path))
    try:
        everything = store.events_since("packed", -1)
        assert [e.seq for e in everything] == list(range(len(everything)))
        assert len(everything) >= 3 * (n + 1)  # QUEUED, RUNNING and an ending per action
        assert rows < 10  # the run's own events; every action's routine ones are packed
        assert 1 <= packed < n
        for cursor in [*range(-1, len(everything), 37), len(everything) - 2, len(everything) - 1]:
            assert store.events_since("packed", cursor) == everything[cursor + 1 :], cursor
    finally:
        store.close()


def test_one_action_is_read_by_keyed_lookups_never_the_whole_run(tmp_path: Path) -> None:
    """`load_action` reads the action's rows by key, and only the packs its name is in."""
    path = tmp_path / "s.db"
    flowsdk.run(wide, 700, name="keyed", store=sqlite_url(path))
    # A pack whose time happens to hold the bytes that name a1 in MessagePack
    # (0xa2 "a1"): found by the database's search, and dropped when unpacked.
    (at,) = struct.unpack(">d", b"\x3f\xa2a1\x00\x00\x00\x01")
    assert b"\xa2a1" in msgspec.msgpack.encode([(10**9, at, "a9", "QUEUED")])
    with contextlib.closing(sqlite3.connect(path)) as writer, writer:
        writer.execute(
            "INSERT INTO routine_events VALUES ('keyed', 1, ?, ?)",
            (10**9, msgspec.msgpack.encode([(10**9, at, "a9", "QUEUED")])),
        )
    store = SQLiteStore(sqlite_url(path))
    try:
        everything = store.events_since("keyed", -1)
        statements: list[str] = []
        conn = store._read()
        assert conn is not None
        conn.set_trace_callback(statements.append)
        for name in ["a0", "a1", "a9", "a350", "a700"]:
            detail = store.load_action("keyed", None, name)
            assert detail.action.name == name
            assert detail.events == [e for e in everything if e.action == name]
        conn.set_trace_callback(None)
    finally:
        store.close()
    reads = [s for s in statements if "FROM actions" in s]
    assert reads
    assert all("name IN (" in s for s in reads), reads
    packs = [s for s in statements if "FROM routine_events" in s]
    assert packs
    assert all("instr(packed, " in s for s in packs), packs


def test_statements_bind_rows_with_plain_placeholders(tmp_path: Path) -> None:
    """Python 3.12 warns, and 3.14 refuses, a numbered `?1` bound from a sequence."""
    from flowsdk.store._sqlite_dialect import _statements

    flowsdk.run(wide, 300, name="plain", store=sqlite_url(tmp_path / "s.db"))
    assert _statements
    numbered = [sql[:80] for sql in _statements.values() if re.search(r"\?\d", sql)]
    assert numbered == []


def test_a_runs_writer_keeps_a_small_page_cache_and_readers_the_default(tmp_path: Path) -> None:
    """The writer appends: SQLite's default cache of 2 MB would fill with pages never read again."""
    from flowsdk.store._sqlite_dialect import WRITER_CACHE_KIB, SQLiteDialect

    store = SQLiteStore(sqlite_url(tmp_path / "s.db"))
    dialect = SQLiteDialect(store.path, store._connect_for_writing)
    writer = dialect.connect()
    try:
        reader = store._read()
        assert reader is not None
        assert writer.execute("PRAGMA cache_size").fetchone()[0] == -WRITER_CACHE_KIB
        with contextlib.closing(sqlite3.connect(":memory:")) as plain:
            default = plain.execute("PRAGMA cache_size").fetchone()[0]
        assert reader.execute("PRAGMA cache_size").fetchone()[0] == default != -WRITER_CACHE_KIB
    finally:
        dialect.close(writer)
        store.close()


def wal_frames(path: Path) -> tuple[int, int]:
    """Frames in the store's write-ahead log, and how many of them are copied into the file.

    Read from the shared-memory index (`-shm`) without a connection, which could
    itself checkpoint: the header's `mxFrame` and the checkpoint info's `nBackfill`.
    """
    header = Path(f"{path}-shm").read_bytes()[:100]
    frames = int.from_bytes(header[16:20], sys.byteorder)
    return frames, int.from_bytes(header[96:100], sys.byteorder)


@env.task
async def written_then_idle(path: str, n: int) -> bool:
    """Record `n` actions, then wait (idle) until the log is copied back into the file."""
    await asyncio.gather(*(wide_leaf(i) for i in range(n)))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        frames, copied = wal_frames(Path(path))
        if frames and copied == frames:
            return True
        await asyncio.sleep(0.01)  # polls the index, until the deadline
    return False


def test_an_idle_runner_copies_its_log_back_so_no_control_request_has_to(
    tmp_path: Path,
) -> None:
    """A run that wrote and went quiet checkpoints its WAL itself (a small, quick checkpoint).

    Otherwise the log grows to SQLite's 1,000-page threshold and whichever commit
    crosses it (often a control request's) copies it all back, tens of ms.
    """
    path = tmp_path / "s.db"
    run = flowsdk.run(written_then_idle, str(path), 20, store=sqlite_url(path))
    assert run.result() is True


def test_a_control_request_never_copies_the_log_back_itself(tmp_path: Path) -> None:
    """The requester's commit leaves a large WAL as it is: the live runner checkpoints it."""
    path = tmp_path / "s.db"
    flowsdk.run(noop, name="ended", store=sqlite_url(path))
    filler = sqlite3.connect(path, isolation_level=None)
    try:
        filler.execute("PRAGMA wal_autocheckpoint = 0")
        filler.execute("BEGIN")
        for i in range(1_200):  # past SQLite's 1,000-page autocheckpoint
            filler.execute(
                "INSERT INTO cache VALUES (?, ?, ?, ?, ?)", ("filler", "v", str(i), bytes(4000), 0)
            )
        filler.execute("COMMIT")
        frames, copied = wal_frames(path)
        assert frames > 1_000
        assert copied == 0
        store = SQLiteStore(sqlite_url(path))
        try:
            reply = store.request(AbortRequest(run="ended", requested_by="tester"), timeout=10)
        finally:
            store.close()
        assert reply.unwrap().outcome is flowsdk.Outcome.ALREADY_ENDED
        after, copied_after = wal_frames(path)
        # Still the same log, grown by the request's rows, none of it copied back
        # (a checkpoint would have restarted the log from its first frame).
        assert after > frames
        assert copied_after == 0
    finally:
        filler.close()


mixed_env = flowsdk.TaskEnvironment("mixed", retries=1, backoff=0.0)
ATTEMPTS: list[int] = []


@mixed_env.task
async def flaky(i: int) -> int:
    ATTEMPTS.append(i)
    if ATTEMPTS.count(i) == 1:
        raise ValueError(f"first attempt of {i}")  # retried: a RUNNING entry with a message
    return i


SLEEPING = Gate("sleeping")


@mixed_env.task
async def sleeps() -> None:
    await SLEEPING.enter()  # held until cancelled


@mixed_env.task
async def mixed() -> int:
    total = sum(await asyncio.gather(*(flaky(i) for i in range(3))))
    sleeper = asyncio.create_task(sleeps())
    await SLEEPING.wait_running(SLEEPING.entered + 1)  # RUNNING before it is cancelled
    sleeper.cancel("enough")  # an ending with a request: ABORTED, cause cancelled
    with contextlib.suppress(asyncio.CancelledError):
        await sleeper
    return total


def test_routine_and_other_entries_interleave_alike_in_memory_and_in_sqlite(
    tmp_path: Path,
) -> None:
    """The memory store rebuilds routine entries in their place among retries and aborts."""
    shapes = []
    for store in ("memory://", sqlite_url(tmp_path / "s.db")):
        ATTEMPTS.clear()
        run = flowsdk.run(mixed, name="mixed", store=store)
        assert run.result() == 3
        events = run.events
        assert [e.seq for e in events] == list(range(len(events)))
        shapes.append([(e.kind, e.action, e.phase, e.cause, e.reason, e.message) for e in events])
    assert shapes[0] == shapes[1]
    assert any(m and "retrying" in m for *_, m in shapes[0])
    assert ("action", "a4", "ABORTED", "cancelled", "enough", None) in [
        (k.value, *rest) for k, *rest in shapes[0]
    ]


@pytest.fixture
def far_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backpressure from 30 unwritten changes (back under 10), so a test can reach it."""
    from flowsdk.store import _writer

    monkeypatch.setattr(_writer, "HIGH_WATER", 30)
    monkeypatch.setattr(_writer, "LOW_WATER", 10)


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Hold the store's write lock from another connection: the run's writer writes nothing."""
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        lock.execute("ROLLBACK")
        lock.close()


def test_a_store_far_behind_holds_back_new_actions_of_a_gather(
    tmp_path: Path, far_behind: None
) -> None:
    """Backpressure: past `HIGH_WATER` unwritten changes, a new action waits for the writer.

    Another connection holds the store's write lock, so nothing the run
    changes can be written. Of a `gather` of 200 calls, only those started
    before the changes passed the (lowered) threshold run; the others start
    once the lock is released, and the run completes with every action.
    """
    path = tmp_path / "flowsdk.db"
    env = flowsdk.TaskEnvironment("bp")
    started: list[int] = []

    @env.task
    async def child(i: int) -> int:
        started.append(i)
        await asyncio.sleep(0)
        return i

    @env.task
    async def root() -> list[int]:
        with write_locked(path):
            g = asyncio.gather(*(child(i) for i in range(200)))
            for _ in range(20):  # many loop steps: every body that may start, starts
                await asyncio.sleep(0)
            held_back = [len(started)]
        return [*held_back, sum(await g)]

    run = flowsdk.run(root, store=f"sqlite:///{path}")
    [while_locked, total] = run.result()
    assert 0 < while_locked <= 31, while_locked
    assert total == sum(range(200))
    assert len(started) == 200
    assert {a.phase for a in run.actions} == {ActionPhase.SUCCEEDED}
    assert len(run.actions) == 201


@pytest.mark.parametrize("ending", ["gather cancelled", "root returns"])
def test_calls_held_back_by_a_far_behind_store_never_start_once_given_up(
    tmp_path: Path, far_behind: None, ending: str
) -> None:
    """A held-back call whose `gather` is cancelled, or whose root exits, never starts.

    As a task cancelled before its first step: no action, no body. The calls
    that had started are cancelled as usual; nothing is left running.
    """
    path = tmp_path / "flowsdk.db"
    env = flowsdk.TaskEnvironment("bp2")
    started: list[int] = []

    @env.task
    async def child(i: int) -> int:
        started.append(i)
        await asyncio.sleep(3600)
        return i

    @env.task
    async def root() -> int:
        with write_locked(path):
            # (return_exceptions: an unawaited gather of cancelled children logs nothing)
            g = asyncio.gather(*(child(i) for i in range(200)), return_exceptions=True)
            for _ in range(20):
                await asyncio.sleep(0)
            if ending == "gather cancelled":
                g.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await g
        return len(started)

    run = flowsdk.run(root, store=f"sqlite:///{path}")
    held_back_started = run.result()
    assert 0 < held_back_started <= 31
    assert len(started) == held_back_started  # the others never ran
    children = [a for a in run.actions if a.task.endswith(".child")]
    assert len(children) == held_back_started
    cause = "cancelled" if ending == "gather cancelled" else "root_exit"
    assert {(a.phase, a.abort.cause.value if a.abort else None) for a in children} == {
        (ActionPhase.ABORTED, cause)
    }


def test_the_store_binds_none_bools_and_bytes_as_sqlite3_does_and_leaves_an_app_adapter() -> None:
    """The store's fast adapters change no stored value in the process, and never override.

    In a fresh interpreter: an adapter the application registered for `bool`
    before the store was imported stays; None, bytes (and, without such an
    adapter, a bool) are stored as the sqlite3 module stores them by default.
    """
    script = """
import sqlite3
plain = sqlite3.connect(":memory:")
query = "SELECT ?, typeof(?), ?, typeof(?), ?, typeof(?)"
values = (None, None, True, True, b"\\x00ab", b"\\x00ab")
before = plain.execute(query, values).fetchone()
import flowsdk.store._sqlite_dialect
after = plain.execute(query, values).fetchone()
assert after == before == (None, "null", 1, "integer", b"\\x00ab", "blob"), (before, after)
del sqlite3.adapters[(bool, sqlite3.PrepareProtocol)]
sqlite3.register_adapter(bool, lambda b: "yes" if b else "no")
import importlib
importlib.reload(flowsdk.store._sqlite_dialect)
assert plain.execute("SELECT ?", (True,)).fetchone() == ("yes",)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.ProgrammingError("Error binding parameter 2: type 'list' is not supported"),
        sqlite3.InterfaceError("Error binding parameter 1 - probably unsupported type."),
    ],
)
def test_a_value_sqlite_cannot_take_is_not_called_damage(error: sqlite3.Error) -> None:
    """A binding error is flowsdk's fault: a StoreError that says the file is intact."""
    with pytest.raises(StoreError) as caught, translate("/x/store.db"):
        raise error
    assert not isinstance(caught.value, StoreCorruptedError)
    assert "nothing in it was changed or damaged" in str(caught.value)
