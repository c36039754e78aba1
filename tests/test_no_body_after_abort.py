"""No body starts once an abort is recorded for it or an ancestor (SCENARIOS §3, guarantee 3b).

A body below an operator's request (an abort or a mark-failed of it or of an
ancestor) may still call a task: in the step its abort
arrived in, or in its `except CancelledError:` cleanup. That call's action is
recorded, cancelled by its ancestor (cause `ancestor`) before its first step,
and the caller gets `CancelledError`, once. Workflow code's own asyncio
cancellation (`t.cancel()`) and a task's `timeout` are not such stops: their
cleanup may call tasks, as it may start coroutines in asyncio.
"""

from __future__ import annotations

import asyncio

import pytest

import flowsdk
from flowsdk import ActionPhase, RunPhase
from flowsdk.errors import ActionAbortedError, RuntimeUserError
from flowsdk.testing import Gate

env = flowsdk.TaskEnvironment("no-body-after-abort")
STARTED: list[str] = []
SEEN: list[str] = []
GATES = [Gate("held")]


@env.task
async def child(tag: str) -> str:
    STARTED.append(tag)
    await asyncio.sleep(0)
    return tag


@env.task
async def aborts_itself_then_calls(store: str, shape: str) -> None:
    with flowsdk.Client(store) as client:
        client.abort(flowsdk.current_action().run, reason="enough")
    # The abort is recorded; this step goes on until its next await.
    try:
        if shape == "awaited":
            await child("awaited")
        else:
            await asyncio.gather(child("gathered-1"), child("gathered-2"))
    except asyncio.CancelledError:
        SEEN.append("cancelled")
        await asyncio.sleep(0)  # a second CancelledError would land here
        SEEN.append("cleanup done")
        raise


@env.task
async def calls_in_its_cleanup() -> None:
    try:
        await GATES[0].enter()
    except asyncio.CancelledError:
        try:
            await child("in cleanup")
        except asyncio.CancelledError:
            SEEN.append("call cancelled")
        raise


@env.task
async def aborts_its_child(store: str) -> None:
    t = asyncio.create_task(calls_in_its_cleanup())
    await GATES[0].wait_running(1)
    with flowsdk.Client(store) as client:
        client.abort(flowsdk.current_action().run, "a1", reason="not needed")
    try:
        await t
    except ActionAbortedError:
        SEEN.append("child aborted")


@env.task
async def cancels_its_child() -> None:
    t = asyncio.create_task(calls_in_its_cleanup())
    await GATES[0].wait_running(1)
    t.cancel("early stop")
    try:
        await t
    except asyncio.CancelledError:
        SEEN.append("child cancelled")


@env.task(timeout=0.05)
async def times_out() -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await child("after its timeout")
        raise


@env.task
async def calls_one_that_times_out() -> None:
    try:
        await times_out()
    except RuntimeUserError:
        SEEN.append("timed out")


@env.task(timeout=0.05)
async def times_out_then_waits() -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await GATES[0].enter()  # in its own timeout's cleanup; the run is aborted now
        await child("below the abort")
        raise


@pytest.fixture(autouse=True)
def fresh() -> None:
    STARTED.clear()
    SEEN.clear()
    GATES[0] = Gate("held")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", ["awaited", "gathered"])
async def test_a_call_made_in_the_step_its_callers_abort_arrived_in_never_starts(
    url: str, shape: str
) -> None:
    run = await flowsdk.run_async(aborts_itself_then_calls, url, shape, store=url)
    assert run.phase is RunPhase.ABORTED
    assert STARTED == []
    if shape == "awaited":
        assert SEEN == ["cancelled", "cleanup done"]  # one CancelledError, not two
    else:
        # Under `gather`, Python 3.12+ delivers a pending cancel whose gather had ended
        # a second time, at the next await, as plain asyncio does with futures.
        assert SEEN[0] == "cancelled"
    children = [a for a in run.actions if a.name != "a0"]
    assert children  # recorded, never started
    for action in children:
        assert action.phase is ActionPhase.ABORTED
        assert action.abort is not None
        assert action.abort.cause.value == "ancestor"
        assert action.started_at is not None


@pytest.mark.timeout(60)
async def test_a_call_in_the_cleanup_of_an_aborted_body_never_starts(url: str) -> None:
    run = await flowsdk.run_async(aborts_its_child, url, store=url)
    assert run.phase is RunPhase.SUCCEEDED
    assert STARTED == []
    assert SEEN == ["call cancelled", "child aborted"]
    assert run.action("a1").phase is ActionPhase.ABORTED
    called = run.action("a2")
    assert called.phase is ActionPhase.ABORTED
    assert called.abort is not None
    assert called.abort.cause.value == "ancestor"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("root", "started", "seen"),
    [
        (cancels_its_child, "in cleanup", "child cancelled"),  # workflow code's t.cancel()
        (calls_one_that_times_out, "after its timeout", "timed out"),  # the task's timeout
    ],
)
async def test_a_call_in_the_cleanup_of_a_body_stopped_by_workflow_code_runs(
    root: flowsdk.Task[[], None], started: str, seen: str
) -> None:
    run = await flowsdk.run_async(root, store="memory://")
    assert run.phase is RunPhase.SUCCEEDED
    assert [started] == STARTED
    assert [seen] == SEEN
    assert run.action("a2").phase is ActionPhase.SUCCEEDED


@pytest.mark.timeout(60)
async def test_a_timeout_cleanup_starts_nothing_once_an_operator_aborts_above_it() -> None:
    """A task's own timeout lets its cleanup call tasks, but not below an operator's abort."""
    gate = GATES[0]
    handle = await flowsdk.start(times_out_then_waits, store="memory://")
    await gate.wait_running(1)
    await handle.abort(reason="operator")
    gate.release_all()
    run = await handle.wait()
    assert STARTED == []
    called = run.action("a1")
    assert called.phase is ActionPhase.ABORTED
    assert called.abort is not None
    assert called.abort.cause.value == "ancestor"
