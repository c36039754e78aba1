"""The command line (SPEC §6): verbs, exit codes and `--json` shapes, through real processes.

Every CLI call is a subprocess (`python -m flowsdk ...`) on a temporary SQLite
store, named both by `--store` and by `FLOWSDK_STORE` in the child's
environment. Live runs are runner subprocesses (`tests/workflows/hold.py`)
that print `STARTED a1` etc.; the tests synchronise on those lines with
blocking reads.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import pytest

import flowsdk
from flowsdk._records import AbortRequest, Outcome
from flowsdk.cli import main as cli_main
from flowsdk.cli._output import exit_code
from flowsdk.errors import (
    ActionNotFoundError,
    FlowError,
    InvalidStateError,
    PermissionDeniedError,
    RunNotFoundError,
    RuntimeUserError,
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
)
from flowsdk.store import SQLiteStore, open_store
from tests.support import pause
from tests.workflows import flaky

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0

RUN_KEYS = {"name", "phase", "started_at", "ended_at", "attempt", "stop"}
STOP_KEYS = {"mode", "reason", "requested_by", "requested_at"}
ACTION_KEYS = {
    "run",
    "name",
    "parent",
    "task",
    "group",
    "phase",
    "attempt",
    "started_at",
    "ended_at",
    "error",
    "abort",
    "cleanup_incomplete",
    "key",
    "replayed",
    "executor",
}
ERROR_KEYS = {"type", "message", "traceback"}
ABORT_KEYS = {"reason", "cause", "requested_by", "requested_at"}
EVENT_KEYS = {"seq", "at", "kind", "action", "phase", "cause", "reason", "requested_by", "message"}
ANSWER_KEYS = {"outcome", "phase", "message"}


# -- helpers ---------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def store_for(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "store.db")  # an absolute path: sqlite:////tmp/...


def child_env(store: str) -> dict[str, str]:
    env = dict(os.environ)
    env["FLOWSDK_STORE"] = store.split("?")[0]
    env.pop("NO_COLOR", None)
    return env


def command(store: str | None, *args: str) -> list[str]:
    return [sys.executable, "-m", "flowsdk", *args, *(["--store", store] if store else [])]


def cli_process(store: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    """Start `python -m flowsdk ARGS --store STORE` with its output piped (input too, if asked)."""
    return subprocess.Popen(
        command(store, *args),
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=child_env(store),
    )


def cli(store: str | None, *args: str, env_store: str | None = None) -> Result:
    """Run `python -m flowsdk ARGS --store STORE`; an expected error never shows a traceback."""
    done = subprocess.run(
        command(store, *args),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(env_store or store or "memory://"),
        timeout=TIMEOUT,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Result(done.returncode, done.stdout, done.stderr)


def actions_of(shown: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in shown["actions"]}


def assert_iso(value: str) -> None:
    assert datetime.fromisoformat(value).tzinfo is not None, value


def finished_run(store: str, name: str, *, fail: bool = False) -> None:
    """Record a run: a0 root > a1 stage (group train) > a2 flaky (2 attempts), a3 broken."""
    env = flowsdk.TaskEnvironment("cli")
    tries: list[int] = []

    @env.task(retries=1, backoff=0)
    async def flaky() -> int:
        tries.append(1)
        if len(tries) == 1:
            raise ValueError("first try fails")
        return len(tries)

    @env.task
    async def broken() -> None:
        raise KeyError("bad key")

    @env.task
    async def stage() -> int:
        value = await flaky()
        with contextlib.suppress(RuntimeUserError):
            await broken()
        return value

    @env.task
    async def root() -> int:
        async with flowsdk.group("train"):
            value = await stage()
        if fail:
            raise RuntimeError("root failed on purpose")
        return value

    flowsdk.run(root, name=name, store=store)


class Runner:
    """A runner subprocess of `tests/workflows/hold.py`, read line by line."""

    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc = proc
        self.log = log

    def expect(self, line: str) -> None:
        assert self.proc.stdout is not None
        got = self.proc.stdout.readline().strip()
        assert got == line, f"runner said {got!r}, expected {line!r}; stderr:\n{self.stderr()}"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        """Wait for the runner to exit by itself (its run has ended)."""
        self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, self.stderr()
        assert "Traceback" not in self.stderr(), self.stderr()

    def stderr(self) -> str:
        return self.log.read_text()


@pytest.fixture
def start_runner(tmp_path: Path) -> Iterator[Callable[[str, str], Runner]]:
    """Start runner subprocesses; every one is killed (if need be) and reaped at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(store: str, name: str) -> Runner:
        log = tmp_path / f"runner-{name}.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.workflows.hold", name],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=REPO,
                env=child_env(store),
            )
        procs.append(proc)
        return Runner(proc, log)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            with proc:
                proc.wait(timeout=TIMEOUT)


