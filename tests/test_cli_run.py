"""`flowsdk run` and `flowsdk retry` (SPEC §6), through real processes.

The workflow module is written into a temporary directory that is the child's
working directory, as a user's project would be.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

import flowsdk
from flowsdk._phases import RunPhase
from flowsdk._records import RunRecord
from flowsdk._text import preview
from flowsdk.cli._arguments import parse_arguments
from flowsdk.cli._output import UsageError
from flowsdk.cli._signatures import Params, task_params
from flowsdk.errors import InvalidStateError, RunExistsError, SerializationError

WORKFLOW = """
import os
import flowsdk

env = flowsdk.TaskEnvironment("cli")


def note(what: str) -> None:
    with open("calls.log", "a") as f:
        f.write(what + "\\n")


@env.task
async def add(x: int, y: int = 1) -> int:
    note(f"add {x} {y}")
    return x + y


@env.task
async def main(x: int, label: str = "z", flaky: bool = False) -> str:
    total = await add(x, y=2)
    if flaky and not os.path.exists("fixed"):
        raise RuntimeError("flaky")
    return f"{label}:{total}"
"""


def flowsdk_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLOWSDK_STORE": "sqlite:///runs.db", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "flowsdk", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "wf.py").write_text(WORKFLOW)
    return tmp_path


def shown(cwd: Path, run: str, *extra: str) -> dict[str, Any]:
    proc = flowsdk_cli(cwd, "show", run, "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    value: dict[str, Any] = json.loads(proc.stdout)
    return value


def test_run_parses_json_and_keyword_arguments_and_exits_0(project: Path) -> None:
    proc = flowsdk_cli(project, "run", "wf:main", "40", "label=answer", "--name", "r1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "run r1"
    assert "SUCCEEDED" in proc.stdout
    data = shown(project, "r1")
    assert data["run"]["phase"] == "SUCCEEDED"
    assert data["run"]["task"] == "wf:main"
    assert [a["task"] for a in data["actions"]] == ["cli.main", "cli.add"]
    assert (project / "calls.log").read_text() == "add 40 2\n"


def test_run_that_fails_exits_6(project: Path) -> None:
    proc = flowsdk_cli(project, "run", "wf:main", "1", "flaky=true", "--name", "r2", "--quiet")
    assert proc.returncode == 6
    assert proc.stdout.strip() == "run r2: FAILED"
    assert "Traceback" not in proc.stderr


def test_retry_replays_what_succeeded_and_keeps_both_attempts(project: Path) -> None:
    assert flowsdk_cli(project, "run", "wf:main", "1", "flaky=true", "--name", "r3").returncode == 6
    (project / "fixed").touch()
    proc = flowsdk_cli(project, "retry", "r3", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["run"]["attempt"] == 2
    assert data["run"]["phase"] == "SUCCEEDED"
    assert [(a["task"], a["replayed"]) for a in data["actions"]] == [
        ("cli.main", False),
        ("cli.add", True),
    ]
    assert (project / "calls.log").read_text() == "add 1 2\n"  # add ran once in all
    assert shown(project, "r3", "--attempt", "1")["run"]["phase"] == "FAILED"


def test_a_name_in_use_is_refused_before_the_run_is_announced(project: Path) -> None:
    assert flowsdk_cli(project, "run", "wf:main", "1", "--name", "T3").returncode == 0
    proc = flowsdk_cli(project, "run", "wf:main", "2", "--name", "T3")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("flowsdk: error: a run named 'T3' already exists")
    assert (project / "calls.log").read_text() == "add 1 2\n"  # the second one never ran


HELD = """
import asyncio
import os
import flowsdk

env = flowsdk.TaskEnvironment("held")


@env.task
async def wait() -> None:
    print("STARTED", flush=True)
    await asyncio.sleep(3600)


@env.task
async def main() -> None:
    if not os.path.exists("hold"):
        raise RuntimeError("fails until the file hold exists")
    await wait()
