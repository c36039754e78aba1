"""What only the PostgreSQL store has (SPEC §9): hosts, sessions, leases, a server that goes away.

Runners are real subprocesses (tests/runners/) on a new database of the
session's PostgreSQL server; "hosts" are `FLOWSDK_HOST` identities, so one
machine plays several. The store contract and the cross-process control
tests run on PostgreSQL too (tests/test_store_contract.py,
tests/test_cross_process.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import flowsdk
from flowsdk import ActionPhase, RunPhase
from flowsdk.errors import StoreError
from flowsdk.store import open_store
from flowsdk.store._postgres_schema import EVENTS_AFTER, INSERT_EVENT, SCHEMA_VERSION, PgTarget
from flowsdk.store._rows import with_routine
from tests.pg_server import PostgresServer
from tests.runners.harness import Runner, sync

DEADLINE = 30.0


def admin(url: str) -> psycopg.Connection[tuple[object, ...]]:
    """A plain session on the test database (for what a test checks or arranges directly)."""
    return psycopg.connect(PgTarget(url).conninfo, autocommit=True)


def as_schema_5(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Rewrite the store's packed routine events as rows, as schema 5 kept them.

    For tests that turn a current store into an older one: the `routine_events`
    table goes (schema 6 created it).
    """
    rows: list[tuple[Any, ...]] = []
    attempts = conn.execute("SELECT DISTINCT run, run_attempt FROM flowsdk.routine_events")
    for run, attempt in attempts.fetchall():
        found = conn.execute(EVENTS_AFTER, {"run": run, "attempt": attempt, "cursor": -1})
        rows += [(run, attempt, *row) for row in with_routine(found.fetchall(), -1)]
    conn.execute("DELETE FROM flowsdk.events")
    with conn.cursor() as cur:
        cur.executemany(INSERT_EVENT, rows)
    conn.execute("DROP TABLE flowsdk.routine_events")


def runner_backend(url: str, run: str) -> int | None:
    """The server pid of the session holding run's advisory lock (None: no session holds it)."""
    with admin(url) as conn:
        row = conn.execute(
            "SELECT l.pid FROM flowsdk.runs r JOIN pg_locks l ON l.locktype = 'advisory' "
            "AND l.granted AND l.objsubid = 1 AND l.objid = (r.lock_key & 4294967295)::oid "
            "AND l.classid = (r.lock_key >> 32)::oid WHERE r.name = %s",
            (run,),
        ).fetchone()
    return None if row is None else int(str(row[0]))


def process_state(pid: int) -> str:
    """The state letter of process `pid` (`T`: stopped), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def wait_until(check: object, what: str) -> None:
    """Poll `check()` until true, failing after `DEADLINE` seconds."""
    assert callable(check)
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {DEADLINE:g} s")
        time.sleep(0.01)


@pytest.fixture
def on_host(monkeypatch: pytest.MonkeyPatch) -> object:
    """Set the `FLOWSDK_HOST` this process (and runners it starts next) claims to be."""

    def become(host: str) -> None:
        monkeypatch.setenv("FLOWSDK_HOST", host)

    return become


def phase_from(url: str, run: str) -> RunPhase:
    """Read the run's phase through a Client of its own (a reader on the current host)."""
    with flowsdk.Client(url) as client:
        return client.get_run(run).phase


def test_killed_runner_on_another_host_is_crashed_once_its_session_is_gone_a_live_one_never(
    pg_url: str, on_host: object
) -> None:
    """SIGKILL on host A: CRASHED on the first read after its session ends; host B stays RUNNING."""
    assert callable(on_host)
    on_host("host-a")
    with Runner("control.py", pg_url, "on-a", "crash") as a:
        a.expect("READY")
        on_host("host-b")
        with Runner("control.py", pg_url, "on-b", "one_child") as b:
            b.started(2)
            on_host("operator")
            assert phase_from(pg_url, "on-a") is RunPhase.RUNNING
            a.proc.kill()
            a.proc.wait(timeout=DEADLINE)
            wait_until(lambda: runner_backend(pg_url, "on-a") is None, "the session's end")
            with flowsdk.Client(pg_url) as client:
                crashed = client.get_run("on-a")
                live = client.get_run("on-b")
                answer = client.abort("on-b", "a1", reason="from another host")
            b.expect("CAUGHT", "ActionAbortedError")
            assert b.finish() == 0
    assert crashed.phase is RunPhase.CRASHED
    assert {a.phase for a in crashed.actions} <= {ActionPhase.SUCCEEDED, ActionPhase.CRASHED}
    # The reader's events come after every event the runner wrote, packed ones too.
    assert [e.seq for e in crashed.events] == list(range(len(crashed.events)))
    assert live.phase is RunPhase.RUNNING
    assert answer.outcome == "applied"
    assert phase_from(pg_url, "on-b") is RunPhase.SUCCEEDED


