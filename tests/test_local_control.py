"""A `Client` controls a run live on its own thread's loop at once, whatever the store.

On SQLite and PostgreSQL a `Client` asks the runner through the store and
waits for the answer; from the loop that runs the run (beside the handle of
`flowsdk.start`, or in a body controlling its own run) that wait blocked the
very loop that had to answer, for the answer's whole deadline (10 s), and the
request came back `queued`. It is applied on the spot, as for a memory store.
"""

from __future__ import annotations

import asyncio

import pytest

import flowsdk
from flowsdk import ActionPhase, Outcome, RunPhase
from flowsdk.testing import Gate

env = flowsdk.TaskEnvironment("local-control")
GATES = [Gate("held")]


@env.task
async def held() -> None:
    await GATES[0].enter()


@env.task
async def main() -> None:
    await asyncio.gather(held(), held(), return_exceptions=True)


@env.task
async def aborts_itself(store: str) -> str:
    with flowsdk.Client(store) as client:
        result = client.abort(flowsdk.current_action().run, reason="enough")
    await asyncio.sleep(3600)  # the abort lands at this await
    return result.outcome.value


@pytest.mark.timeout(60)
async def test_a_client_on_the_runs_own_loop_applies_at_once(url: str) -> None:
    """mark_failed, abort and stop from the loop that runs the run: applied, not queued."""
    gate = GATES[0] = Gate("held")
    handle = await flowsdk.start(main, store=url)
    await gate.wait_running(2)
    with flowsdk.Client(url) as client:
        failed = client.mark_failed(handle.name, "a1", reason="bad data")
        aborted = client.abort(handle.name, "a2", reason="not needed")
        stopped = client.stop(handle.name, reason="done for today")
    assert [r.outcome for r in (failed, aborted, stopped)] == [Outcome.APPLIED] * 3
    run = await handle.wait()
    assert run.phase is RunPhase.STOPPED
    assert run.action("a1").phase is ActionPhase.FAILED
    assert run.action("a2").phase is ActionPhase.ABORTED


@pytest.mark.timeout(60)
async def test_a_body_that_aborts_its_own_run_through_a_client_is_aborted(url: str) -> None:
    """The request is applied in the body's own call; the body is cancelled at its next await."""
    run = await flowsdk.run_async(aborts_itself, url, store=url)
    assert run.phase is RunPhase.ABORTED
    root = run.action("a0")
    assert root.abort is not None
    assert root.abort.reason == "enough"
