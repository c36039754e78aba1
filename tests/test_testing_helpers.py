"""`flowsdk.testing`: the gate, the start-control-wait helper and the store fixture (SPEC §2)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import assert_type

import pytest

import flowsdk
import flowsdk.testing
from flowsdk import ControlResult, RunPhase
from flowsdk.errors import ActionAbortedError, RuntimeUserError
from flowsdk.store import Store
from flowsdk.testing import Gate, new_store, sqlite_url, start_and_control, store_fixture
from tests.support import assert_clean, causes, phases

store = store_fixture()


def _entering(gate: Gate, log: list[str], who: str) -> asyncio.Task[None]:
    """A plain asyncio task that enters the gate and logs when it got through."""

    async def body() -> None:
        await gate.enter()
        log.append(who)

    return asyncio.create_task(body(), name=who)


# -- Gate ------------------------------------------------------------------------------


async def test_gate_holds_a_body_until_released() -> None:
    gate = Gate("one")
    log: list[str] = []
    body = _entering(gate, log, "a")
    await gate.wait_running()
    assert (gate.entered, gate.waiting, log) == (1, 1, [])
    assert not body.done()
    gate.release()
    await body
    assert (gate.entered, gate.waiting, log) == (1, 0, ["a"])


async def test_gate_release_lets_the_longest_held_body_through_first() -> None:
    gate = Gate("order")
    log: list[str] = []
    bodies = [_entering(gate, log, who) for who in "abc"]
    await gate.wait_running(3)
    gate.release()
    await bodies[0]
    assert (log, gate.waiting) == (["a"], 2)
    gate.release(2)
    await asyncio.gather(*bodies)
    assert log == ["a", "b", "c"]


async def test_gate_release_before_entry_lets_the_next_body_pass_at_once() -> None:
    gate = Gate("early")
    gate.release()
    await gate.enter()  # returns without a release after it: no deadlock
    assert (gate.entered, gate.waiting) == (1, 0)


async def test_gate_release_all_opens_the_gate_for_held_and_later_bodies() -> None:
    gate = Gate("open")
    log: list[str] = []
    held = [_entering(gate, log, who) for who in "ab"]
    await gate.wait_running(2)
    gate.release_all()
    gate.release_all()  # idempotent
    await asyncio.gather(*held)
    await gate.enter()
    assert gate.is_open
    assert (sorted(log), gate.entered, gate.waiting) == (["a", "b"], 3, 0)


async def test_gate_counts_many_concurrent_bodies() -> None:
    gate = Gate("many")
    log: list[str] = []
    bodies = [_entering(gate, log, str(i)) for i in range(200)]
    await gate.wait_running(200)
    assert (gate.entered, gate.waiting) == (200, 200)
    gate.release(150)
    await asyncio.gather(*bodies[:150])
    assert (len(log), gate.waiting) == (150, 50)
    gate.release_all()
    await asyncio.gather(*bodies)
    assert log == [str(i) for i in range(200)]


async def test_gate_wait_running_fails_with_a_clear_error_instead_of_hanging() -> None:
    gate = Gate("never", timeout=0.01)  # the deadline is the behaviour under test
    log: list[str] = []
    body = _entering(gate, log, "only")
    with pytest.raises(TimeoutError, match=r"'never'.* for 2 bodies to enter; 1 entered"):
        await gate.wait_running(2)
    gate.release_all()
    await body


async def test_gate_wait_running_returns_at_once_once_enough_entered() -> None:
    gate = Gate("done", timeout=None)
    gate.release_all()
    await gate.enter()
    await gate.wait_running(1)  # no deadline, no waiting: already entered
    assert gate.entered == 1


async def test_body_cancelled_at_the_gate_gets_cancelled_error_and_leaves_it() -> None:
    gate = Gate("cancel")
    log: list[str] = []
    body = _entering(gate, log, "a")
    await gate.wait_running()
    body.cancel()
    with pytest.raises(asyncio.CancelledError):
        await body
    assert (gate.entered, gate.waiting, log) == (1, 0, [])
    gate.release()  # kept for the next body: the cancelled one does not use it up
    await gate.enter()
    assert gate.entered == 2


async def test_release_meeting_a_cancel_in_the_same_step_goes_to_the_next_body() -> None:
    gate = Gate("race")
    log: list[str] = []
    first, second = _entering(gate, log, "first"), _entering(gate, log, "second")
    await gate.wait_running(2)
    gate.release()
    first.cancel()  # same step: `first` was released but has not resumed
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert log == ["second"]
    assert gate.waiting == 0


def test_gate_made_outside_a_loop_works_in_a_run() -> None:
    env = flowsdk.TaskEnvironment("gatesync")
    gate = Gate("sync")

    @env.task
    async def child(i: int) -> int:
        await gate.enter()
        return i

    @env.task
    async def root() -> int:
        pending = [asyncio.create_task(child(i)) for i in range(3)]
        await gate.wait_running(3)
        gate.release_all()
        return sum(await asyncio.gather(*pending))

    run = flowsdk.run(root)
    assert run.result() == 3
    assert_clean(run)


# -- start_and_control -------------------------------------------------------------------


async def test_start_and_control_returns_the_ended_run_and_what_control_returned() -> None:
    env = flowsdk.TaskEnvironment("sac")
    gate = Gate("child")
    body_saw: list[str] = []

    @env.task
    async def child() -> None:
        try:
            await gate.enter()
        except asyncio.CancelledError:
            body_saw.append("cancelled")
            raise

    @env.task
    async def root(label: str) -> str:
        try:
            await child()
        except ActionAbortedError as exc:
            return f"{label}: {exc.reason}"
        return "not aborted"

    run, result = await start_and_control(
        root, "root", when=gate, control=lambda h: h.abort("a1", reason="enough")
    )
    assert_type(run, flowsdk.Run[str])
    assert_type(result, ControlResult)
    assert result.outcome == "applied"
    assert run.result() == "root: enough"
    assert body_saw == ["cancelled"]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "external"
    assert_clean(run)


async def test_start_and_control_waits_for_many_bodies_and_runs_any_control() -> None:
    env = flowsdk.TaskEnvironment("sacmany")
    gate = Gate("trial")

    @env.task
    async def trial(i: int) -> int:
        await gate.enter()
        return i

    @env.task
    async def root(n: int, *, scale: int) -> int:
        return scale * sum(await asyncio.gather(*(trial(i) for i in range(n))))

    async def stop_then_release(handle: flowsdk.RunHandle[int]) -> RunPhase:
        await handle.stop(reason="drain")
        gate.release_all()
        return handle.phase

    run, phase = await start_and_control(
        functools.partial(root, scale=2),
        20,
        when=lambda: gate.wait_running(20),
        control=stop_then_release,
    )
    assert phase is RunPhase.STOPPING
    assert run.phase is RunPhase.STOPPED
    assert set(phases(run).values()) == {"SUCCEEDED"}
    assert len(run.actions) == 21
    assert_clean(run)


async def test_start_and_control_accepts_an_event(tmp_path: Path) -> None:
    env = flowsdk.TaskEnvironment("sacevent")
    running = asyncio.Event()

    @env.task
    async def root() -> None:
        running.set()
        await asyncio.Event().wait()

    memory = new_store("memory", tmp_path)
    run, result = await start_and_control(
        root, when=running, control=lambda h: h.mark_failed("a0"), name="ev", store=memory
    )
    assert result.outcome == "applied"
    assert (run.name, run.phase) == ("ev", RunPhase.FAILED)
    with flowsdk.Client(memory) as client:
        assert client.get_run("ev").phase is RunPhase.FAILED


async def test_start_and_control_says_the_run_ended_before_the_condition() -> None:
    env = flowsdk.TaskEnvironment("sacearly")
    gate = Gate("never entered")
    controlled: list[str] = []

    @env.task
    async def root() -> None:
        raise ValueError("broken before the gate")

    async def control(handle: flowsdk.RunHandle[None]) -> None:
        controlled.append(handle.name)

    with pytest.raises(AssertionError, match="ended FAILED before <Gate 'never entered'") as info:
        await start_and_control(root, when=gate, control=control)
    assert isinstance(info.value.__cause__, RuntimeUserError)
    assert isinstance(info.value.__cause__.__cause__, ValueError)
    assert controlled == []


async def test_start_and_control_times_out_and_aborts_the_run(tmp_path: Path) -> None:
    env = flowsdk.TaskEnvironment("sactimeout")
    body_saw: list[str] = []

    @env.task
    async def root() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            body_saw.append("cancelled")
            raise

    memory = new_store("memory", tmp_path)
    with pytest.raises(TimeoutError, match="run slow is still RUNNING"):
        await start_and_control(
            root,
            when=asyncio.Event(),
            control=lambda h: h.stop(),
            name="slow",
            store=memory,
            timeout=0.01,  # the deadline is the behaviour under test
        )
    assert body_saw == ["cancelled"]
    with flowsdk.Client(memory) as client:
        run = client.get_run("slow")
    abort = run.action("a0").abort
    assert abort is not None
    assert run.phase is RunPhase.ABORTED
    assert abort.reason == "flowsdk.testing.start_and_control failed"


async def test_start_and_control_aborts_the_run_when_control_raises(tmp_path: Path) -> None:
    env = flowsdk.TaskEnvironment("sacraise")
    gate = Gate("g")

    @env.task
    async def root() -> None:
        await gate.enter()

    async def broken(handle: flowsdk.RunHandle[None]) -> None:
        raise KeyError(handle.name)

    memory = new_store("memory", tmp_path)
    with pytest.raises(KeyError, match="broken-run"):
        await start_and_control(root, when=gate, control=broken, name="broken-run", store=memory)
    with flowsdk.Client(memory) as client:
        assert client.get_run("broken-run").phase is RunPhase.ABORTED


async def test_start_and_control_cancelled_aborts_the_run_before_propagating(
    tmp_path: Path,
) -> None:
    env = flowsdk.TaskEnvironment("saccancel")
    gate = Gate("g")
    cleaned: list[str] = []

    @env.task
    async def root() -> None:
        try:
            await gate.enter()
        finally:
            cleaned.append("root")

    memory = new_store("memory", tmp_path)
    helper = asyncio.create_task(
        start_and_control(
            root, when=asyncio.Event(), control=lambda h: h.abort(), name="c", store=memory
        )
    )
    await gate.wait_running()
    helper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await helper
    assert cleaned == ["root"]
    with flowsdk.Client(memory) as client:
        assert client.get_run("c").phase is RunPhase.ABORTED


async def test_start_and_control_refuses_a_condition_before_starting_the_run(
    tmp_path: Path,
) -> None:
    env = flowsdk.TaskEnvironment("sacbad")

    @env.task
    async def root() -> None:
        pass

    memory = new_store("memory", tmp_path)
    with pytest.raises(TypeError, match="when= takes a Gate"):
        await start_and_control(root, when=3, control=lambda h: h.abort(), store=memory)  # type: ignore[arg-type]
    with flowsdk.Client(memory) as client:
        assert client.runs() == []


async def _wrong_calls_are_type_errors() -> None:
    # Never run: mypy --strict (warn_unused_ignores) proves that the task's
    # arguments are checked against its parameters.
    env = flowsdk.TaskEnvironment("sactypes")
    gate = Gate()

    @env.task
    async def root(n: int, text: str) -> str:
        return text * n

    await start_and_control(root, "3", "x", when=gate, control=lambda h: h.abort())  # type: ignore[arg-type]
    await start_and_control(root, 3, when=gate, control=lambda h: h.abort())  # type: ignore[arg-type]


# -- stores ----------------------------------------------------------------------------


def test_store_fixture_gives_a_store_each_run_can_be_read_back_from(
    store: str | Store, request: pytest.FixtureRequest
) -> None:
    env = flowsdk.TaskEnvironment("fixture")

    @env.task
    async def root() -> int:
        return 1

    flowsdk.run(root, name="kept", store=store)
    with flowsdk.Client(store) as client:
        assert client.get_run("kept").result() == 1
    kind = request.node.callspec.params["store"]
    if kind == "sqlite":
        assert isinstance(store, str)
        assert store.startswith("sqlite:////")
    else:
        assert not isinstance(store, str)
        assert store.url == "memory://"


def test_new_store_is_new_and_empty_each_time(tmp_path: Path) -> None:
    first, second = new_store("sqlite", tmp_path), new_store("sqlite", tmp_path)
    assert first != second
    assert list(tmp_path.iterdir()) == []  # nothing opened yet
    env = flowsdk.TaskEnvironment("fresh")

    @env.task
    async def root() -> None:
        pass

    flowsdk.run(root, name="one", store=first)
    third = new_store("sqlite", tmp_path)
    assert third not in (first, second)
    assert new_store("memory", tmp_path) is not new_store("memory", tmp_path)
    with pytest.raises(ValueError, match="unknown store kind 'postgres'"):
        new_store("postgres", tmp_path)  # type: ignore[arg-type]


def test_store_fixture_refuses_no_kinds_or_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="one or more of memory, sqlite"):
        store_fixture([])
    with pytest.raises(ValueError, match="'mongo'"):
        store_fixture(["mongo"])  # type: ignore[list-item]


def test_all_is_sorted_and_complete() -> None:
    assert flowsdk.testing.__all__ == sorted(flowsdk.testing.__all__)
    assert all(hasattr(flowsdk.testing, name) for name in flowsdk.testing.__all__)


def test_sqlite_url_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sqlite_url("runs.db") == "sqlite:///" + str(tmp_path / "runs.db")
    assert sqlite_url(tmp_path / "x.db") == f"sqlite:///{tmp_path}/x.db"


_IMPORT_PROBE = """
import json, sys, threading
import flowsdk.testing
print(json.dumps({"pytest": "pytest" in sys.modules, "threads": threading.active_count()}))
"""


def test_importing_flowsdk_testing_needs_no_pytest_and_starts_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWSDK_STORE"}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"pytest": False, "threads": 1}
    assert list(tmp_path.iterdir()) == []
