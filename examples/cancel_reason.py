"""A cancelled body learns why: the cause, who asked, and the reason.

Three trials train side by side. An operator aborts one of them with a reason
(here through the run's `RunHandle`; `flowsdk abort RUN a3 --reason ...` from
another shell does the same with a SQLite store). When the best trial
finishes, the search prunes the last one with `t.cancel("...")`. Each
cancelled body prints the message of its `CancelledError` and what
`flowsdk.current_action().abort` says; the records keep the same reasons.

Run it: `python examples/cancel_reason.py`
"""

from __future__ import annotations

import asyncio
import contextlib

import flowsdk
from flowsdk.store import MemoryStore

env = flowsdk.TaskEnvironment("reason")
started: asyncio.Event | None = None


@env.task
async def trial(lr: float, epochs: int) -> float:
    assert started is not None
    started.set()
    try:
        for _ in range(epochs):
            await asyncio.sleep(0.01)  # one epoch of training
        return lr
    except asyncio.CancelledError as exc:
        abort = flowsdk.current_action().abort
        assert abort is not None
        print(f"trial lr={lr}: {exc}")
        print(f"trial lr={lr}: cause={abort.cause.value} reason={abort.reason!r}")
        raise


@env.task
async def search() -> float:
    trials = {
        lr: asyncio.create_task(trial(lr, n)) for lr, n in [(0.1, 3), (0.01, 500), (0.001, 500)]
    }
    best = await trials[0.1]
    for lr, t in trials.items():
        if not t.done():
            t.cancel(f"pruned: lr={lr} is behind lr={best}")
    for t in trials.values():
        with contextlib.suppress(asyncio.CancelledError, flowsdk.errors.ActionAbortedError):
            await t
    return best


async def main() -> None:
    global started
    started = asyncio.Event()
    store = MemoryStore()
    handle = await flowsdk.start(search, name="search-demo", store=store)
    await started.wait()
    result = await handle.abort("a2", reason="loss is NaN")  # a2 is the trial with lr=0.01
    print(f"operator: {result.message}")
    run = await handle.wait()
    print(f"run {run.name}: {run.phase.value}, best lr {run.result()}")
    for action in run.actions:
        abort = action.abort
        why = f"{abort.cause.value} {abort.reason!r}" if abort else "-"
        print(f"{action.name:3} {action.phase.value:9} {why}")


if __name__ == "__main__":
    asyncio.run(main())