def test_paused_runner_is_crashed_from_another_host_once_its_lease_is_old_never_on_its_own(
    pg_url: str, on_host: object
) -> None:
    """SIGSTOP keeps the session (lock held): only a lease older than 10 s makes it CRASHED."""
    assert callable(on_host)
    on_host("host-c")
    with Runner("control.py", pg_url, "paused", "one_child") as runner:
        runner.started(2)
        backend = runner_backend(pg_url, "paused")
        assert backend is not None
        with admin(pg_url) as conn:
            while True:  # pause it between two statements, never inside a transaction
                runner.proc.send_signal(signal.SIGSTOP)
                wait_until(lambda: process_state(runner.proc.pid) == "T", "the SIGSTOP")
                state = conn.execute(
                    "SELECT state FROM pg_stat_activity WHERE pid = %s", (backend,)
                ).fetchone()
                if state == ("idle",):
                    break
                runner.proc.send_signal(signal.SIGCONT)
            try:
                on_host("operator")
                assert phase_from(pg_url, "paused") is RunPhase.RUNNING  # lease fresh, lock held
                # Ten seconds pass for the lease, on the server's clock, without waiting them.
                conn.execute("UPDATE flowsdk.runs SET heartbeat = heartbeat - 11")
                on_host("host-c")
                own_host = phase_from(pg_url, "paused")
                on_host("operator")
                other_host = phase_from(pg_url, "paused")
            finally:
                runner.proc.send_signal(signal.SIGCONT)
    assert own_host is RunPhase.RUNNING  # a live runner on the reader's host is never crashed
    assert other_host is RunPhase.CRASHED


@pytest.fixture
def own_server(postgres_server: PostgresServer) -> PostgresServer:
    """The session's server, when the tests started it (so they may stop and start it)."""
    if not postgres_server.owned:
        pytest.skip("FLOWSDK_TEST_POSTGRES names a server these tests must not stop")
    return postgres_server


def test_database_away_and_back_within_the_busy_timeout_loses_no_change(
    pg_url: str, own_server: PostgresServer, on_host: object
) -> None:
    """The server stops mid-run; changes made meanwhile are all recorded once it is back."""
    assert callable(on_host)
    on_host("runner-host")
    url = pg_url + "?busy_timeout=60"
    with Runner("outage.py", url, "outage", "50") as runner:
        runner.expect("READY")
        own_server.stop_only()
        try:
            runner.send()
            worked = runner.expect("WORKED")
        finally:
            own_server.start_again()
        on_host("operator")
        # The runner's session ended with the server; its lease predates the restart and
        # is fresh: it is reconnecting, not gone.
        assert phase_from(url, "outage") is RunPhase.RUNNING
        assert runner.finish() == 0
    assert worked == ["WORKED", str(sum(range(51)))]
    assert runner.lines[-1] == "RESULT SUCCEEDED"
    with flowsdk.Client(url) as client:
        run = client.get_run("outage")
    assert run.phase is RunPhase.SUCCEEDED
    assert len(run.actions) == 52
    assert {a.phase for a in run.actions} == {ActionPhase.SUCCEEDED}
    assert [e.seq for e in run.events] == list(range(len(run.events)))


