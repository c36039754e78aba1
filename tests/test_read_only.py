"""Readers with read-only access (SPEC §5): another user lists and shows runs, writes nothing.

The suite runs as root, whom file permissions do not stop, so each reader here
is a real `python -m flowsdk` process run as the user `nobody`, with the
system's Python of the same version and this checkout on its path.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

import flowsdk
from flowsdk import AbortRequest, RunPhase
from flowsdk.store import open_store
from tests.runners.harness import sync
from tests.support import pause
from tests.test_cli import Runner, start_runner
from tests.workflows import deep

__all__ = ["start_runner"]  # the fixture, used here by name

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


def _system_python_matches() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() == str(sys.version_info[:2])


def _private_folder() -> Path | None:
    """The first folder above (or of) this checkout that other users may not enter, if any.

    The reader runs as `nobody` with this checkout on its path: a checkout in a
    private folder (a home such as /root) cannot be imported by it.
    """
    for folder in [*reversed(REPO.parents), REPO]:
        if not os.stat(folder).st_mode & 0o001:
            return folder
    return None


pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not _system_python_matches(),
        reason="needs root (to run a reader as another user) and a system Python of this version",
    ),
    pytest.mark.skipif(
        _private_folder() is not None,
        reason=f"the user nobody cannot enter {_private_folder()}, so it cannot import this "
        "checkout: clone it under a folder others may enter (e.g. /tmp, /srv) to run these",
    ),
]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder others may read and enter but not write (pytest's tmp_path is private)."""
    folder = Path(f"/tmp/flowsdk-read-only-{os.getpid()}")
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def as_nobody(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m flowsdk ARGS --store STORE` as the user nobody."""
    nobody = pwd.getpwnam("nobody")
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "PYTHONPATH": os.pathsep.join([str(REPO), *site]),
    }
    done = subprocess.run(
        [SYSTEM_PYTHON, "-m", "flowsdk", *args, "--store", store],
        capture_output=True,
        text=True,
        cwd="/tmp",
        env=env,
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def recorded_phase(path: Path, run: str) -> str:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return str(conn.execute("SELECT phase FROM runs WHERE name = ?", (run,)).fetchone()[0])


def test_a_user_who_may_only_read_lists_and_shows_runs_and_cannot_control_them(
    shared_dir: Path, start_runner: Callable[[str, str], Runner]
) -> None:
    """Read permission only, on a live store: runs and show work; abort is refused (exit 4).

    Once the runner is killed, the reader shows the run CRASHED as it judges it,
    without recording it; the owner's next read records it.
    """
    path = shared_dir / "store.db"
    store = f"sqlite:///{path}"
    flowsdk.run(deep.chain, 3, name="done", store=store)
    path.chmod(0o644)  # readable by others; the log files a runner makes get the same mode
    runner = start_runner(store, "live")
    runner.expect("STARTED a1")

    listed = as_nobody(store, "runs", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["name"]: r["phase"] for r in json.loads(listed.stdout)} == {
        "live": "RUNNING",
        "done": "SUCCEEDED",
    }
    shown = as_nobody(store, "show", "done")
    assert shown.returncode == 0, shown.stderr
    assert "a3" in shown.stdout
    refused = as_nobody(store, "abort", "live", "--reason", "not mine")
    assert refused.returncode == 4, (refused.stdout, refused.stderr)
    assert "cannot be written by this user" in refused.stderr
    planned = as_nobody(store, "prune", "--keep", "0", "--dry-run", "--json")
    assert planned.returncode == 0, planned.stderr  # a dry run only reads
    plan = json.loads(planned.stdout)
    assert ([r["name"] for r in plan["deleted"]], plan["dry_run"]) == (["done"], True)
    assert [r["name"] for r in plan["live"]] == ["live"]
    pruning = as_nobody(store, "prune", "--keep", "0")
    assert pruning.returncode == 4, (pruning.stdout, pruning.stderr)

    with flowsdk.Client(store) as owner:
        sync(owner, "live")  # a1 is in the store before the runner is killed
    runner.proc.send_signal(signal.SIGKILL)
    runner.proc.wait(timeout=30)
    judged = as_nobody(store, "runs", "--json")
    assert judged.returncode == 0, judged.stderr
    assert {r["name"]: r["phase"] for r in json.loads(judged.stdout)}["live"] == "CRASHED"
    for shown in (as_nobody(store, "show", "live"), as_nobody(store, "show", "live", "--json")):
        assert shown.returncode == 0, shown.stderr
        assert ("run live  CRASHED" in shown.stdout) or ('"phase": "CRASHED"' in shown.stdout)
    # Its unfinished actions too, in every view, as the owner's read then records them.
    tree = as_nobody(store, "show", "live")
    assert "RUNNING" not in tree.stdout
    assert "CRASHED" in tree.stdout.split("\n", 1)[1]  # below the run's own line
    seen = json.loads(as_nobody(store, "show", "live", "--json").stdout)
    judged_actions = {a["name"]: (a["phase"], a["ended_at"]) for a in seen["actions"]}
    assert judged_actions["a1"][0] == "CRASHED"
    one = json.loads(as_nobody(store, "show", "live", "a1", "--json").stdout)["action"]
    assert (one["phase"], one["ended_at"]) == judged_actions["a1"]
    assert recorded_phase(path, "live") == "RUNNING"  # the reader wrote nothing
    with flowsdk.Client(store) as owner:
        recorded = owner.get_run("live")
        assert recorded.phase is RunPhase.CRASHED
    assert recorded_phase(path, "live") == "CRASHED"
    assert {
        a.name: (a.phase.value, msgspec.to_builtins(a.ended_at)) for a in recorded.actions
    } == judged_actions
    assert msgspec.to_builtins(recorded.record.ended_at) == seen["run"]["ended_at"]


def test_a_store_whose_folder_and_file_cannot_be_written_is_read_as_it_is(
    shared_dir: Path,
) -> None:
    """No -shm index and no right to create one: the file is read immutable, still shown."""
    path = shared_dir / "store.db"
    store = f"sqlite:///{path}"
    flowsdk.run(deep.chain, 3, name="done", store=store)
    path.chmod(0o444)
    assert not (shared_dir / "store.db-shm").exists()
    shown = as_nobody(store, "show", "done", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [a["key"] for a in json.loads(shown.stdout)["actions"]] == [
        "a0",
        "a0/1",
        "a0/1/1",
        "a0/1/1/1",
    ]
    pruned = as_nobody(store, "prune", "--keep", "0")
    assert pruned.returncode == 4, (pruned.stdout, pruned.stderr)
    with flowsdk.Client(store) as owner:
        assert [r.name for r in owner.runs()] == ["done"]


def test_a_user_who_may_only_read_sees_a_queued_request_and_none_once_the_runner_is_gone(
    shared_dir: Path, start_runner: Callable[[str, str], Runner]
) -> None:
    """A request the paused runner has not taken is shown to a reader; judged gone: none.

    The reader judges the runner gone without recording it, as it judges the run.
    """
    path = shared_dir / "store.db"
    store = f"sqlite:///{path}"
    flowsdk.run(deep.chain, 3, name="done", store=store)  # the store exists before the runner
    path.chmod(0o644)
    runner = start_runner(store, "paused")
    runner.expect("STARTED a1")
    pause(runner.proc)  # alive, but takes no request
    try:
        with contextlib.closing(open_store(store)) as channel:
            request = AbortRequest(run="paused", reason="while paused", requested_by="op")
            queued = channel.request(request, timeout=0.2).unwrap()
        assert queued.outcome is flowsdk.Outcome.QUEUED
        shown = as_nobody(store, "show", "paused", "--json")
        assert shown.returncode == 0, shown.stderr
        [entry] = json.loads(shown.stdout)["queued_requests"]
        assert (entry["taken"], entry["request"]["reason"]) == (False, "while paused")
        text = as_nobody(store, "show", "paused")
        assert "  queued    " in text.stdout, text.stdout
        assert "abort of the run by op at " in text.stdout
    finally:
        runner.proc.kill()
    runner.proc.wait(timeout=30)
    judged = as_nobody(store, "show", "paused", "--json")
    assert judged.returncode == 0, judged.stderr
    assert json.loads(judged.stdout)["run"]["phase"] == "CRASHED"
    assert json.loads(judged.stdout)["queued_requests"] == []
    assert recorded_phase(path, "paused") == "RUNNING"  # the reader wrote nothing
