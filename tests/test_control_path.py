"""The control path: the reason reaches the body, outcomes, permissions, executors, launches.

Control requests go through the one control service whatever the front end
(`Client`, `RunHandle`, the CLI); these tests drive it the way a user does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import flowsdk
import flowsdk.executors
import flowsdk.store
from flowsdk import AbortCause, AbortInfo, Actor, Outcome, Role, RunPhase
from flowsdk.errors import InvalidStateError, PermissionDeniedError
from flowsdk.store import MemoryStore
from tests.runners.harness import sqlite_url
from tests.support import assert_clean

LOCAL = Actor.local().name


class _Seen:
    """What a cancelled body saw: its `CancelledError` message and `current_action().abort`."""

    def __init__(self) -> None:
        self.running = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.message = ""
        self.abort: AbortInfo | None = None
        self.before: AbortInfo | None = None

    async def body(self) -> None:
        self.before = flowsdk.current_action().abort
        self.running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError as exc:
            self.message = str(exc)
            self.abort = flowsdk.current_action().abort
            self.cancelled.set()
            raise


Control = Callable[[flowsdk.Client, str], Any]
OPERATIONS: dict[str, tuple[Control, AbortCause, str]] = {
    "abort": (
        lambda c, run: c.abort(run, "a1", reason="bad trial"),
        AbortCause.EXTERNAL,
        "ABORTED",
    ),
    "mark_failed": (
        lambda c, run: c.mark_failed(run, "a1", reason="bad trial"),
        AbortCause.MARK_FAILED,
        "FAILED",
    ),
    "stop_abandon": (
        lambda c, run: c.stop(run, abandon=True, reason="bad trial"),
        AbortCause.STOP,
        "ABANDONED",
    ),
}


async def _control_a_trial(control: Control) -> tuple[_Seen, flowsdk.Run[Any]]:
    """Start a run whose one child waits, `control` it from a `Client`, return what it saw."""
    env = flowsdk.TaskEnvironment("reason")
    seen = _Seen()

    @env.task
    async def trial() -> None:
        await seen.body()

    @env.task
    async def root() -> None:
        await asyncio.gather(trial(), return_exceptions=True)

    store = MemoryStore()
    handle = await flowsdk.start(root, store=store)
    await seen.running.wait()
    with flowsdk.Client(store) as client:
        result = control(client, handle.name)
    assert result.outcome is Outcome.APPLIED
    await seen.cancelled.wait()
    return seen, await handle.wait()


@pytest.mark.parametrize("operation", list(OPERATIONS))
async def test_the_operators_reason_and_requester_reach_the_body(operation: str) -> None:
    """SPEC §2: `str(CancelledError)` and `current_action().abort` say who asked and why."""
    control, cause, phase = OPERATIONS[operation]
    seen, run = await _control_a_trial(control)
    assert seen.before is None  # nothing delivered yet while it ran
    assert "bad trial" in seen.message
    assert LOCAL in seen.message
    assert cause.value in seen.message
    assert seen.abort is not None
    assert (seen.abort.reason, seen.abort.cause, seen.abort.requested_by) == (
        "bad trial",
        cause,
        LOCAL,
    )
    record = run.action("a1")
    assert record.phase.value == phase
    assert record.abort == seen.abort  # the record holds the same information, time included


WITHOUT_REASON: dict[str, Control] = {
    "abort": lambda c, run: c.abort(run, "a1", reason=""),
    "mark_failed": lambda c, run: c.mark_failed(run, "a1", reason=""),
    "stop_abandon": lambda c, run: c.stop(run, abandon=True, reason=""),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
async def test_an_empty_reason_is_recorded_as_no_reason(operation: str) -> None:
    """`--reason ""` (or `reason=""`) is no reason: recorded None, never shown as `""`."""
    _, cause, _ = OPERATIONS[operation]
    seen, run = await _control_a_trial(WITHOUT_REASON[operation])
    assert seen.abort is not None
    assert (seen.abort.reason, seen.abort.cause) == (None, cause)
    assert run.action("a1").abort == seen.abort
    if operation == "stop_abandon":
        assert run.record.stop is not None
        assert run.record.stop.reason is None


async def test_root_exit_reaches_the_body_as_its_cause() -> None:
    """A child still running when the root returns is cancelled with cause `root_exit`."""
    env = flowsdk.TaskEnvironment("rootexit")
    seen = _Seen()

    @env.task
    async def straggler() -> None:
        await seen.body()

    @env.task
    async def root() -> None:
        asyncio.create_task(straggler())  # noqa: RUF006 -- left running on purpose
        await seen.running.wait()

    run = await flowsdk.run_async(root)
    await seen.cancelled.wait()
    assert "root_exit" in seen.message
    assert seen.abort is not None
    assert (seen.abort.cause, seen.abort.reason, seen.abort.requested_by) == (
        AbortCause.ROOT_EXIT,
        None,
        None,
    )
    assert run.action("a1").abort == seen.abort
    assert_clean(run)


async def test_a_message_given_to_t_cancel_is_recorded_as_the_reason() -> None:
    """`t.cancel("msg")` from workflow code: the body sees it, the record keeps it (cancelled)."""
    env = flowsdk.TaskEnvironment("tcancel")
    seen = _Seen()

    @env.task
    async def trial() -> None:
        await seen.body()

    @env.task
    async def root() -> None:
        t = asyncio.create_task(trial())
        await seen.running.wait()
        t.cancel("pruned at epoch 3")
        with contextlib.suppress(asyncio.CancelledError):
            await t

    run = await flowsdk.run_async(root)
    assert "pruned at epoch 3" in seen.message
    assert seen.abort is not None
    assert (seen.abort.cause, seen.abort.reason) == (AbortCause.CANCELLED, "pruned at epoch 3")
    record = run.action("a1")
    assert record.abort is not None
    assert (record.abort.cause, record.abort.reason) == (AbortCause.CANCELLED, "pruned at epoch 3")
    assert run.phase is RunPhase.SUCCEEDED


async def test_a_timeout_is_recorded_with_its_own_cause() -> None:
    """SPEC §4: an attempt past its `timeout` is FAILED with cause `timeout`."""
    env = flowsdk.TaskEnvironment("timeoutcause")
    seen = _Seen()

    @env.task(timeout=0.05)
    async def slow() -> None:
        await seen.body()

    @env.task
    async def root() -> None:
        await asyncio.gather(slow(), return_exceptions=True)

    run = await flowsdk.run_async(root)
    assert "timeout" in seen.message
    record = run.action("a1")
    assert record.phase.value == "FAILED"
    assert record.abort is not None
    assert record.abort.cause is AbortCause.TIMEOUT
    assert record.error is not None
    assert record.error.type.endswith("TaskTimeoutError")


async def test_a_request_the_runner_cannot_answer_in_time_is_queued_then_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SPEC §6: a runner whose loop is blocked leaves the request `queued`; applied later."""
    monkeypatch.setattr("flowsdk._service.ANSWER_TIMEOUT", 0.2)
    env = flowsdk.TaskEnvironment("queued")
    blocked = threading.Event()
    release = threading.Event()
    answers: list[flowsdk.ControlResult] = []

    @env.task
    async def root() -> None:
        blocked.set()
        release.wait(30)  # blocks the loop, as a body calling blocking code would
        await asyncio.sleep(3600)

    store = MemoryStore()

    def operator(run: str) -> None:
        blocked.wait(30)
        with flowsdk.Client(store) as client:
            answers.append(client.abort(run, reason="while blocked"))
        release.set()

    handle = await flowsdk.start(root, store=store)
    thread = threading.Thread(target=operator, args=(handle.name,))
    thread.start()
    try:
        run = await handle.wait()
    finally:
        release.set()
        thread.join(30)
    [answer] = answers
    assert answer.outcome is Outcome.QUEUED
    assert "did not answer" in answer.message
    assert run.phase is RunPhase.ABORTED
    abort = run.action("a0").abort
    assert abort is not None
    assert (abort.cause, abort.reason) == (AbortCause.EXTERNAL, "while blocked")


