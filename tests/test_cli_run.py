"""`flowsdk run` and `flowsdk retry` (SPEC §6), through real processes.

The workflow module is written into a temporary directory that is the child's
working directory, as a user's project would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowsdk.cli._arguments import parse_arguments
from flowsdk.cli._output import UsageError

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