def read_frame(stream: IO[str]) -> list[str]:
    """Read one `watch` frame from a pipe: the lines up to the blank line that ends it."""
    lines = []
    while (line := stream.readline()) not in ("\n", ""):
        lines.append(line.rstrip("\n"))
    return lines


# -- runs --------------------------------------------------------------------------------


def test_runs_lists_newest_first_as_aligned_table(tmp_path: Path) -> None:
    """CLI runs: an aligned table (name, phase, started, duration, task), newest first."""
    store = store_for(tmp_path)
    for name in ("first-run", "second-run", "third-run"):
        finished_run(store, name, fail=name == "second-run")
    result = cli(store, "runs")
    assert result.code == 0
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "NAME",
        "PHASE",
        "ATTEMPT",
        "STARTED",
        "DURATION",
        "TASK",
        "REASON",
    ]
    assert [r.split()[0] for r in rows] == ["third-run", "second-run", "first-run"]
    assert [r.split()[1] for r in rows] == ["SUCCEEDED", "FAILED", "SUCCEEDED"]
    phase_column = header.index("PHASE")
    assert all(r[phase_column - 2 : phase_column] == "  " for r in rows)
    assert "\x1b[" not in result.stdout  # no color when stdout is not a terminal


def test_runs_filters_by_phase_and_limit(tmp_path: Path) -> None:
    """CLI runs --phase P (any case) and --limit N."""
    store = store_for(tmp_path)
    for name in ("first-run", "second-run", "third-run"):
        finished_run(store, name, fail=name == "second-run")
    failed = cli(store, "runs", "--phase", "failed")
    assert [r.split()[0] for r in failed.stdout.splitlines()[1:]] == ["second-run"]
    limited = cli(store, "runs", "--limit", "2", "--json")
    assert [r["name"] for r in limited.json()] == ["third-run", "second-run"]
    none = cli(store, "runs", "--phase", "CRASHED")
    assert (none.code, none.stdout.strip()) == (0, f"no CRASHED runs in {tmp_path / 'store.db'}")


def test_runs_json_is_a_list_of_run_objects_with_every_key(tmp_path: Path) -> None:
    """CLI runs --json: a list of RUN objects, newest first, null fields present."""
    store = store_for(tmp_path)
    finished_run(store, "older")
    finished_run(store, "newer")
    result = cli(store, "runs", "--json")
    assert result.code == 0
    runs = result.json()
    assert [r["name"] for r in runs] == ["newer", "older"]
    for run in runs:
        assert set(run) >= RUN_KEYS
        assert (run["phase"], run["attempt"], run["stop"]) == ("SUCCEEDED", 1, None)
        assert_iso(run["started_at"])
        assert_iso(run["ended_at"])


def test_runs_on_a_store_that_does_not_exist_shows_none_and_creates_nothing(
    tmp_path: Path,
) -> None:
    """CLI runs: reading a missing store lists no runs and does not create the file."""
    store = store_for(tmp_path)
    result = cli(store, "runs", "--json")
    assert (result.code, result.json()) == (0, [])
    assert list(tmp_path.iterdir()) == []


def test_store_defaults_to_flowsdk_store_environment_variable(tmp_path: Path) -> None:
    """CLI --store absent: $FLOWSDK_STORE names the store."""
    store = store_for(tmp_path)
    finished_run(store, "from-env")
    result = cli(None, "runs", "--json", env_store=store)
    assert [r["name"] for r in result.json()] == ["from-env"]