# -- permissions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (Role.VIEWER, {"read"}),
        (Role.EXECUTOR, {"read", "execute"}),
        (Role.OPERATOR, {"read", "execute", "control"}),
    ],
)
def test_each_role_may_do_exactly_what_its_permissions_say(
    role: Role, allowed: set[str], tmp_path: Path
) -> None:
    """Abort is its own permission: only an operator controls; an executor retries."""
    env = flowsdk.TaskEnvironment("perm")

    @env.task
    async def bad() -> None:
        raise ValueError("no")

    url = sqlite_url(tmp_path / "s.db")
    flowsdk.run(bad, name="r", store=url)
    tried: dict[str, Callable[[flowsdk.Client], object]] = {
        "read": lambda c: c.get_run("r"),
        "control": lambda c: c.abort("r"),
        # A task defined in a test function cannot be imported again: refused, but only
        # after the permission check.
        "execute": lambda c: c.retry("r"),
    }
    done = set()
    refusals = []
    with flowsdk.Client(url, actor=Actor(name="token:ci", role=role)) as client:
        for permission, call in tried.items():
            try:
                call(client)
            except PermissionDeniedError as exc:
                refusals.append((permission, str(exc)))
            except InvalidStateError:
                done.add(permission)
            else:
                done.add(permission)
    assert done == allowed
    for permission, message in refusals:
        assert "token:ci" in message
        assert role.value in message
        assert repr(permission) in message


