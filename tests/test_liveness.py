"""Liveness (SPEC §5): a live runner on this host is never taken for dead; another host's is."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import flowsdk
from flowsdk import AbortCause, ActionPhase, Outcome, RunPhase
from tests.runners.harness import Runner, sqlite_url, sync
from tests.support import assert_clean, pause

REPO = Path(__file__).resolve().parent.parent


def test_a_paused_runner_on_this_host_stays_running_and_can_still_be_aborted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP past the heartbeat limit: RUNNING, no retry allowed; the abort waits for it."""
    monkeypatch.setattr("flowsdk._liveness.STALE_AFTER", 0.0)  # every heartbeat is stale now
    monkeypatch.setattr("flowsdk._service.ANSWER_TIMEOUT", 0.5)
    url = sqlite_url(tmp_path / "s.db")
    with Runner("control.py", url, "paused", "one_child") as runner, flowsdk.Client(url) as client:
        runner.started(2)
        runner.proc.send_signal(signal.SIGSTOP)
        try:
            assert [r.phase for r in client.runs()] == [RunPhase.RUNNING]
            assert client.get_run("paused").phase is RunPhase.RUNNING
            with pytest.raises(flowsdk.errors.InvalidStateError, match="still live"):
                client.retry("paused")
            queued = client.abort("paused", "a1", reason="while paused")
        finally:
            runner.proc.send_signal(signal.SIGCONT)
        assert queued.outcome is Outcome.QUEUED
        runner.expect("CAUGHT", "ActionAbortedError")
        assert runner.finish() == 0
        run = client.get_run("paused")
    assert run.phase is RunPhase.SUCCEEDED
    abort = run.action("a1").abort
    assert abort is not None
    assert (abort.cause, abort.reason) == (AbortCause.EXTERNAL, "while paused")
    assert_clean(run)


def test_a_stopped_runner_says_it_was_not_scheduled_not_that_a_body_blocked_the_loop(
    tmp_path: Path,
) -> None:
    """SIGSTOP then SIGCONT: the runner logs that the process was not scheduled.

    No CPU was used and its own thread was late too: never the blocked-loop
    warning, which blames a body.
    """
    url = sqlite_url(tmp_path / "s.db")
    with Runner("control.py", url, "starved", "one_child") as runner, flowsdk.Client(url) as client:
        runner.started(2)
        sync(client, "starved")  # both actions recorded: the store thread is idle, waiting
        line = ""
        # The store thread tells when a pause lands while it waits (nearly always); one
        # that lands in the middle of a write cannot be told from a slow write, so a
        # later pause tells instead.
        for _ in range(3):
            runner.proc.send_signal(signal.SIGSTOP)
            try:
                # Being stopped for a while is the behaviour under test: nothing to wait for.
                time.sleep(1.5)
                assert client.get_run("starved").phase is RunPhase.RUNNING
            finally:
                runner.proc.send_signal(signal.SIGCONT)
            sync(client, "starved")  # running again: what it logged on waking is written
            try:
                line = runner.expect_text("the process was not scheduled for")
                break
            except AssertionError:
                continue
        assert line, runner.output
        assert "(stopped, or the machine is overloaded)" in line
        assert client.abort("starved", "a1", reason="done").outcome is Outcome.APPLIED
        runner.expect("CAUGHT", "ActionAbortedError")
        assert runner.finish() == 0
        assert client.get_run("starved").phase is RunPhase.SUCCEEDED
    assert "event loop was blocked" not in runner.output, runner.output


