"""Cancel children with `t.cancel()` after a sibling fails.

The root starts 30 sleepers as asyncio tasks, then awaits a task that fails.
The failure reaches the root as `RuntimeUserError` whose `__cause__` is the
very exception the child raised. The root catches it, cancels the sleepers
with plain `t.cancel()` and waits for them: each is recorded `ABORTED` with
cause `cancelled`, and the run still `SUCCEEDED` because the root handled the
failure.

Run it: `python examples/cancel_tasks.py`
"""

from __future__ import annotations

import asyncio
from collections import Counter

import flowsdk
from flowsdk.errors import RuntimeUserError

env = flowsdk.TaskEnvironment("cancel")


@env.task
async def sleeper(i: int) -> int:
    await asyncio.sleep(3600)
    return i


@env.task
async def load_data() -> list[int]:
    raise ValueError("data source unavailable")


@env.task
async def main() -> int:
    sleepers = [asyncio.create_task(sleeper(i)) for i in range(30)]
    await asyncio.sleep(0)  # let the sleepers start first, so they are a1..a30
    try:
        await load_data()
    except RuntimeUserError as err:
        print(f"main: {err.action} failed: {err.__cause__!r}")
    for t in sleepers:
        t.cancel()
    # Wait for the cancelled sleepers, so their cleanup has run when main returns.
    results = await asyncio.gather(*sleepers, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    print(f"main: cancelled {cancelled} sleepers")
    return cancelled


if __name__ == "__main__":
    run = flowsdk.run(main)
    print(f"run {run.name}: {run.phase.value}, result {run.result()}")
    summary = Counter(
        f"{a.phase.value} ({a.abort.cause.value})" if a.abort else a.phase.value
        for a in run.actions
    )
    for phase, count in sorted(summary.items()):
        print(f"{count:>3} x {phase}")