def test_console_script_is_the_same_program(tmp_path: Path) -> None:
    """CLI: the installed `flowsdk` console script runs the same command line."""
    script = Path(sys.executable).with_name("flowsdk")
    assert script.exists(), f"{script} is missing: run .venv/bin/pip install -e ."
    store = store_for(tmp_path)
    finished_run(store, "scripted")
    done = subprocess.run(
        [str(script), "runs", "--json", "--store", store],
        capture_output=True,
        text=True,
        env=child_env(store),
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [r["name"] for r in json.loads(done.stdout)] == ["scripted"]


def test_version_and_help_exit_0() -> None:
    """CLI: --version names the version; --help after a verb describes it."""
    version = cli(None, "--version")
    assert (version.code, version.stdout.strip()) == (0, f"flowsdk {flowsdk.__version__}")
    helped = cli(None, "abort", "--help")
    assert helped.code == 0
    assert "--group G" in helped.stdout
    assert "--store URL" in helped.stdout


# -- show --------------------------------------------------------------------------------


def test_show_draws_action_tree_with_groups_attempts_and_errors(tmp_path: Path) -> None:
    """CLI show: the tree indented by parent, with task, phase, duration, group, attempt, error."""
    store = store_for(tmp_path)
    finished_run(store, "tree")
    result = cli(store, "show", "tree")
    assert result.code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "tree", "SUCCEEDED"]
    header = next(i for i, line in enumerate(lines) if line.startswith("ACTION"))
    assert lines[header].split() == [
        "ACTION",
        "TASK",
        "PHASE",
        "DURATION",
        "GROUP",
        "ATTEMPT",
        "VALUES",
    ]
    rows = {line.split()[0]: line for line in lines[header + 1 :] if line.lstrip()[:1] == "a"}
    assert rows["a0"].startswith("a0 ")
    assert rows["a1"].startswith("  a1 ")
    assert rows["a2"].startswith("    a2 ")
    assert rows["a3"].startswith("    a3 ")
    assert rows["a1"].split()[1:3] == ["cli.stage", "SUCCEEDED"]
    assert rows["a2"].split()[4:6] == ["train", "2"]  # group, attempt
    assert rows["a2"].endswith("() -> 2")  # its values: no inputs, output 2
    assert rows["a3"].split()[1:3] == ["cli.broken", "FAILED"]
    assert "error KeyError: 'bad key'" in result.stdout


def test_show_json_has_run_and_every_action_field(tmp_path: Path) -> None:
    """CLI show --json: {"run": RUN, "actions": [...]}, every field present, SPEC strings."""
    store = store_for(tmp_path)
    finished_run(store, "shaped", fail=True)
    result = cli(store, "show", "shaped", "--json")
    assert result.code == 0
    shown = result.json()
    assert set(shown) == {"run", "actions", "queued_requests"}
    assert shown["queued_requests"] == []  # an ended run has no request waiting
    assert set(shown["run"]) >= RUN_KEYS
    assert shown["run"]["phase"] == "FAILED"
    for action in shown["actions"]:
        assert set(action) == ACTION_KEYS, action
        assert_iso(action["started_at"])
        assert_iso(action["ended_at"])
    actions = actions_of(shown)
    assert [a["name"] for a in shown["actions"]] == ["a0", "a1", "a2", "a3"]
    assert (actions["a0"]["parent"], actions["a0"]["group"], actions["a0"]["abort"]) == (
        None,
        None,
        None,
    )
    assert set(actions["a0"]["error"]) == ERROR_KEYS
    assert actions["a0"]["error"]["type"] == "RuntimeError"
    assert (actions["a2"]["attempt"], actions["a2"]["group"]) == (2, "train")
    assert (actions["a3"]["phase"], actions["a3"]["error"]["type"]) == ("FAILED", "KeyError")
    assert (actions["a0"]["key"], actions["a0"]["replayed"]) == ("a0", False)
    assert {a["executor"] for a in shown["actions"]} == {"local"}


def test_show_events_prints_the_event_log(tmp_path: Path) -> None:
    """CLI show --events: the event log after the tree; with --json an "events" list."""
    store = store_for(tmp_path)
    finished_run(store, "logged")
    text = cli(store, "show", "logged", "--events").stdout
    log = text.split("\nevents:\n")[1].splitlines()
    assert log[0].split() == ["SEQ", "TIME", "KIND", "ACTION", "PHASE", "CAUSE", "DETAILS"]
    assert log[1].split()[0] == "0"
    assert any(row.split()[3:6] == ["action", "a3", "FAILED"] for row in log[1:])
    assert log[-1].split()[3:6] == ["run", "-", "SUCCEEDED"]
    shown = cli(store, "show", "logged", "--events", "--json").json()
    assert set(shown) == {"run", "actions", "queued_requests", "events"}
    assert [e["seq"] for e in shown["events"]] == list(range(len(shown["events"])))
    for event in shown["events"]:
        assert set(event) == EVENT_KEYS
        assert_iso(event["at"])
    assert shown["events"][-1]["kind"] == "run"


def test_show_attempt_selects_an_attempt_and_names_a_missing_one(tmp_path: Path) -> None:
    """CLI show --attempt N: attempt 1 exists; attempt 2 is not found (exit 3), naming it."""
    store = store_for(tmp_path)
    finished_run(store, "once")
    assert cli(store, "show", "once", "--attempt", "1", "--json").json()["run"]["attempt"] == 1
    missing = cli(store, "show", "once", "--attempt", "2")
    assert missing.code == 3
    assert "'once' has no attempt 2" in missing.stderr