def test_a_runner_on_another_host_is_crashed_once_its_heartbeat_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another host only the heartbeat tells: a stale one is CRASHED, its actions too."""
    url = sqlite_url(tmp_path / "s.db")
    with Runner("control.py", url, "far", "one_child") as runner:
        runner.started(2)
        with flowsdk.Client(url) as client:
            sync(client, "far")  # its actions are recorded
        monkeypatch.setenv("FLOWSDK_HOST", "operator-host")  # this process: another host now
        runner.proc.send_signal(signal.SIGSTOP)
        try:
            with flowsdk.Client(url) as client:
                assert client.get_run("far").phase is RunPhase.RUNNING  # its heartbeat is fresh
                monkeypatch.setattr("flowsdk._liveness.STALE_AFTER", 0.0)
                run = client.get_run("far")
        finally:
            runner.proc.kill()
    assert run.phase is RunPhase.CRASHED
    assert [a.phase for a in run.actions] == [flowsdk.ActionPhase.CRASHED] * 2
    # The reader's events come after every event the runner wrote, packed ones too.
    assert [e.seq for e in run.events] == list(range(len(run.events)))


def test_a_runner_that_finds_its_run_crashed_stops_its_bodies_and_records_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC §5: back from a pause seen as death elsewhere: stops, one event, StoreError."""
    url = sqlite_url(tmp_path / "s.db")
    monkeypatch.setenv("FLOWSDK_HOST", "runner-host")
    with Runner("control.py", url, "back", "one_child") as runner:
        runner.started(2)
        with flowsdk.Client(url) as client:
            sync(client, "back")
        monkeypatch.setenv("FLOWSDK_HOST", "operator-host")
        runner.proc.send_signal(signal.SIGSTOP)
        monkeypatch.setattr("flowsdk._liveness.STALE_AFTER", 0.0)
        with flowsdk.Client(url) as client:
            crashed = client.get_run("back")
        runner.proc.send_signal(signal.SIGCONT)
        runner.expect("CANCELLED", "a1")  # the runner stopped its own body
        code = runner.finish()
    assert crashed.phase is RunPhase.CRASHED
    assert code != 0
    assert "recorded CRASHED" in runner.output
    with flowsdk.Client(url) as client:
        after = client.get_run("back")
    assert after.phase is RunPhase.CRASHED
    assert [a.phase for a in after.actions] == [flowsdk.ActionPhase.CRASHED] * 2
    assert after.events[: len(crashed.events)] == crashed.events
    [note] = after.events[len(crashed.events) :]
    assert [e.seq for e in after.events] == list(range(len(after.events)))
    assert note.kind is flowsdk.EventKind.WARNING
    assert note.message is not None
    assert "found run 'back' recorded CRASHED" in note.message