"""


@pytest.mark.parametrize(
    ("verb", "signum", "quiet"),
    [
        ("run", signal.SIGINT, False),
        ("run", signal.SIGTERM, True),
        ("retry", signal.SIGINT, True),
        ("retry", signal.SIGTERM, False),
    ],
)
def test_a_run_ended_by_a_signal_prints_its_end_then_exits_128_plus_n(
    tmp_path: Path, verb: str, signum: signal.Signals, quiet: bool
) -> None:
    """Ctrl-C (130) or SIGTERM (143): the same ending as a run that ended by itself."""
    (tmp_path / "held.py").write_text(HELD)
    if verb == "retry":
        assert flowsdk_cli(tmp_path, "run", "held:main", "--name", "h", "--quiet").returncode == 6
    argv = ["retry", "h"] if verb == "retry" else ["run", "held:main", "--name", "h"]
    (tmp_path / "hold").touch()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowsdk", *argv, *(["--quiet"] if quiet else [])],
        cwd=tmp_path,
        env={**os.environ, "FLOWSDK_STORE": "sqlite:///runs.db", "NO_COLOR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) != "STARTED\n":  # after `run h`, unless quiet
            assert line, "the run ended before its task started"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    lines = out.splitlines()
    if quiet:
        assert lines == ["run h: ABORTED"]
    else:
        attempt = "  (attempt 2)" if verb == "retry" else ""
        assert f"run h  ABORTED{attempt}" in lines  # the final tree's header
        assert lines[-1].startswith("run h ABORTED after ")
        assert lines[-1].endswith(": 2 actions (2 ABORTED)")


def test_retry_of_a_succeeded_run_is_refused_with_exit_1(project: Path) -> None:
    assert flowsdk_cli(project, "run", "wf:main", "1", "--name", "r4").returncode == 0
    proc = flowsdk_cli(project, "retry", "r4")
    assert proc.returncode == 1
    assert "SUCCEEDED" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_retry_of_an_unknown_run_exits_3(project: Path) -> None:
    assert flowsdk_cli(project, "run", "wf:main", "1", "--name", "known").returncode == 0
    proc = flowsdk_cli(project, "retry", "knwon")
    assert proc.returncode == 3
    assert "'knwon'" in proc.stderr
    assert "known" in proc.stderr


@pytest.mark.parametrize(
    "target",
    ["nope:main", "wf:missing", "wf", "wf:add.nothing"],
    ids=["module", "task", "colon", "attr"],
)
def test_run_of_a_task_that_cannot_be_found_is_a_usage_error(project: Path, target: str) -> None:
    proc = flowsdk_cli(project, "run", target)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_parse_arguments_splits_positional_and_keyword_values() -> None:
    assert parse_arguments(["1", "x", "[1, 2]", "k=v", "n=3", 'j={"a": null}']) == (
        ["1", "x", "[1, 2]"],
        {"k": "v", "n": "3", "j": '{"a": null}'},
    )
    with pytest.raises(UsageError):
        parse_arguments(["k=1", "2"])
    with pytest.raises(UsageError):
        parse_arguments(["k=1", "k=2"])


def test_a_script_run_can_be_retried_again_and_again(project: Path) -> None:
    """A run started from path/script.py:TASK keeps recording the file on every attempt."""
    script = str(project / "wf.py")
    assert (
        flowsdk_cli(project, "run", f"{script}:main", "1", "flaky=true", "--name", "s1").returncode
        == 6
    )
    for attempt in (2, 3):
        proc = flowsdk_cli(project, "retry", "s1", "--json")
        assert proc.returncode == 6, proc.stderr  # still flaky: FAILED again, but it ran
        data = json.loads(proc.stdout)
        assert data["run"]["attempt"] == attempt
        assert data["run"]["task"] == f"{script}:main"
    (project / "fixed").touch()
    assert flowsdk_cli(project, "retry", "s1").returncode == 0
    assert (project / "calls.log").read_text() == "add 1 2\n"  # replayed every time after the first


TYPED = """
import dataclasses
import flowsdk

env = flowsdk.TaskEnvironment("typed")


@dataclasses.dataclass
class Config:
    depth: int
    name: str