def test_show_draws_latest_attempt_and_attempt_n_an_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLI show: the latest attempt (replayed actions marked); --attempt 1 the failed one."""
    store = store_for(tmp_path)
    monkeypatch.delenv("FLOWSDK_TEST_READY", raising=False)
    run = flowsdk.run(flaky.root, "FLOWSDK_TEST_READY", name="flaky", store=store)
    assert run.phase.value == "FAILED"
    monkeypatch.setenv("FLOWSDK_TEST_READY", "1")
    with flowsdk.Client(store) as client:
        assert client.retry("flaky").phase.value == "SUCCEEDED"
    latest = cli(store, "show", "flaky")
    assert latest.stdout.splitlines()[0].split() == ["run", "flaky", "SUCCEEDED", "(attempt", "2)"]
    assert "replayed: " in latest.stdout
    first = cli(store, "show", "flaky", "--attempt", "1", "--json").json()
    assert (first["run"]["attempt"], first["run"]["phase"]) == (1, "FAILED")
    assert actions_of(first)["a2"]["error"]["type"] == "RuntimeError"
    second = actions_of(cli(store, "show", "flaky", "--json").json())
    assert (second["a1"]["replayed"], second["a2"]["replayed"]) == (True, False)
    [run] = cli(store, "runs", "--json").json()
    assert (run["attempt"], run["phase"]) == (2, "SUCCEEDED")


def test_watch_of_ended_run_prints_one_frame_and_exits_0(tmp_path: Path) -> None:
    """CLI watch: a run that has ended is drawn once; exit 0. --json: one object per line."""
    store = store_for(tmp_path)
    finished_run(store, "over")
    result = cli(store, "watch", "over")
    assert result.code == 0
    assert result.stdout.count("run over  SUCCEEDED") == 1
    lines = cli(store, "watch", "over", "--json").stdout.splitlines()
    assert len(lines) == 1
    assert set(json.loads(lines[0])) == {"run", "actions", "queued_requests"}


def test_watch_redraws_until_the_run_ends(tmp_path: Path, start_runner: Any) -> None:
    """CLI watch: a frame while the run runs, a new one when it changes, exit 0 at the end."""
    store = store_for(tmp_path)
    runner = start_runner(store, "live")
    runner.expect("STARTED a1")
    with cli_process(store, "watch", "live") as watch:
        assert watch.stdout is not None
        first = read_frame(watch.stdout)
        assert first, f"watch printed no frame; runner stderr:\n{runner.stderr()}"
        assert first[0].split() == ["run", "live", "RUNNING"]
        runner.release()
        rest, err = watch.communicate(timeout=TIMEOUT)
    assert watch.returncode == 0, err
    runner.expect("RESULT SUCCEEDED")
    runner.finish()
    *frames, summary = [f.splitlines() for f in rest.split("\n\n") if f.strip()]
    assert frames[-1][0].split() == ["run", "live", "SUCCEEDED"]
    assert summary == ["run live SUCCEEDED after " + summary[0].split(" after ")[1]]
    assert summary[0].endswith(": 2 actions (2 SUCCEEDED)")
    assert all(a != b for a, b in itertools.pairwise(frames))  # only on a change


def test_watch_reads_the_whole_run_once_then_only_what_changed(
    tmp_path: Path,
    start_runner: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Watch (in this process): one whole read, then events since its cursor at each poll."""
    store = store_for(tmp_path)
    runner = start_runner(store, "live")
    runner.expect("STARTED a1")
    whole_reads: list[str] = []
    polls = threading.Semaphore(0)
    load_run, events_since = SQLiteStore.load_run, SQLiteStore.events_since

    def counted_load_run(self: SQLiteStore, name: str, attempt: int | None = None) -> Any:
        whole_reads.append(name)
        return load_run(self, name, attempt)

    def counted_events_since(self: SQLiteStore, name: str, cursor: int, **kw: Any) -> Any:
        polls.release()
        return events_since(self, name, cursor, **kw)

    monkeypatch.setattr(SQLiteStore, "load_run", counted_load_run)
    monkeypatch.setattr(SQLiteStore, "events_since", counted_events_since)
    codes: list[int] = []
    watching = threading.Thread(target=lambda: codes.append(cli_main(["watch", "live"])))
    monkeypatch.setenv("FLOWSDK_STORE", store)
    watching.start()
    try:
        for _ in range(3):  # three polls of the live run
            assert polls.acquire(timeout=TIMEOUT)
    finally:
        runner.release()
        watching.join(TIMEOUT)
    assert not watching.is_alive()
    runner.expect("RESULT SUCCEEDED")
    runner.finish()
    assert codes == [0]
    assert whole_reads == ["live"]
    frames = [f.splitlines() for f in capsys.readouterr().out.split("\n\n") if f.strip()]
    assert frames[0][0].split() == ["run", "live", "RUNNING"]
    assert frames[-2][0].split() == ["run", "live", "SUCCEEDED"]
    assert frames[-1][0].endswith(": 2 actions (2 SUCCEEDED)")