def test_a_child_forked_by_a_body_exits_when_it_returns_into_the_workflow(
    tmp_path: Path,
) -> None:
    """os.fork() in a body: the child that returns exits at once; the rest runs once."""
    marks = tmp_path / "marks"
    url = sqlite_url(tmp_path / "s.db")
    done = subprocess.run(
        [sys.executable, "-m", "tests.workflows.forks", "forked", str(marks)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "FLOWSDK_STORE": url},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["RESULT SUCCEEDED exit=0"], done.stdout
    assert "forked by a task body, returned into the workflow" in done.stderr
    lines = marks.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["after", "child"], lines
    pids = {line.split()[0]: int(line.split()[1]) for line in lines}
    assert pids["child"] != pids["after"]
    with flowsdk.Client(url) as client:
        run = client.get_run("forked")
    assert [(a.task, a.phase) for a in run.actions] == [
        ("forks.root", ActionPhase.SUCCEEDED),
        ("forks.forker", ActionPhase.SUCCEEDED),
        ("forks.after", ActionPhase.SUCCEEDED),
    ]


def test_a_run_recorded_crashed_elsewhere_is_not_retried_on_its_runners_host_while_it_lives(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another host records a paused runner CRASHED; on the runner's own host, no retry yet.

    The runner's host can see its process: retrying there while it lives would run
    its work twice once it resumes (SPEC §5: only once its runner is gone). SQLite,
    then PostgreSQL.
    """
    monkeypatch.setenv("FLOWSDK_HOST", "runner-host")
    with Runner("control.py", url, "twice", "one_child") as runner:
        runner.started(2)
        with flowsdk.Client(url) as client:
            sync(client, "twice")
        runner.proc.send_signal(signal.SIGSTOP)
        try:
            monkeypatch.setenv("FLOWSDK_HOST", "operator-host")
            with monkeypatch.context() as stale:
                stale.setattr("flowsdk._liveness.STALE_AFTER", 0.0)  # SQLite's heartbeat
                if url.startswith("postgresql"):
                    stale.setattr("flowsdk.store._postgres_schema.LEASE", 0.0)  # its lease
                with flowsdk.Client(url) as client:
                    assert client.get_run("twice").phase is RunPhase.CRASHED
            monkeypatch.setenv("FLOWSDK_HOST", "runner-host")  # back on the runner's host
            with flowsdk.Client(url) as client:
                with pytest.raises(flowsdk.errors.InvalidStateError, match="is still alive"):
                    client.retry("twice")
                assert [r.attempt for r in client.runs()] == [1]  # nothing recorded
        finally:
            runner.proc.kill()


def _recorded_crashed_from_another_host(
    monkeypatch: pytest.MonkeyPatch, url: str, run: str
) -> None:
    """Read `run` as a reader on another host would once its paused runner's heartbeat is stale."""
    with monkeypatch.context() as elsewhere:
        elsewhere.setenv("FLOWSDK_HOST", "operator-host")
        elsewhere.setattr("flowsdk._liveness.STALE_AFTER", 0.0)
        with flowsdk.Client(url) as client:
            assert client.get_run(run).phase is RunPhase.CRASHED


@contextlib.contextmanager
def _paused_and_recorded_crashed(
    runner: Runner, monkeypatch: pytest.MonkeyPatch, url: str, run: str
) -> Iterator[None]:
    """Pause a runner once its first body started, and record its run CRASHED elsewhere.

    Every thread of the runner is stopped before the run is declared gone, as
    another host would see it; the runner resumes on leaving.
    """
    runner.started(1)
    with flowsdk.Client(url) as client:
        sync(client, run)
    pause(runner.proc)
    try:
        _recorded_crashed_from_another_host(monkeypatch, url, run)
        yield
    finally:
        runner.proc.send_signal(signal.SIGCONT)


def _heartbeat_older_than(path: Path, run: str, seconds: float) -> None:
    """Wait until the runner's recorded heartbeat is older than `seconds` (bounded poll)."""
    with contextlib.closing(sqlite3.connect(path)) as reader:
        deadline = time.monotonic() + 30
        while True:
            (beat,) = reader.execute("SELECT heartbeat FROM runs WHERE name = ?", (run,)).fetchone()
            if time.time() - beat > seconds:
                return
            assert time.monotonic() < deadline, "the runner's heartbeat kept being renewed"
            time.sleep(0.05)  # a bounded poll: the heartbeat ages with the clock


def test_a_runner_whose_heartbeat_lapsed_starts_no_body_until_it_is_renewed(
    tmp_path: Path,
) -> None:
    """The store locked past `HOLD_AFTER`: the next body waits, QUEUED, for the heartbeat.

    Another host may take a runner that cannot renew its heartbeat for dead and
    retry its run: a body started meanwhile could do its work twice (SPEC §5).
    """
    path = tmp_path / "s.db"
    with Runner("lease.py", sqlite_url(path), "lapsed", "two_steps", "0.5") as runner:
        runner.started(1)  # first's body waits for a line
        lock = sqlite3.connect(path, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")  # the runner can renew nothing now
            _heartbeat_older_than(path, "lapsed", 0.6)
            runner.send("go")  # first returns; the root calls second
            runner.expect_text("new actions wait until it is renewed")
            assert "STARTED a2" not in runner.output
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        runner.expect("STARTED", "a2")  # renewed: it starts
        assert runner.finish() == 0
    with flowsdk.Client(sqlite_url(path)) as client:
        run = client.get_run("lapsed")
    assert run.phase is RunPhase.SUCCEEDED
    assert_clean(run)


def test_a_runner_back_from_a_pause_seen_as_death_elsewhere_starts_no_new_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC §5: paused, recorded CRASHED from another host, resumed: the next body never starts.

    The runner's loop resumes with its writer: the body it would start next waits
    for a heartbeat, which finds the run CRASHED, and the run's bodies are stopped.
    """
    path = tmp_path / "s.db"
    url = sqlite_url(path)
    monkeypatch.setenv("FLOWSDK_HOST", "runner-host")
    with Runner("lease.py", url, "taken", "two_steps", "0.5") as runner:
        with _paused_and_recorded_crashed(runner, monkeypatch, url, "taken"):
            _heartbeat_older_than(path, "taken", 0.6)
            runner.send("go")  # read once it resumes: first returns, the root calls second
        code = runner.finish()
    assert code != 0
    assert "recorded CRASHED" in runner.output
    assert "STARTED a2" not in runner.output


def test_a_runner_that_gave_up_on_its_store_is_gone_while_its_process_lives_on(
    tmp_path: Path,
) -> None:
    """`flowsdk.run` raised StoreError in a process that goes on: the run is CRASHED, not RUNNING.

    Its process lives, but the run's lock is released: its bodies are stopped and
    nothing more is written, so a reader records it CRASHED and it may be retried.
    """
    url = sqlite_url(tmp_path / "s.db") + "?busy_timeout=0.5"  # its last writes fail fast
    with Runner("store_io.py", url, "filled", "disk_full_live_on") as runner:
        runner.expect("STORE-ERROR")
        with flowsdk.Client(url) as client:
            run = client.get_run("filled")
            assert runner.proc.poll() is None  # the process lives on, its disk freed
        assert run.phase is RunPhase.CRASHED
        assert runner.finish() == 5


def test_a_body_that_execs_another_program_leaves_its_run_crashed(tmp_path: Path) -> None:
    """Same pid, same start time, another program: the run's lock went with the exec."""
    url = sqlite_url(tmp_path / "s.db")
    with Runner("store_io.py", url, "execd", "execs") as runner:
        runner.started(1)
        with flowsdk.Client(url) as client:
            deadline = time.monotonic() + 30
            while client.get_run("execd").phase is RunPhase.RUNNING:
                assert runner.proc.poll() is None, "the program it became exited"
                assert time.monotonic() < deadline, "the run stayed RUNNING"
                time.sleep(0.05)  # a bounded poll: the exec comes right after STARTED
            assert runner.proc.poll() is None
            assert client.get_run("execd").phase is RunPhase.CRASHED
        runner.finish()


def test_a_runner_back_after_its_run_was_pruned_and_its_name_used_again_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row under its name is another runner's now: it stops, and starts no new body."""
    url = sqlite_url(tmp_path / "s.db")
    monkeypatch.setenv("FLOWSDK_HOST", "runner-host")
    with (
        Runner("lease.py", url, "x", "two_steps", "0.5") as old,
        _paused_and_recorded_crashed(old, monkeypatch, url, "x"),
    ):
        with flowsdk.Client(url) as client:
            assert [r.name for r in client.prune(keep=0).deleted] == ["x"]
        with Runner("lease.py", url, "x", "two_steps", "5") as new:
            new.started(1)
            time.sleep(0.7)  # the paused runner's lease (0.5 s) runs out: time must pass
            old.send("go")  # read once it resumes: its first returns, its root calls second
            old.proc.send_signal(signal.SIGCONT)
            assert old.finish() != 0
            assert "STARTED a2" not in old.output
            new.send("go")
            new.expect("STARTED", "a2")
            assert new.finish() == 0
    with flowsdk.Client(url) as client:
        run = client.get_run("x")
    assert run.phase is RunPhase.SUCCEEDED
    assert [a.phase for a in run.actions] == [flowsdk.ActionPhase.SUCCEEDED] * 3


def test_a_run_given_up_while_a_def_bodys_thread_still_runs_is_not_taken_for_gone(
    tmp_path: Path,
) -> None:
    """A thread cannot be stopped: while it runs, its work is not over, and no retry may start.

    The runner keeps its run's lock (the run stays RUNNING on this host) until no
    plain `def` body's thread of its process runs.
    """
    url = sqlite_url(tmp_path / "s.db") + "?busy_timeout=0.5"  # its last writes fail fast
    release = tmp_path / "release"
    with Runner("store_io.py", url, "threaded", "disk_full_with_a_thread", str(release)) as runner:
        runner.expect("STORE-ERROR")
        try:
            with flowsdk.Client(url) as client:
                assert client.get_run("threaded").phase is RunPhase.RUNNING
                with pytest.raises(flowsdk.errors.InvalidStateError, match="still live"):
                    client.retry("threaded")
        finally:
            release.touch()
        assert runner.finish() == 5
