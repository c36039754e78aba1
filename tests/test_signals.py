"""SIGTERM and SIGHUP stop a run like a first Ctrl-C: recorded, cleaned up, conventional exit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import flowsdk
from flowsdk import AbortCause, RunPhase
from tests.runners.harness import ROOT, Runner, sqlite_url
from tests.support import assert_clean

CHILD = """
import asyncio
import sys
import flowsdk

env = flowsdk.TaskEnvironment("cli_signals")


@env.task
async def sleeper(folder: str) -> None:
    try:
        print("STARTED", flush=True)
        await asyncio.sleep(3600)
    finally:
        open(folder + "/child-finally", "w").close()


@env.task
async def root(folder: str) -> None:
    await sleeper(folder)
"""


def _quiet(url: str) -> list[str]:
    """The options of a quiet `flowsdk run` named `cli` on the store `url`."""
    return ["--name", "cli", "--store", url, "--quiet"]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_to_a_script_aborts_the_run_runs_every_finally_and_exits_128_plus_n(
    signum: signal.Signals, status: int, tmp_path: Path
) -> None:
    """SPEC §3: cause `signal` (reason its name), descendants `ancestor`, the user's finally too."""
    url = sqlite_url(tmp_path / "s.db")
    with Runner("signals.py", url, "sig", str(tmp_path)) as runner:
        runner.expect("STARTED", "a1")
        runner.proc.send_signal(signum)
        runner.expect("SCRIPT", "FINALLY")
        assert runner.finish() == status
    assert {p.name for p in tmp_path.glob("*-finally")} == {
        "child-finally",
        "root-finally",
        "script-finally",
    }
    with flowsdk.Client(url) as client:
        run = client.get_run("sig")
    assert run.phase is RunPhase.ABORTED
    root, child = run.action("a0"), run.action("a1")
    assert root.abort is not None
    assert (root.abort.cause, root.abort.reason) == (AbortCause.SIGNAL, signum.name)
    assert child.abort is not None
    assert child.abort.cause is AbortCause.ANCESTOR
    assert_clean(run)


def test_sigterm_to_flowsdk_run_on_the_command_line_exits_143(tmp_path: Path) -> None:
    """`flowsdk run` stopped by SIGTERM: the run is recorded ABORTED and the CLI exits 143."""
    (tmp_path / "sigmod.py").write_text(CHILD)
    url = sqlite_url(tmp_path / "s.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowsdk", "run", "sigmod:root", str(tmp_path), *_quiet(url)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "STARTED"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 143, out + err
    assert (tmp_path / "child-finally").exists()
    assert "Traceback" not in err
    with flowsdk.Client(url) as client:
        run = client.get_run("cli")
    assert run.phase is RunPhase.ABORTED
    abort = run.action("a0").abort
    assert abort is not None
    assert (abort.cause, abort.reason) == (AbortCause.SIGNAL, "SIGTERM")


def test_flowsdk_run_hands_signals_to_its_loop_and_gives_back_the_handlers_it_found() -> None:
    """A signal raised inside the run reaches it; afterwards each handler is the one before."""
    env = flowsdk.TaskEnvironment("signal_handlers")
    seen: list[object] = []

    def own(signum: int, frame: object) -> None:
        seen.append(signum)

    @env.task
    async def raises_sigterm() -> None:
        seen.append(signal.getsignal(signal.SIGTERM) is own)
        signal.raise_signal(signal.SIGTERM)  # handled like `kill -TERM` from outside
        await asyncio.Event().wait()  # until the run aborts this body

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP)}
    previous = signal.signal(signal.SIGTERM, own)
    try:
        with pytest.raises(SystemExit) as raised:
            flowsdk.run(raises_sigterm, store="memory://")
        assert raised.value.code == 128 + signal.SIGTERM
        assert seen == [False]  # flowsdk's handler was in place; `own` was not called
        assert signal.getsignal(signal.SIGTERM) is own
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGTERM, previous)