# -- abort -------------------------------------------------------------------------------


def test_abort_of_running_action_in_runner_aborts_it_external(
    tmp_path: Path, start_runner: Any
) -> None:
    """Across processes: abort RUN a1 -> a1 ABORTED (external, reason), parent catches."""
    store = store_for(tmp_path)
    runner = start_runner(store, "job")
    runner.expect("STARTED a1")
    result = cli(store, "abort", "job", "a1", "--reason", "not needed", "--json")
    assert result.code == 0, result.stderr
    answer = result.json()
    assert set(answer) == ANSWER_KEYS
    assert answer["outcome"] == "applied"
    assert answer["phase"] in ("STOPPING", "ABORTED")
    runner.expect("CANCELLED a1")
    runner.expect("CAUGHT ActionAbortedError a1 external not needed")
    runner.expect("RESULT SUCCEEDED")
    runner.finish()
    shown = cli(store, "show", "job", "--json").json()
    actions = actions_of(shown)
    assert shown["run"]["phase"] == "SUCCEEDED"
    assert (actions["a0"]["phase"], actions["a1"]["phase"]) == ("SUCCEEDED", "ABORTED")
    abort = actions["a1"]["abort"]
    assert set(abort) == ABORT_KEYS
    assert (abort["cause"], abort["reason"]) == ("external", "not needed")
    assert "pid" in abort["requested_by"]
    assert_iso(abort["requested_at"])


def test_abort_of_whole_run_with_wait_reports_final_phase(
    tmp_path: Path, start_runner: Any
) -> None:
    """CLI abort RUN --wait: root ABORTED (external), child (ancestor); final phase reported."""
    store = store_for(tmp_path)
    runner = start_runner(store, "whole")
    runner.expect("STARTED a1")
    result = cli(store, "abort", "whole", "--reason", "enough", "--wait")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("applied")
    assert lines[-1] == "run 'whole' ended: ABORTED"
    runner.expect("CANCELLED a1")
    runner.expect("RESULT ABORTED")
    runner.finish()
    actions = actions_of(cli(store, "show", "whole", "--json").json())
    assert (actions["a0"]["abort"]["cause"], actions["a0"]["abort"]["reason"]) == (
        "external",
        "enough",
    )
    assert (actions["a1"]["phase"], actions["a1"]["abort"]["cause"]) == ("ABORTED", "ancestor")


def test_abort_of_group_aborts_its_actions_external(tmp_path: Path, start_runner: Any) -> None:
    """CLI abort RUN --group G: every action of the group is ABORTED with cause external."""
    store = store_for(tmp_path)
    runner = start_runner(store, "grouped")
    runner.expect("STARTED a1")
    missing = cli(store, "abort", "grouped", "--group", "evaluate")
    assert missing.code == 3
    assert "has no action in group 'evaluate'" in missing.stderr
    assert "its groups are: train" in missing.stderr
    result = cli(store, "abort", "grouped", "--group", "train", "--wait", "--json")
    assert result.code == 0, result.stderr
    answer = result.json()
    assert answer["outcome"] == "applied"
    assert answer["run"]["phase"] == "SUCCEEDED"
    runner.expect("CANCELLED a1")
    runner.expect("CAUGHT ActionAbortedError a1 external None")
    runner.expect("RESULT SUCCEEDED")
    runner.finish()
    actions = actions_of(cli(store, "show", "grouped", "--json").json())
    assert (actions["a1"]["phase"], actions["a1"]["abort"]["cause"]) == ("ABORTED", "external")


def test_abort_of_ended_action_exits_0_and_repeats_identically(tmp_path: Path) -> None:
    """CLI abort of an action that has ended: exit 0, says so; a repeat prints the same."""
    store = store_for(tmp_path)
    finished_run(store, "ended")
    first = cli(store, "abort", "ended", "a3")
    second = cli(store, "abort", "ended", "a3")
    assert first == second
    assert first.code == 0
    assert first.stdout.strip() == "action a3 of run 'ended' already finished: FAILED"
    answers = [cli(store, "abort", "ended", "a3", "--json") for _ in range(2)]
    assert answers[0] == answers[1]
    assert answers[0].json() == {
        "outcome": "already_ended",
        "phase": "FAILED",
        "message": "action a3 of run 'ended' already finished: FAILED",
    }


