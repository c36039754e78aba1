from __future__ import annotations

import asyncio

import flowsdk
from tests.support import assert_clean, causes, phases

env = flowsdk.TaskEnvironment("smoke")


@env.task
async def sleeper(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@env.task
async def root_returns_with_pending_child() -> int:
    started = asyncio.Event()

    async def spawn() -> None:
        started.set()
        await sleeper(60)

    asyncio.create_task(sleeper(60))
    await asyncio.sleep(0)
    return 42


def test_root_return_cancels_pending_child() -> None:
    run = flowsdk.run(root_returns_with_pending_child)
    assert run.result() == 42
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "root_exit"
    assert_clean(run)
