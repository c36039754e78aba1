"""A small hyper-parameter search that stops as soon as one trial is good enough.

Four `train(lr)` trials run side by side, one action each. The first to reach
the target score wins; the root cancels the others with plain `t.cancel()`
(`asyncio.wait(..., FIRST_COMPLETED)`), and flowsdk records them `ABORTED`
with cause `cancelled`. The table at the end is read from the run's records.

Run it: `make demo` (or `python examples/hpo_early_stop.py`)
"""

from __future__ import annotations

import asyncio
import math

import flowsdk

env = flowsdk.TaskEnvironment("hpo")

LEARNING_RATES = (1.0, 0.1, 0.01, 0.001)
TARGET = 0.95
MAX_EPOCHS = 50


@env.task
async def train(lr: float) -> float:
    """Train until the score reaches `TARGET`; return the score."""
    speed = 0.5 - 0.2 * abs(math.log10(lr) + 1)  # this toy model learns best at lr=0.1
    score = 0.0
    for epoch in range(1, MAX_EPOCHS + 1):
        await asyncio.sleep(0.01)  # one "epoch" of work
        score = 1 - (1 - speed) ** epoch
        if score >= TARGET:
            break
    return score


@env.task
async def search() -> tuple[float, float]:
    trials = {asyncio.create_task(train(lr)): lr for lr in LEARNING_RATES}
    done, pending = await asyncio.wait(trials, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()  # early stop: the other trials are not needed any more
    await asyncio.gather(*pending, return_exceptions=True)  # let their cleanup finish
    best = done.pop()
    return trials[best], best.result()


if __name__ == "__main__":
    run = flowsdk.run(search)
    best_lr, best_score = run.result()
    print(f"run {run.name}: {run.phase.value}")
    print(f"best lr {best_lr:g}: score {best_score:.3f} (target {TARGET})")
    print()
    print(f"{'action':<7} {'lr':>6}  {'phase':<10} {'cause':<10} {'score':>6}")
    # Trials start in the order they were created, so they are a1, a2, ... in
    # LEARNING_RATES order.
    trials = [a for a in run.actions if a.task == "hpo.train"]
    for action, lr in zip(trials, LEARNING_RATES, strict=True):
        cause = action.abort.cause.value if action.abort else "-"
        score = f"{best_score:.3f}" if lr == best_lr else "-"
        print(f"{action.name:<7} {lr:>6g}  {action.phase.value:<10} {cause:<10} {score:>6}")