class DivergedError(Exception):
    pass


@env.task
async def typed(ref: str, n: int, ratio: float = 0.5, flag: bool = False,
                cfg: Config | None = None, tags: list[str] | None = None) -> str:
    return repr((ref, n, ratio, flag, cfg, tags))


@env.task
async def loose(value, *rest: int, **extra: float) -> str:
    return repr((value, rest, extra))


@env.task
async def diverge() -> None:
    raise DivergedError("loss is nan")
"""


@pytest.fixture
def typed_project(tmp_path: Path) -> Path:
    (tmp_path / "typed.py").write_text(TYPED)
    return tmp_path


def output_of(cwd: Path, run: str) -> Any:
    return shown_action(cwd, run, "a0")["output"]


def shown_action(cwd: Path, run: str, action: str) -> dict[str, Any]:
    proc = flowsdk_cli(cwd, "show", run, action, "--json")
    assert proc.returncode == 0, proc.stderr
    value: dict[str, Any] = json.loads(proc.stdout)
    return value


def test_run_converts_each_argument_to_its_parameters_annotation(typed_project: Path) -> None:
    cfg = '{"depth": 3, "name": "x"}'
    argv = ["typed:typed", "1.10", "5", "ratio=1e3", "flag=true", f"cfg={cfg}", 'tags=["a"]']
    proc = flowsdk_cli(typed_project, "run", *argv, "--name", "t1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert output_of(typed_project, "t1") == (
        "('1.10', 5, 1000.0, True, Config(depth=3, name='x'), ['a'])"
    )
    # A str parameter takes the text as it is, even when it looks like JSON.
    proc = flowsdk_cli(typed_project, "run", "typed:typed", "ref=[1]", "n=2", "--name", "t2")
    assert proc.returncode == 0, proc.stderr
    assert output_of(typed_project, "t2") == "('[1]', 2, 0.5, False, None, None)"
    # No annotation: JSON when it is JSON, else the text; *args and **kwargs by theirs.
    proc = flowsdk_cli(
        typed_project, "run", "typed:loose", "abc", "1", "2", "k=2.5", "--name", "t3"
    )
    assert proc.returncode == 0, proc.stderr
    assert output_of(typed_project, "t3") == "('abc', (1, 2), {'k': 2.5})"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["1.10"], "missing argument 'n' (int)"),
        (["x", '"5"'], "argument 'n' expects int (written as JSON), got"),
        (["x", "5", "flag=yes"], "argument 'flag' expects bool (written as JSON), got"),
        (["x", "5", 'cfg={"depth": "deep"}'], "argument 'cfg' expects typed.Config | None"),
        (["x", "5", "colour=red"], "unknown argument 'colour'; the task's parameters are: ref, n"),
        (["x", "5", "0.1", "true", "null", "null", "7"], "too many positional arguments"),
        (["x", "5", "n=6"], "argument 'n' is given twice"),
        (["x", "n=" + "[" * 10_000 + "]" * 10_000], "argument 'n'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_parameter_and_record_nothing(
    typed_project: Path, argv: list[str], message: str
) -> None:
    proc = flowsdk_cli(typed_project, "run", "typed:typed", *argv, "--name", "bad")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    runs = flowsdk_cli(typed_project, "runs", "--json")
    assert json.loads(runs.stdout) == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad/name!", "run name 'bad/name!' is not allowed"),
        ("", "run name must not be empty"),
        ("n" * 300, "run name is 300 characters long; the limit is 200"),
        ("tréning", "use ASCII letters"),
    ],
)
def test_a_bad_run_name_exits_2_without_a_traceback(
    typed_project: Path, name: str, message: str
) -> None:
    proc = flowsdk_cli(typed_project, "run", "typed:typed", "x", "1", "--name", name)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_script_is_named_as_missing(typed_project: Path) -> None:
    proc = flowsdk_cli(typed_project, "run", "not/there.py:x")
    assert proc.returncode == 2
    assert f"no script 'not/there.py' (relative to {typed_project}): the file does not exist" in (
        proc.stderr
    )
    assert "recorded for this run" not in proc.stderr


def test_a_store_that_cannot_be_read_fails_before_the_run_is_announced(
    typed_project: Path,
) -> None:
    (typed_project / "runs.db").write_bytes(b"this is not a database" * 100)
    proc = flowsdk_cli(typed_project, "run", "typed:typed", "x", "1", "--name", "never")
    assert proc.returncode == 5
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


def test_a_scripts_error_type_has_no_synthetic_module_name(typed_project: Path) -> None:
    proc = flowsdk_cli(typed_project, "run", "typed.py:diverge", "--name", "d1", "--quiet")
    assert proc.returncode == 6
    assert shown_action(typed_project, "d1", "a0")["action"]["error"]["type"] == "DivergedError"
    retried = flowsdk_cli(typed_project, "retry", "d1", "--quiet")
    assert retried.returncode == 6
    shown = flowsdk_cli(typed_project, "show", "d1")
    assert "error DivergedError: loss is nan" in shown.stdout
    assert "flowsdk_script_" not in shown.stdout


def test_options_before_the_verb_and_the_store_location_when_nothing_is_found(
    typed_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    proc = flowsdk_cli(typed_project, "run", "typed:typed", "x", "1", "--name", "here")
    assert proc.returncode == 0, proc.stderr
    before = flowsdk_cli(typed_project, "--store", "sqlite:///runs.db", "--json", "runs")
    assert before.returncode == 0, before.stderr
    assert [r["name"] for r in json.loads(before.stdout)] == ["here"]
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    lost = flowsdk_cli(elsewhere, "show", "here")
    assert lost.returncode == 3
    assert f"the store {elsewhere / 'runs.db'} has no runs yet" in lost.stderr
    assert "relative to the working directory" in lost.stderr
    empty = flowsdk_cli(elsewhere, "runs")
    assert empty.stdout.startswith(f"no runs in {elsewhere / 'runs.db'} (the store path")


def test_runs_lists_50_by_default_and_says_how_many_more(tmp_path: Path) -> None:
    store = "sqlite:///" + str(tmp_path / "many.db")

    @flowsdk.TaskEnvironment("many").task
    async def tiny() -> None:
        return None

    for i in range(53):
        flowsdk.run(tiny, name=f"r{i:02d}", store=store)
    env_proc = flowsdk_cli(tmp_path, "runs", "--store", store)
    lines = env_proc.stdout.splitlines()
    assert len(lines) == 1 + 50 + 1
    assert lines[1].split()[0] == "r52"
    assert lines[-1] == "3 more: --limit 53 (or --limit 0) to list them"
    everything = flowsdk_cli(tmp_path, "runs", "--store", store, "--limit", "0", "--json")
    assert len(json.loads(everything.stdout)) == 53


def test_an_input_nested_too_deeply_is_a_serialization_error() -> None:
    @flowsdk.TaskEnvironment("deep").task
    async def take(x: list[Any]) -> int:
        return len(x)

    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(SerializationError, match="parameter 'x' cannot be recorded"):
        flowsdk.run(take, deep)


def test_a_detached_launch_passes_each_value_exactly(typed_project: Path) -> None:
    """`launch_run` (the console's start) gives a str parameter the string, not its JSON."""
    proc = flowsdk_cli(typed_project, "run", "typed:typed", "x", "1", "--name", "first")
    assert proc.returncode == 0, proc.stderr
    with flowsdk.Client("sqlite:///" + str(typed_project / "runs.db")) as client:
        name = client.service.launch_run("typed:typed", ["1.10", 5], {"tags": ["a"]}, name="L1")
        deadline = time.monotonic() + 60
        while not client.get_run(name).phase.terminal:
            assert time.monotonic() < deadline, "the launched run never ended"
            time.sleep(0.05)  # polling a detached process's run, bounded by the deadline
    assert output_of(typed_project, "L1") == "('1.10', 5, 0.5, False, None, ['a'])"


@pytest.fixture
def runner_logs(typed_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`typed:typed` recorded once as run `first` (so it may be launched); runner logs here."""
    proc = flowsdk_cli(typed_project, "run", "typed:typed", "x", "1", "--name", "first")
    assert proc.returncode == 0, proc.stderr
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))  # where a detached runner's log goes
    return logs


def test_a_detached_launch_of_a_name_in_use_is_refused_before_starting(
    typed_project: Path, runner_logs: Path
) -> None:
    """A name in use: `RunExistsError`, no runner (it would die, and the old run pass for new)."""
    with flowsdk.Client("sqlite:///" + str(typed_project / "runs.db")) as client:
        with pytest.raises(RunExistsError, match="'first' already exists"):
            client.service.launch_run("typed:typed", ["y", 2], name="first")
        assert client.get_run("first").record.attempt == 1
    assert list(runner_logs.iterdir()) == []


def test_a_detached_launch_with_an_argument_that_does_not_convert_says_only_why(
    typed_project: Path, runner_logs: Path
) -> None:
    """The runner's usage error, not its usage text, is the launch's error; its log is kept."""
    store = "sqlite:///" + str(typed_project / "runs.db")
    with flowsdk.Client(store) as client, pytest.raises(InvalidStateError) as refused:
        client.service.launch_run("typed:typed", ["x", "not a number"], name="L3")
    message = str(refused.value)
    assert message.startswith("the runner for run 'L3' exited before recording it (pid ")
    assert "expects int" in message
    assert "usage:" not in message
    assert "\n" not in message
    [log] = runner_logs.iterdir()  # kept for the operator, and named in the message
    assert f"log {log})" in message
    assert "usage: flowsdk run" in log.read_text()


@pytest.mark.parametrize("key", ["not a name", "x=y", '"quoted"', "1st", "caf\u00e9", ""])
def test_a_detached_launch_refuses_a_keyword_that_is_no_parameter_name_before_starting(
    typed_project: Path, key: str, runner_logs: Path
) -> None:
    """A keyword the runner's command line could not take is refused here: no process starts."""
    with flowsdk.Client("sqlite:///" + str(typed_project / "runs.db")) as client:
        with pytest.raises(ValueError, match="keyword argument") as refused:
            client.service.launch_run("typed:typed", ["a"], {key: 1}, name="L2")
        assert [r.name for r in client.runs()] == ["first"]
    assert preview(key) in str(refused.value)
    assert list(runner_logs.iterdir()) == []  # no runner was launched, so it left no log


def test_show_action_has_its_inputs_and_output_and_the_tree_previews_them(project: Path) -> None:
    proc = flowsdk_cli(project, "run", "wf:main", "40", "label=answer", "--name", "r9")
    assert proc.returncode == 0, proc.stderr
    detail = flowsdk_cli(project, "show", "r9", "a1")
    assert detail.returncode == 0, detail.stderr
    lines = detail.stdout.splitlines()
    assert lines[0] == "action a1 of run r9  SUCCEEDED"
    # By name: `add(x, y=2)` passed x by position; its name is recorded with the value.
    assert lines[lines.index("inputs:") + 1 :][:3] == ["  x: 40", "  y: 2", "output: 42"]
    as_json = json.loads(flowsdk_cli(project, "show", "r9", "a1", "--json").stdout)
    assert (as_json["inputs"], as_json["output"]) == ({"x": 40, "y": 2}, 42)
    # Recorded, the names do not depend on the source: an edited file changes nothing.
    later = time.time() + 60
    os.utime(project / "wf.py", (later, later))
    edited = json.loads(flowsdk_cli(project, "show", "r9", "a1", "--json").stdout)
    assert edited["inputs"] == {"x": 40, "y": 2}
    assert "  key       a0/1" in lines
    tree = flowsdk_cli(project, "show", "r9").stdout.splitlines()
    assert next(line for line in tree if line.startswith("  a1 ")).endswith("(40, y=2) -> 42")
    assert next(line for line in tree if line.startswith("a0 ")).endswith(
        '(40, label="answer") -> "answer:42"'
    )
    missing = flowsdk_cli(project, "show", "r9", "a7")
    assert missing.returncode == 3
    assert "run 'r9' has no action 'a7'; its actions are a0, a1" in missing.stderr


def test_parameter_names_are_read_only_when_certain(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "async def one(a, b, *rest): ...\n"
        "def twice(x): ...\n"
        "class K:\n"
        "    def twice(self, y): ...\n"
        "import os; os.remove('must-not-run')\n"
    )
    started = datetime.now(UTC) + timedelta(seconds=60)
    record = RunRecord(
        name="r",
        phase=RunPhase.SUCCEEDED,
        started_at=started,
        ended_at=None,
        task="mod:one",
        workdir=str(tmp_path),
    )
    params = task_params(record)
    assert params["one"] == Params(["a", "b"], "rest")
    assert "twice" not in params  # defined twice: which one ran is not known
    by_path = msgspec.structs.replace(record, task=f"{source}:one", workdir="")
    assert task_params(by_path)["one"].positional == ["a", "b"]
    edited = msgspec.structs.replace(record, started_at=started - timedelta(seconds=3600))
    assert task_params(edited) == {}
    assert task_params(msgspec.structs.replace(record, task="nowhere:one")) == {}


def test_runs_shows_the_abort_reason_of_an_aborted_run(tmp_path: Path) -> None:
    """The REASON column: an operator's abort reason (made visible), or a stop's reason."""
    store = "sqlite:///" + str(tmp_path / "reasons.db")
    env = flowsdk.TaskEnvironment("reasons")

    @env.task
    async def hang() -> None:
        await asyncio.sleep(3600)

    async def aborted() -> None:
        handle = await flowsdk.start(hang, name="stopped-by-hand", store=store)
        await asyncio.sleep(0)  # the root's body starts
        await handle.abort(reason="disk \x1b[2J almost full")
        await handle.wait()

    asyncio.run(aborted())
    proc = flowsdk_cli(tmp_path, "runs", "--store", store)
    [row] = [line for line in proc.stdout.splitlines() if line.startswith("stopped-by-hand")]
    assert "external: disk \\x1b[2J almost full" in row
    assert "\x1b" not in proc.stdout


def test_show_cuts_long_reasons_and_show_action_and_json_have_them_whole(tmp_path: Path) -> None:
    """A reason of 10,000 characters: `show` cuts it with `…`; the full text is kept."""
    store = "sqlite:///" + str(tmp_path / "reasons.db")
    reason = "why " * 2_498 + "the end"
    env = flowsdk.TaskEnvironment("long_reasons")

    @env.task
    async def hang() -> None:
        await asyncio.sleep(3600)

    async def controlled() -> None:
        aborted = await flowsdk.start(hang, name="aborted", store=store)
        stopped = await flowsdk.start(hang, name="stopped", store=store)
        await asyncio.sleep(0)  # the roots' bodies start
        await aborted.abort(reason=reason)
        await stopped.stop(abandon=True, reason=reason)
        await aborted.wait()
        await stopped.wait()

    asyncio.run(controlled())
    for argv in (["aborted"], ["aborted", "--events"], ["stopped"], ["stopped", "--events"]):
        proc = flowsdk_cli(tmp_path, "show", *argv, "--store", store)
        assert proc.returncode == 0, proc.stderr
        assert "the end" not in proc.stdout, argv
        assert max(len(line) for line in proc.stdout.splitlines()) < 600, argv
        assert "why why why…" in proc.stdout, argv
    whole = flowsdk_cli(tmp_path, "show", "aborted", "a0", "--store", store)
    assert f"  reason: {reason}\n" in whole.stdout
    shown_json = flowsdk_cli(tmp_path, "show", "stopped", "--json", "--store", store)
    assert json.loads(shown_json.stdout)["run"]["stop"]["reason"] == reason


def test_a_run_of_one_action_is_counted_in_the_singular(project: Path) -> None:
    proc = flowsdk_cli(project, "run", "wf:add", "1", "--name", "one")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.rstrip().splitlines()[-1]
    assert last.startswith("run one SUCCEEDED after ")
    assert last.endswith(": 1 action (1 SUCCEEDED)")