# -- stop --------------------------------------------------------------------------------


def test_stop_and_wait_goes_stopping_then_stopped_and_refuses_second(
    tmp_path: Path, start_runner: Any
) -> None:
    """CLI stop: STOPPING while a1 finishes, then STOPPED; a second stop-and-wait exits 1."""
    store = store_for(tmp_path)
    runner = start_runner(store, "halt")
    runner.expect("STARTED a1")
    first = cli(store, "stop", "halt", "--reason", "maintenance", "--json")
    assert first.code == 0, first.stderr
    assert first.json() == {
        "outcome": "applied",
        "phase": "STOPPING",
        "message": "stop (wait) of run 'halt' applied",
    }
    run = cli(store, "show", "halt", "--json").json()["run"]
    assert run["phase"] == "STOPPING"
    assert set(run["stop"]) == STOP_KEYS
    assert (run["stop"]["mode"], run["stop"]["reason"]) == ("wait", "maintenance")
    second = cli(store, "stop", "halt", "--json")
    assert second.code == 1
    assert second.json()["outcome"] == "refused"
    assert "already stopping" in second.json()["message"]
    runner.release()
    runner.expect("RESULT STOPPED")
    runner.finish()
    actions = actions_of(cli(store, "show", "halt", "--json").json())
    assert actions["a1"]["phase"] == "SUCCEEDED"


def test_stop_with_wait_returns_when_the_run_has_stopped(tmp_path: Path, start_runner: Any) -> None:
    """CLI stop --wait: says the stop is applied, then waits and reports STOPPED."""
    store = store_for(tmp_path)
    runner = start_runner(store, "patient")
    runner.expect("STARTED a1")
    with cli_process(store, "stop", "patient", "--wait") as stop:
        assert stop.stdout is not None
        assert stop.stdout.readline().strip() == "stop (wait) of run 'patient' applied"
        runner.release()
        rest, err = stop.communicate(timeout=TIMEOUT)
    assert stop.returncode == 0, err
    assert rest.splitlines()[-1] == "run 'patient' ended: STOPPED"
    runner.expect("RESULT STOPPED")
    runner.finish()


def test_stop_abandon_escalates_a_stopping_run(tmp_path: Path, start_runner: Any) -> None:
    """CLI stop --abandon on a STOPPING run: in-progress actions ABANDONED (stop), run STOPPED."""
    store = store_for(tmp_path)
    runner = start_runner(store, "drop")
    runner.expect("STARTED a1")
    assert cli(store, "stop", "drop").code == 0
    result = cli(store, "stop", "drop", "--abandon", "--reason", "stuck", "--wait", "--json")
    assert result.code == 0, result.stderr
    answer = result.json()
    assert answer["outcome"] == "applied"
    assert answer["run"]["phase"] == "STOPPED"
    assert answer["run"]["stop"]["mode"] == "abandon"
    runner.expect("CANCELLED a1")
    runner.expect("RESULT STOPPED")
    runner.finish()
    actions = actions_of(cli(store, "show", "drop", "--json").json())
    assert (actions["a1"]["phase"], actions["a1"]["abort"]["cause"]) == ("ABANDONED", "stop")
    assert actions["a1"]["abort"]["reason"] == "stuck"


# -- fail --------------------------------------------------------------------------------