# -- executors -------------------------------------------------------------------------------


def test_an_unknown_executor_is_refused_at_declaration_naming_the_known_ones() -> None:
    """`executor=` takes a name; an unknown one is a ValueError listing the executors."""
    with pytest.raises(ValueError, match=r"unknown executor 'gpu'.*'local'"):
        flowsdk.TaskEnvironment("ex", executor="gpu")
    assert flowsdk.TaskEnvironment("ex2", executor="local").options.executor == "local"


def test_an_executor_whose_package_is_missing_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An executor whose module imports a package that is not installed names the extra."""
    (tmp_path / "gpu_executor_for_test.py").write_text("import no_such_gpu_package\nEXECUTOR = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        flowsdk.executors.EXECUTORS, "gpu", ("gpu_executor_for_test", "EXECUTOR", "gpu")
    )
    with pytest.raises(ValueError, match=r"'no_such_gpu_package'.*pip install 'flowsdk\[gpu\]'"):
        flowsdk.TaskEnvironment("ex3", executor="gpu")


# -- detached launches ---------------------------------------------------------------------

FLAKY = """
import os
import flowsdk

env = flowsdk.TaskEnvironment("detached")


@env.task
async def main(n: int) -> int:
    # Relative to the working directory: the launched runner must run where the run started.
    if not os.path.exists("fixed"):
        raise RuntimeError("not fixed yet")
    return n * 2
"""


def QUIET(url: str) -> list[str]:
    return ["--store", url, "--quiet"]


def _wait_for_end(client: flowsdk.Client, run: str, attempt: int) -> flowsdk.Run[Any]:
    deadline = time.monotonic() + 60
    while True:
        current = client.get_run(run)
        if current.attempt == attempt and current.phase.terminal:
            return current
        assert time.monotonic() < deadline, f"run {run} attempt {attempt} did not end"
        time.sleep(0.05)


def _runner_logs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Make this test's launches write their runners' output files in a folder of its own."""
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))
    return logs