def test_database_away_past_the_busy_timeout_ends_the_run_with_store_error(
    pg_url: str, own_server: PostgresServer
) -> None:
    """Past its busy timeout the runner gives up: `flowsdk.run` raises StoreError saying why."""
    url = pg_url + "?busy_timeout=1"
    with Runner("outage.py", url, "gone", "5") as runner:
        runner.expect("READY")
        own_server.stop_only()
        try:
            runner.send()
            runner.expect("WORKED")
            code = runner.finish()  # the run ends; its writer has given up or gives up now
        finally:
            own_server.start_again()
    assert code == 5, runner.output
    assert "stayed unreachable for its busy timeout" in runner.lines[-1]
    assert phase_from(url, "gone") is RunPhase.CRASHED  # its process is gone: this host knows


# -- URLs, schema, errors ---------------------------------------------------------------


def test_missing_database_is_a_store_error_and_never_created(pg_url: str) -> None:
    """A database that does not exist: StoreError naming it; nothing is created."""
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_db_here"
    with pytest.raises(StoreError, match=r"no_such_db_here.*does not exist"):
        flowsdk.run(_noop(), name="x", store=missing)
    with admin(pg_url) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'no_such_db_here'")
        assert found.fetchone() is None


def test_password_is_never_shown(pg_url: str) -> None:
    """A URL's password appears in no message and no repr."""
    secret_url = pg_url.replace("postgres@", "postgres:s3cret-pw@").rsplit("/", 1)[0] + "/nodb"
    store = open_store(secret_url)
    with pytest.raises(StoreError) as caught:
        flowsdk.run(_noop(), name="x", store=store)
    assert "s3cret-pw" not in str(caught.value)
    assert "s3cret-pw" not in repr(store)


def test_newer_schema_is_refused_and_foreign_tables_are_left_alone(pg_url: str) -> None:
    """A schema from a newer flowsdk: StoreError; a `flowsdk` schema flowsdk did not make: too."""
    flowsdk.run(_noop(), name="first", store=pg_url)
    with admin(pg_url) as conn:
        conn.execute("UPDATE flowsdk.schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer flowsdk"), flowsdk.Client(pg_url) as client:
        client.runs()
    with admin(pg_url) as conn:
        conn.execute("DROP SCHEMA flowsdk CASCADE")
        conn.execute("CREATE SCHEMA flowsdk")
        conn.execute("CREATE TABLE flowsdk.runs (id int)")
    with pytest.raises(StoreError, match="did not create"):
        flowsdk.run(_noop(), name="second", store=pg_url)
    with admin(pg_url) as conn:
        columns = conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'flowsdk'"
        ).fetchone()
    assert columns == (1,)


def test_reading_an_empty_database_creates_nothing(pg_url: str) -> None:
    """A reader on a database without flowsdk's schema sees no runs and writes nothing."""
    with flowsdk.Client(pg_url) as client:
        assert client.runs() == []
    with admin(pg_url) as conn:
        assert conn.execute("SELECT to_regnamespace('flowsdk')").fetchone() == (None,)