def test_fail_marks_action_failed_and_parent_gets_runtime_user_error(
    tmp_path: Path, start_runner: Any
) -> None:
    """CLI fail RUN ACTION: a1 FAILED; its parent gets RuntimeUserError (ActionMarkedFailed)."""
    store = store_for(tmp_path)
    runner = start_runner(store, "marked")
    runner.expect("STARTED a1")
    missing = cli(store, "fail", "marked", "a7")
    assert missing.code == 3
    assert "'a7'" in missing.stderr
    result = cli(store, "fail", "marked", "a1", "--reason", "bad data", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["outcome"] == "applied"
    runner.expect("CANCELLED a1")
    runner.expect("CAUGHT RuntimeUserError a1 ActionMarkedFailedError")
    runner.expect("RESULT FAILED")
    runner.finish()
    shown = cli(store, "show", "marked", "--json").json()
    actions = actions_of(shown)
    assert shown["run"]["phase"] == "FAILED"
    assert (actions["a0"]["phase"], actions["a1"]["phase"]) == ("FAILED", "FAILED")
    error = actions["a1"]["error"]
    assert (error["type"], error["message"]) == (
        "flowsdk.errors.ActionMarkedFailedError",
        "action a1 of run 'marked' was marked as failed: bad data",
    )
    assert "error flowsdk.errors.ActionMarkedFailedError: " in cli(store, "show", "marked").stdout


def test_a_request_queued_for_a_runner_that_died_never_reaches_the_retry(
    url: str, start_runner: Any
) -> None:
    """An abort queued while the runner was stopped, then the runner killed: the retry runs.

    The request was meant for attempt 1, which ended CRASHED before its runner read
    it. The next attempt's row drops it (it used to abort the retry at once), and the
    answer it was waiting for says so.
    """
    store = url  # SQLite, then PostgreSQL
    runner = start_runner(store, "stale")
    runner.expect("STARTED a1")
    pause(runner.proc)  # alive, but reads no request
    with contextlib.closing(open_store(store)) as channel:
        queued = channel.request(
            AbortRequest(run="stale", reason="meant for attempt 1", requested_by="test"),
            timeout=0.2,
        ).unwrap()
    assert queued.outcome is Outcome.QUEUED
    runner.proc.kill()
    runner.proc.wait(timeout=TIMEOUT)
    with cli_process(store, "retry", "stale", "--json", stdin=True) as retry:
        assert retry.stdout is not None
        assert retry.stdout.readline().strip() == "STARTED a1"
        # The retry's runner answers requests oldest first: once it has answered this
        # one (a group that does not exist: not found), it has seen any older one.
        assert cli(store, "abort", "stale", "--group", "barrier").code == 3
        out, err = retry.communicate("go\n", timeout=TIMEOUT)  # the held child's release
    assert retry.returncode in (0, 6), (out, err)
    # The held workflow prints its own lines (`CAUGHT`, `RESULT`) around the run's JSON.
    lines = out.splitlines()
    shown = json.loads("\n".join(lines[lines.index("{") : lines.index("}") + 1]))
    assert shown["run"]["attempt"] == 2, out
    assert shown["run"]["phase"] == "SUCCEEDED"
    assert [a["abort"] for a in shown["actions"]] == [None, None]


def test_show_reports_crashed_run_after_runner_killed(tmp_path: Path, start_runner: Any) -> None:
    """CLI on a run whose runner died: CRASHED; an abort says it has ended (exit 0)."""
    store = store_for(tmp_path)
    runner = start_runner(store, "doomed")
    runner.expect("STARTED a1")
    # A request's answer is written after the rows recorded before it: once this
    # (refused) request is answered, a0 and a1 are in the store.
    assert cli(store, "abort", "doomed", "--group", "barrier").code == 3
    runner.proc.kill()
    runner.proc.wait(timeout=TIMEOUT)
    answer = cli(store, "abort", "doomed", "--json")
    assert answer.code == 0
    assert (answer.json()["outcome"], answer.json()["phase"]) == ("already_ended", "CRASHED")
    shown = cli(store, "show", "doomed", "--json").json()
    actions = actions_of(shown)
    assert (actions["a0"]["phase"], actions["a1"]["phase"]) == ("CRASHED", "CRASHED")
    # Ended at the last heartbeat, but never before they started (nor the run before them).
    for action in actions.values():
        assert action["ended_at"] >= action["started_at"], action
    assert shown["run"]["ended_at"] >= max(a["started_at"] for a in actions.values())
    # The human views say why, not only the event log.
    shown = cli(store, "show", "doomed")
    assert "crashed   its runner is gone" in shown.stdout
    listed = [line for line in cli(store, "runs").stdout.splitlines() if "doomed" in line]
    assert listed
    assert listed[0].rstrip().endswith("runner gone")


# -- errors and exit codes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["show"],
        ["fail", "some-run"],
        ["runs", "--limit", "-1"],
        ["runs", "--phase", "SLEEPING"],
        ["show", "r", "--attempt", "two"],
        ["abort", "r", "a1", "--group", "g"],
        ["runs", "--store", "postgresql://db/flows?busy_timeout=soon"],
        ["runs", "--store", "ftp://host/store.db"],
        ["runs", "--store", "sqlite:///x.db?busy_timeout=soon"],
    ],
)
def test_usage_errors_exit_2_without_traceback(argv: list[str], tmp_path: Path) -> None:
    """CLI exit 2: argparse errors and a bad --store URL."""
    result = cli(None, *argv, env_store=store_for(tmp_path))
    assert result.code == 2
    assert "error:" in result.stderr
    assert result.stdout == ""


