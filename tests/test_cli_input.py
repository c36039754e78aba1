"""What the command line takes in: arguments that are not valid UTF-8, and numbers.

One rule for every verb, applied where the command line is read: bytes that
do not decode become U+FFFD, the replacement character, as in a file read
by `--reason-file`. Every call is a real `python -m flowsdk` process, given
its arguments as bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flowsdk

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0
BAD = b"bad\xffbyte"  # \xff is never valid UTF-8
TAKEN = "bad\ufffdbyte"


def flowsdk_cli(
    store: str, *args: str | bytes, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    """Run `python -m flowsdk ARGS` on `store`; an argument may be bytes, as a shell passes it."""
    done = subprocess.run(
        [sys.executable, "-m", "flowsdk", *args],
        input=stdin.decode("latin-1"),
        capture_output=True,
        text=True,
        encoding="latin-1",  # what the child wrote, byte for byte, whatever it is
        cwd=REPO,
        env={**os.environ, "FLOWSDK_STORE": store, "NO_COLOR": "1"},
        timeout=TIMEOUT,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def utf8(text: str) -> str:
    """The text a child wrote as UTF-8, read back from its latin-1 reading."""
    return text.encode("latin-1").decode("utf-8")


@pytest.fixture
def store(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "store.db")


@pytest.fixture
def held(store: str) -> Iterator[subprocess.Popen[str]]:
    """A live run `job` (`tests/workflows/hold.py`) whose a1 holds until the run is controlled."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.workflows.hold", "job"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**os.environ, "FLOWSDK_STORE": store},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "STARTED a1"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def shown(store: str, run: str) -> dict[str, Any]:
    done = flowsdk_cli(store, "show", run, "--json")
    assert done.returncode == 0, done.stderr
    value: dict[str, Any] = json.loads(utf8(done.stdout))
    return value


def test_a_run_name_that_is_not_utf8_is_looked_up_with_the_replacement_character(
    store: str,
) -> None:
    env = flowsdk.TaskEnvironment("input")

    @env.task
    async def one() -> int:
        return 1

    flowsdk.run(one, name="L1", store=store)
    for verb in ("show", "watch", "logs", "abort", "stop"):
        done = flowsdk_cli(store, verb, b"L\xff1")
        assert done.returncode == 3, (verb, done.stderr)
        assert utf8(done.stderr).startswith("flowsdk: error: no run named 'L\ufffd1'"), verb


def test_reasons_that_are_not_utf8_are_recorded_with_the_replacement_character(
    store: str, held: subprocess.Popen[str]
) -> None:
    """`--reason` and `--reason-file -` (stdin) follow the rule of `--reason-file PATH`."""
    stopping = flowsdk_cli(store, "stop", "job", "--reason-file", "-", stdin=b"full\xfe disk\n")
    assert stopping.returncode == 0, stopping.stderr
    aborting = flowsdk_cli(store, "abort", "job", "a1", "--reason", BAD)
    assert aborting.returncode == 0, aborting.stderr
    held.communicate(timeout=TIMEOUT)
    run = shown(store, "job")
    assert run["run"]["stop"]["reason"] == "full\ufffd disk"
    [a1] = [a for a in run["actions"] if a["name"] == "a1"]
    assert a1["abort"]["reason"] == TAKEN


def test_runs_limit_says_what_it_accepts(store: str) -> None:
    refused = flowsdk_cli(store, "runs", "--limit", "-1")
    assert refused.returncode == 2
    assert "argument --limit: expected a number >= 0 (0: all runs), not -1" in refused.stderr
    assert flowsdk_cli(store, "runs", "--limit", "0").returncode == 0


@pytest.mark.parametrize(
    ("argv", "prog", "message"),
    [
        (["abort", "p1", "a1", "--group", "g"], "flowsdk abort", "name an ACTION or a --group"),
        (["abort", "p1", "--bogus"], "flowsdk abort", "unrecognized arguments: --bogus"),
        (["abort", "p1", "--reason", "x" * 10_001], "flowsdk abort", "the reason is 10,001 "),
        (["stop", "p1", "--reason-file", "/no/such/file"], "flowsdk stop", "cannot read the "),
        (["run", "tests.workflows.deep:chain", "x"], "flowsdk run", "argument 'depth' expects "),
        (["token", "create", "t", "--role", "viewer", "-z"], "flowsdk token create", "unrec"),
        (["--bogus", "runs"], "flowsdk", "unrecognized arguments: --bogus"),
    ],
)
def test_a_malformed_command_line_prints_the_verbs_usage_and_its_error_line(
    argv: list[str], prog: str, message: str, store: str, tmp_path: Path
) -> None:
    """Found by argparse or by the verb, the same shape: `usage: PROG ...`, `PROG: error: ...`."""
    done = flowsdk_cli(store, *argv)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"usage: {prog} ["), done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"{prog}: error: {message}"), done.stderr
    assert not (tmp_path / "store.db").exists()  # nothing was recorded, or even opened
