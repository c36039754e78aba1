"""A real hyper-parameter search: 36 trials of Optuna, pruned mid-training by its median.

Each trial trains a small logistic-regression model (pure Python, stochastic
gradient descent on a synthetic data set) epoch by epoch, in an action of its
own, six at a time. After every epoch the trial reports its validation loss
with `flowsdk.report`; the trial body never imports Optuna. The study lives in
the parent (`flowsdk.integrations.optuna.optimize`): its MedianPruner decides
there, and a trial whose curve is worse than the median is cancelled at that
very report, recorded `ABORTED` with the pruner's reason. Each epoch also logs
a line, kept with its action (`flowsdk logs RUN a5`).

Run it: `make demo` (or `python examples/hpo_optuna.py`); then
`flowsdk show RUN` (each trial's latest loss), `flowsdk show RUN a5` (a curve,
its logs) and `flowsdk ui` (the curves, pruned ones dashed).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import Any

import optuna

import flowsdk
from flowsdk.integrations.optuna import optimize

env = flowsdk.TaskEnvironment("hpo_optuna")
log = logging.getLogger("hpo_optuna")

EPOCHS = 12
FEATURES = 6


def make_data(seed: int, n: int) -> list[tuple[list[float], int]]:
    """Points around a fixed hyperplane, with label noise: the same for every trial."""
    rng = random.Random(seed)
    truth = [1.5, -2.0, 0.7, 0.0, 1.1, -0.4]
    data = []
    for _ in range(n):
        x = [rng.gauss(0, 1) for _ in range(FEATURES)]
        p = 1 / (1 + math.exp(-sum(w * v for w, v in zip(truth, x, strict=True))))
        data.append((x, 1 if rng.random() < p else 0))
    return data


TRAIN = make_data(1, 400)
VALID = make_data(2, 200)


def loss(w: list[float], data: list[tuple[list[float], int]]) -> float:
    """Mean log loss of the weights `w` on `data`."""
    total = 0.0
    for x, y in data:
        z = sum(a * b for a, b in zip(w, x, strict=True))
        p = min(max(1 / (1 + math.exp(-z)), 1e-9), 1 - 1e-9)
        total -= y * math.log(p) + (1 - y) * math.log(1 - p)
    return total / len(data)


@env.task
async def train(lr: float, l2: float, batch: int) -> float:
    """Train for `EPOCHS` epochs of SGD; report the validation loss after each."""
    rng = random.Random(batch)
    w = [0.0] * FEATURES
    valid = loss(w, VALID)
    for epoch in range(EPOCHS):
        order = TRAIN[:]
        rng.shuffle(order)
        for start in range(0, len(order), batch):
            grad = [0.0] * FEATURES
            for x, y in order[start : start + batch]:
                z = sum(a * b for a, b in zip(w, x, strict=True))
                err = 1 / (1 + math.exp(-max(min(z, 30), -30))) - y
                for i in range(FEATURES):
                    grad[i] += err * x[i]
            w = [wi - lr * (g / batch + l2 * wi) for wi, g in zip(w, grad, strict=True)]
        valid = loss(w, VALID)
        log.info("epoch %d: validation loss %.4f", epoch, valid)
        await flowsdk.report(valid, step=epoch)
        await asyncio.sleep(0)  # let the other trials take their epoch
    return valid


def space(trial: optuna.Trial) -> dict[str, Any]:
    """The search space, in Optuna's terms (used in the parent only)."""
    return {
        "lr": trial.suggest_float("lr", 1e-4, 3.0, log=True),
        "l2": trial.suggest_float("l2", 1e-5, 0.3, log=True),
        "batch": trial.suggest_int("batch", 8, 64, log=True),
    }


@env.task
async def search(trials: int) -> dict[str, Any]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=7),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
    )
    await optimize(study, train, space, n_trials=trials, concurrency=6)
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"states": states, "best": study.best_value, "params": study.best_params}


if __name__ == "__main__":
    run = flowsdk.run(search, 36)
    result = run.result()
    print(f"run {run.name}: {run.phase.value}")
    states = result["states"]
    print(
        f"{sum(states.values())} trials: {states.get('COMPLETE', 0)} complete, "
        f"{states.get('PRUNED', 0)} pruned, {states.get('FAIL', 0)} failed"
    )
    params = ", ".join(f"{k}={v:.3g}" for k, v in result["params"].items())
    print(f"best validation loss {result['best']:.4f} with {params}")
    trials = [a for a in run.actions if a.task == "hpo_optuna.train"]
    phases = [a.phase.value for a in trials]
    print(f"actions: {phases.count('SUCCEEDED')} SUCCEEDED, {phases.count('ABORTED')} ABORTED")
    pruned = [a for a in trials if a.abort is not None]
    for action in pruned[:3]:
        assert action.abort is not None
        print(f"{action.name:<5} {action.abort.cause.value}: {action.abort.reason}")