def test_not_found_run_echoes_the_name_and_suggests_close_names(tmp_path: Path) -> None:
    """CLI exit 3: an unknown run is named, with close names suggested."""
    store = store_for(tmp_path)
    finished_run(store, "train-model")
    for verb in ("show", "watch", "abort", "stop"):
        result = cli(store, verb, "trian-model")
        assert result.code == 3, verb
        assert result.stderr.startswith("flowsdk: error: no run named 'trian-model'"), verb
        assert "did you mean 'train-model'?" in result.stderr


def test_not_found_action_lists_the_runs_actions(tmp_path: Path) -> None:
    """CLI exit 3: an unknown action of an ended run is named, with the run's actions."""
    store = store_for(tmp_path)
    finished_run(store, "known")
    for verb in ("abort", "fail"):
        result = cli(store, verb, "known", "a9")
        assert result.code == 3
        assert "run 'known' has no action 'a9'; its actions are a0, a1, a2, a3" in result.stderr


@pytest.mark.parametrize("argv", [["runs"], ["show", "r"], ["watch", "r"], ["abort", "r", "a1"]])
def test_corrupt_store_exits_5_and_is_left_untouched(argv: list[str], tmp_path: Path) -> None:
    """CLI exit 5: a store file of random bytes is reported corrupt, never modified."""
    path = tmp_path / "store.db"
    garbage = random.Random(5).randbytes(16384)
    path.write_bytes(garbage)
    result = cli(store_for(tmp_path), *argv)
    assert result.code == 5
    assert result.stderr.startswith("flowsdk: error: the store ")
    assert str(path) in result.stderr
    assert path.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.db"]


def test_locked_store_still_reads_but_control_exits_5(tmp_path: Path, start_runner: Any) -> None:
    """CLI exit 5: under BEGIN EXCLUSIVE (WAL) runs/show still read; a request is locked out."""
    store = store_for(tmp_path)
    runner = start_runner(store, "locked")
    runner.expect("STARTED a1")
    impatient = store + "?busy_timeout=0.2"
    holder = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    try:
        assert holder.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        holder.execute("BEGIN EXCLUSIVE")
        listed = cli(impatient, "runs", "--json")
        assert (listed.code, [r["name"] for r in listed.json()]) == (0, ["locked"])
        assert cli(impatient, "show", "locked", "--json").json()["run"]["phase"] == "RUNNING"
        refused = cli(impatient, "abort", "locked", "a1")
        assert refused.code == 5
        assert "is locked" in refused.stderr
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    runner.release()
    runner.expect("RESULT SUCCEEDED")
    runner.finish()
    actions = actions_of(cli(store, "show", "locked", "--json").json())
    assert actions["a1"]["phase"] == "SUCCEEDED"  # the refused abort never reached the runner


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidStateError("x"), 1),
        (RunNotFoundError("x"), 3),
        (ActionNotFoundError("x"), 3),
        (PermissionDeniedError("x"), 4),
        (StoreError("x"), 5),
        (StoreCorruptedError("x"), 5),
        (StoreLockedError("x"), 5),
    ],
)
def test_each_expected_error_has_its_exit_code(error: FlowError, code: int) -> None:
    """CLI exit codes: the mapping of SPEC §6 (4 has no verb that raises it yet)."""
    assert exit_code(error) == code


def test_abort_of_a_group_without_actions_says_so_and_lists_the_groups(tmp_path: Path) -> None:
    """CLI exit 3: a group that has no action (yet) is named, with the run's groups."""
    store = store_for(tmp_path)
    finished_run(store, "staged")
    result = cli(store, "abort", "staged", "--group", "deploy")
    assert result.code == 3
    assert "run 'staged' has no action in group 'deploy'" in result.stderr
    assert "its groups are: train" in result.stderr


def test_revoking_an_unknown_token_exits_3_and_a_revoked_one_is_refused(tmp_path: Path) -> None:
    """CLI exit 3: a token name that does not exist is not found; revoked already is exit 1."""
    store = store_for(tmp_path)
    assert cli(store, "token", "create", "ci", "--role", "viewer").code == 0
    unknown = cli(store, "token", "revoke", "nobody")
    assert unknown.code == 3
    assert unknown.stderr == "flowsdk: error: no token named 'nobody' (tokens: 'ci')\n"
    assert cli(store, "token", "revoke", "ci").code == 0
    again = cli(store, "token", "revoke", "ci")
    assert again.code == 1
    assert again.stderr == "flowsdk: error: the token 'ci' is revoked already\n"