def test_cli_works_on_a_postgres_store(pg_url: str, tmp_path: Path) -> None:
    """`flowsdk runs` and `show` read a PostgreSQL store given by --store."""
    import subprocess
    import sys

    flowsdk.run(_noop(), name="cli-run", store=pg_url)
    env = {**os.environ, "FLOWSDK_STORE": "memory://"}
    done = subprocess.run(
        [sys.executable, "-m", "flowsdk", "show", "cli-run", "--store", pg_url, "--json"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert '"SUCCEEDED"' in done.stdout
    missing = pg_url.rsplit("/", 1)[0] + "/absent_db"
    done = subprocess.run(
        [sys.executable, "-m", "flowsdk", "runs", "--store", missing],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 5
    assert "Traceback" not in done.stderr
    assert "absent_db" in done.stderr


_env = flowsdk.TaskEnvironment("pgmisc")


@_env.task
async def _noop_task() -> int:
    return 1


def _noop() -> flowsdk.Task[[], int]:
    return _noop_task


def test_role_privileges_read_only_lists_but_cannot_control(pg_url: str) -> None:
    """A role with SELECT only reads the history; a control request is permission denied.

    Once the runner is killed, the role shows the run and its unfinished actions
    CRASHED as it judges them, without recording it; the owner's next read records
    the same.
    """
    from flowsdk.errors import PermissionDeniedError

    role = f"viewer_{pg_url.rsplit('_', 1)[-1]}"
    viewer = pg_url.replace("postgres@", f"{role}@")
    with Runner("control.py", pg_url, "seen", "one_child") as runner:
        runner.started(2)
        with flowsdk.Client(pg_url) as owner:
            sync(owner, "seen")  # a1 is in the store before the runner is killed
        with admin(pg_url) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN")
            conn.execute(f"GRANT USAGE ON SCHEMA flowsdk TO {role}")
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA flowsdk TO {role}")
        try:
            with flowsdk.Client(viewer) as client:
                listed = [(r.name, r.phase) for r in client.runs()]
                with pytest.raises(PermissionDeniedError, match="lacks a privilege"):
                    client.abort("seen", reason="not allowed")
                runner.proc.kill()
                runner.proc.wait(timeout=DEADLINE)
                judged_list = [(r.name, r.phase) for r in client.runs()]
                judged = client.get_run("seen")
                one = client.get_action("seen", "a1").action
                _, outline = client.service.get_outline("seen")
        finally:
            with admin(pg_url) as conn:
                conn.execute(f"DROP OWNED BY {role}")
                conn.execute(f"DROP ROLE {role}")
    assert listed == [("seen", RunPhase.RUNNING)]
    assert judged_list == [("seen", RunPhase.CRASHED)]
    assert judged.phase is RunPhase.CRASHED
    assert {a.name: a.phase for a in judged.actions} == {
        "a0": ActionPhase.CRASHED,
        "a1": ActionPhase.CRASHED,
    }
    assert one == judged.action("a1")
    assert {a.phase for a in outline} == {"CRASHED"}
    with admin(pg_url) as conn:  # the role wrote nothing
        row = conn.execute("SELECT phase FROM flowsdk.runs WHERE name = 'seen'").fetchone()
    assert row is not None
    assert row[0] == "RUNNING"
    with flowsdk.Client(pg_url) as owner:
        recorded = owner.get_run("seen")
    assert recorded.phase is RunPhase.CRASHED
    assert recorded.record.ended_at == judged.record.ended_at
    assert [(a.name, a.phase, a.ended_at) for a in recorded.actions] == [
        (a.name, a.phase, a.ended_at) for a in judged.actions
    ]


def test_text_with_nul_characters_is_recorded_visibly(pg_url: str) -> None:
    """PostgreSQL text cannot hold NUL: an error message with one is kept, NUL escaped."""

    @_env.task
    async def nul_failure() -> None:
        raise ValueError("before\x00after")

    run = flowsdk.run(nul_failure, name="nul", store=pg_url)
    with flowsdk.Client(pg_url) as client:
        stored = client.get_run("nul")
    assert run.phase is RunPhase.FAILED
    assert stored.phase is RunPhase.FAILED
    error = stored.actions[0].error
    assert error is not None
    assert "before\\x00after" in error.message


SERVER_HOLDER = """
import sys
from tests.pg_server import PostgresServer
server = PostgresServer()
print(server._folder, flush=True)
sys.stdin.read()  # until killed
"""


def test_a_killed_test_process_leaves_no_postgresql_server_running(
    postgres_server: PostgresServer,
) -> None:
    """SIGKILL skips every teardown: the server's watchdog still stops it and removes its folder."""
    if not postgres_server.owned:
        pytest.skip("FLOWSDK_TEST_POSTGRES names a server: these tests start none of their own")
    holder = subprocess.Popen(
        [sys.executable, "-c", SERVER_HOLDER],
        cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        folder = Path(holder.stdout.readline().strip())
        pid = int((folder / "data" / "postmaster.pid").read_text().split()[0])
        assert process_state(pid) != "Z"
    finally:
        holder.kill()
        holder.wait(timeout=30)
        if holder.stdin is not None:
            holder.stdin.close()
        if holder.stdout is not None:
            holder.stdout.close()
    wait_until(lambda: not folder.exists(), "removing the killed session's server folder")
    wait_until(lambda: _gone(pid), "stopping the killed session's server")


def _gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie has: only its exit status is left)."""
    try:
        return process_state(pid) == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True