def _wait_until_empty(folder: Path) -> None:
    deadline = time.monotonic() + 60
    while any(folder.iterdir()):  # the runner removes its file as it exits
        assert time.monotonic() < deadline, f"left behind: {sorted(folder.iterdir())}"
        time.sleep(0.05)  # polling the folder above, bounded by the deadline


def test_retry_and_start_in_a_detached_runner_in_the_runs_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launched retry or run goes on in a process of its own, where the run first started.

    Each runner's output file is removed once its run ended recorded: repeated launches
    from the console leave nothing behind in the temporary folder.
    """
    logs = _runner_logs(monkeypatch, tmp_path)
    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "flaky_mod.py").write_text(FLAKY)
    url = sqlite_url(tmp_path / "s.db")
    first = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowsdk",
            "run",
            "flaky_mod:main",
            "21",
            "--name",
            "r1",
            *QUIET(url),
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert first.returncode == 6, first.stdout + first.stderr
    (workdir / "fixed").touch()
    # Relative to this process, not to the run's directory, where the runner starts.
    relative = "sqlite:///" + os.path.relpath(tmp_path / "s.db")
    with flowsdk.Client(relative) as client:
        assert client.get_run("r1").record.workdir == str(workdir)
        assert client.service.launch_retry("r1") == ("r1", 2)
        retried = _wait_for_end(client, "r1", 2)
        started = client.service.launch_run("flaky_mod:main", [5], name="r2")
        fresh = _wait_for_end(client, started, 1)
        with pytest.raises(InvalidStateError, match="SUCCEEDED"):
            client.service.launch_retry("r1")
        with pytest.raises(InvalidStateError, match="never the root task"):
            client.service.launch_run("os:system", ["echo hi"])
    assert (retried.phase, retried.result()) == (RunPhase.SUCCEEDED, 42)
    assert (started, fresh.phase, fresh.result()) == ("r2", RunPhase.SUCCEEDED, 10)
    _wait_until_empty(logs)


def test_a_launch_whose_runner_fails_at_once_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A detached runner that dies before recording its run: the launch raises with its output.

    Its output file is kept, and the error names it.
    """
    logs = _runner_logs(monkeypatch, tmp_path)
    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "flaky_mod.py").write_text(FLAKY)
    url = sqlite_url(tmp_path / "s.db")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "flowsdk",
            "run",
            "flaky_mod:main",
            "1",
            "--name",
            "r1",
            *QUIET(url),
        ],
        cwd=workdir,
        capture_output=True,
        timeout=60,
        check=False,
    )
    (workdir / "flaky_mod.py").write_text("raise ImportError('the module is broken now')\n")
    with flowsdk.Client(url) as client, pytest.raises(InvalidStateError) as info:
        client.service.launch_retry("r1")
    assert "the module is broken now" in str(info.value)
    (kept,) = logs.iterdir()
    assert f"log {kept})" in str(info.value)
    assert "the module is broken now" in kept.read_text()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql"])
def test_a_refused_request_on_an_ended_run_is_written_to_its_event_log(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SPEC §8: the log says who tried what and why it was refused, even after the run ended."""
    env = flowsdk.TaskEnvironment("refusedlog")

    @env.task
    async def done() -> int:
        return 1

    store: str | flowsdk.store.Store
    if kind == "memory":
        store = MemoryStore()
    elif kind == "sqlite":
        store = sqlite_url(tmp_path / "s.db")
    else:
        store = request.getfixturevalue("pg_url")
    flowsdk.run(done, name="over", store=store)
    with flowsdk.Client(store, actor=Actor(name="token:ci", role=Role.EXECUTOR)) as client:
        with pytest.raises(PermissionDeniedError):
            client.abort("over", "a0", reason="nope")
        [note] = [e for e in client.get_run("over").events if e.kind is flowsdk.EventKind.REQUEST]
    assert (note.action, note.requested_by) == ("a0", "token:ci")
    assert note.message is not None
    assert "refused" in note.message
    assert "'control'" in note.message
