"""A run's limit on its actions, `max_actions` (SCENARIOS S5): runaway recursion stops.

The run is FAILED with `ActionLimitExceededError`, the call past the limit raises it
where it is awaited and creates no action, and everything in flight is cancelled and recorded.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from flowsdk import Client, RunPhase
from flowsdk.errors import ActionLimitExceededError, RuntimeUserError
from tests.support import assert_clean, phases
from tests.test_cli_run import flowsdk_cli

env = flowsdk.TaskEnvironment("limit")


@env.task
async def fib(n: int) -> int:
    if n < 2:
        return n
    a, b = await asyncio.gather(fib(n - 1), fib(n - 2))
    return a + b


def test_fib_past_its_limit_fails_the_run_and_cancels_what_is_in_flight(tmp_path: Path) -> None:
    """fib(15) needs 1,973 actions: with `max_actions=1000` the run is FAILED, never past 1,000."""
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    run = flowsdk.run(fib, 15, store=store, max_actions=1000)
    assert run.phase is RunPhase.FAILED
    with pytest.raises(ActionLimitExceededError) as caught:
        run.result()
    assert caught.value.limit == 1000
    assert "limit of 1,000 actions" in str(caught.value)
    assert "max_actions" in str(caught.value)
    assert 0 < len(run.actions) <= 1000
    root = run.actions[0]
    assert root.phase.value == "FAILED"
    assert root.error is not None
    assert root.error.type == "flowsdk.errors.ActionLimitExceededError"
    assert root.abort is not None
    assert root.abort.cause.value == "action_limit"
    counts = Counter(phases(run).values())
    # In flight when the limit was reached: cancelled as the root's descendants.
    assert counts["ABORTED"] > 0
    assert {a.abort.cause.value for a in run.actions[1:] if a.abort} == {"ancestor"}
    # The bodies whose own call was refused raised the refusal, and say so.
    refused = [a for a in run.actions[1:] if a.phase.value == "FAILED"]
    assert refused
    assert {a.error.type for a in refused if a.error} == {"flowsdk.errors.ActionLimitExceededError"}
    assert set(counts) <= {"SUCCEEDED", "ABORTED", "FAILED"}
    assert_clean(run)
    # The store holds the same picture, for another process.
    client = Client(store)
    try:
        stored = client.get_run(run.name)
        assert stored.phase is RunPhase.FAILED
        assert len(stored.actions) == len(run.actions)
        with pytest.raises(RuntimeUserError, match="ActionLimitExceededError"):
            stored.result()
    finally:
        client.store.close()


def test_the_limit_counts_every_action_the_root_included() -> None:
    """fib(10) takes 177 actions: a limit of 177 lets it succeed; 176 does not."""
    run = flowsdk.run(fib, 10, store="memory://", max_actions=177)
    assert run.result() == 55
    assert len(run.actions) == 177
    run = flowsdk.run(fib, 10, store="memory://", max_actions=176)
    assert run.phase is RunPhase.FAILED
    assert len(run.actions) <= 176
    assert_clean(run)


def test_the_call_past_the_limit_raises_at_the_call_and_starts_nothing() -> None:
    """The refused call raises where it is awaited; the caller is then cancelled like the rest."""
    seen: list[BaseException] = []

    @env.task
    async def leaf(i: int) -> int:
        return i

    @env.task
    async def loop_forever() -> None:
        i = 0
        while True:
            try:
                await leaf(i)
            except ActionLimitExceededError as exc:
                seen.append(exc)
                break
            i += 1
        try:
            await asyncio.sleep(3600)  # cancelled: the run is failing
        except asyncio.CancelledError as exc:
            seen.append(exc)
            raise

    run = flowsdk.run(loop_forever, store="memory://", max_actions=5)
    assert run.phase is RunPhase.FAILED
    assert [a.task.rsplit(".", 1)[-1] for a in run.actions] == ["loop_forever"] + ["leaf"] * 4
    refusal, cancel = seen
    assert isinstance(refusal, ActionLimitExceededError)
    assert isinstance(cancel, asyncio.CancelledError)
    assert refusal.run == run.name
    assert refusal.action == "a0"
    assert refusal.limit == 5
    assert "leaf" in str(refusal)
    assert phases(run) == {"a0": "FAILED"} | {f"a{i}": "SUCCEEDED" for i in range(1, 5)}
    assert_clean(run)


def test_a_body_whose_call_was_refused_is_never_retried() -> None:
    @env.task
    async def one() -> int:
        return 1

    @env.task(retries=3, backoff=0)
    async def caller() -> int:
        return await one()

    @env.task
    async def root() -> int:
        return await caller()

    run = flowsdk.run(root, store="memory://", max_actions=2)
    assert run.phase is RunPhase.FAILED
    caller_record = run.actions[1]
    assert caller_record.phase.value == "FAILED"
    assert caller_record.attempt == 1
    assert caller_record.error is not None
    assert caller_record.error.type.endswith("ActionLimitExceededError")
    assert len(run.actions) == 2
    assert_clean(run)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_a_limit_that_is_not_a_positive_int_is_refused_before_any_run(
    bad: Any, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    with pytest.raises((ValueError, TypeError), match="max_actions"):
        flowsdk.run(fib, 3, store=store, max_actions=bad)
    assert not (tmp_path / "runs.db").exists()


async def test_a_started_run_keeps_its_limit() -> None:
    handle = await flowsdk.start(fib, 8, store="memory://", max_actions=10)
    run = await handle.wait()
    assert run.phase is RunPhase.FAILED
    assert len(run.actions) <= 10


WORKFLOW = """
import asyncio
import flowsdk

env = flowsdk.TaskEnvironment("cli")


@env.task
async def fib(n: int) -> int:
    if n < 2:
        return n
    a, b = await asyncio.gather(fib(n - 1), fib(n - 2))
    return a + b
"""


def test_the_cli_runs_and_retries_with_a_limit(tmp_path: Path) -> None:
    """`flowsdk run --max-actions`; a retry with a higher limit replays what succeeded."""
    (tmp_path / "wf.py").write_text(WORKFLOW)
    proc = flowsdk_cli(
        tmp_path, "run", "wf:fib", "12", "--name", "f", "--max-actions", "100", "--quiet"
    )
    assert proc.returncode == 6, proc.stderr
    assert "run f: FAILED" in proc.stdout
    assert "Traceback" not in proc.stderr
    client = Client(f"sqlite:///{tmp_path / 'runs.db'}")
    try:
        first = client.get_run("f")
        assert first.phase is RunPhase.FAILED
        assert len(first.actions) <= 100
        succeeded = sum(a.phase.value == "SUCCEEDED" for a in first.actions)
        assert succeeded > 0
        proc = flowsdk_cli(tmp_path, "retry", "f", "--max-actions", "465", "--quiet")
        assert proc.returncode == 0, proc.stderr
        second = client.get_run("f")
        assert second.record.attempt == 2
        assert second.result() == 144
        assert sum(a.replayed for a in second.actions) > 0
    finally:
        client.store.close()


@pytest.mark.parametrize("bad", ["0", "-1", "many"])
def test_the_cli_refuses_a_bad_limit(tmp_path: Path, bad: str) -> None:
    (tmp_path / "wf.py").write_text(WORKFLOW)
    proc = flowsdk_cli(tmp_path, "run", "wf:fib", "3", f"--max-actions={bad}")
    assert proc.returncode == 2, proc.stderr
    assert "--max-actions" in proc.stderr
    assert "expected a whole number" in proc.stderr or "expected a number >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs.db").exists()
