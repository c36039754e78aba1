"""A hyper-parameter search whose trials run on Ray, stopped early from the parent.

The same search as `hpo_early_stop.py`, with one change: the trials'
environment says `executor="ray"`. Each `train(lr)` body runs on a Ray worker
(an async actor of its own); the action, its record and its cancellation stay
in this process. The first trial to reach the target wins; the parent cancels
the others with plain `t.cancel()` (lr=0.1 learns fastest, but on a busy
machine the actors' start-up times can decide), the cancellation reaches each remote body
as `CancelledError` (its `finally` runs on the worker), and flowsdk records
them `ABORTED` with cause `cancelled`.

Without a cluster (`ray.init()` or `$RAY_ADDRESS`), flowsdk starts a local one
for this process, listening on loopback only, and it is shut down at exit.

Run it: `python examples/hpo_ray.py` (needs `pip install 'flowsdk[ray]'`)
"""

from __future__ import annotations

import asyncio
import math
import os

import flowsdk

trials_env = flowsdk.TaskEnvironment("hpo_ray", executor="ray", grace_period=5)
driver_env = flowsdk.TaskEnvironment("hpo_ray_driver")

LEARNING_RATES = (1.0, 0.1, 0.01, 0.001)
TARGET = 0.95
MAX_EPOCHS = 200


@trials_env.task
async def train(lr: float) -> tuple[float, int]:
    """Train until the score reaches `TARGET`; return the score and the worker's pid."""
    speed = 0.5 - 0.2 * abs(math.log10(lr) + 1)  # this toy model learns best at lr=0.1
    score = 0.0
    for epoch in range(1, MAX_EPOCHS + 1):
        await asyncio.sleep(0.05)  # one "epoch" of work; a cancel lands here, on the worker
        score = 1 - (1 - speed) ** epoch
        if score >= TARGET:
            break
    return score, os.getpid()


@driver_env.task
async def search() -> tuple[float, float, int]:
    trials = {asyncio.create_task(train(lr)): lr for lr in LEARNING_RATES}
    done, pending = await asyncio.wait(trials, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel("early stop: another trial reached the target")
    await asyncio.gather(*pending, return_exceptions=True)  # their remote cleanup has run
    best = done.pop()
    score, pid = best.result()
    return trials[best], score, pid


if __name__ == "__main__":
    run = flowsdk.run(search)
    best_lr, best_score, worker_pid = run.result()
    print(f"run {run.name}: {run.phase.value}")
    print(f"best lr {best_lr:g}: score {best_score:.3f} (target {TARGET})")
    print(f"the winning trial ran on a Ray worker: {worker_pid != os.getpid()}")
    print()
    print(f"{'action':<7} {'lr':>6}  {'phase':<10} {'cause':<10}")
    trials = [a for a in run.actions if a.task == "hpo_ray.train"]
    for action, lr in zip(trials, LEARNING_RATES, strict=True):
        cause = action.abort.cause.value if action.abort else "-"
        print(f"{action.name:<7} {lr:>6g}  {action.phase.value:<10} {cause:<10}")
    stopped = sum(a.phase is flowsdk.ActionPhase.ABORTED for a in trials)
    print(f"{stopped} trials stopped early")
