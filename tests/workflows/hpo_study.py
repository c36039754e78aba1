"""An Optuna study of 12 trials, 3 at a time, that can stop for good in its middle.

`python -m flowsdk run tests.workflows.hpo_study:search --name RUN` with
`$HPO_DIR` set: every trial that returns appends a line to `$HPO_DIR/done`;
with `$HPO_BLOCK` set too, a trial that starts once 5 trials are done waits
until the store (`$HPO_STORE`) shows a finished trial, writes `$HPO_DIR/blocked`
and waits forever (the test then kills the runner with SIGKILL and retries the
run without `$HPO_BLOCK`).

`pruned_search` runs 10 trials one at a time, with a pruner that prunes some;
every trial that starts appends a line to `$HPO_DIR/started`; with
`$HPO_FAIL` set, the search fails once the study is over (to be retried).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import optuna

import flowsdk
from flowsdk.integrations.optuna import optimize

env = flowsdk.TaskEnvironment("hpo_study")


async def _one_trial_recorded(store: str, run: str) -> None:
    """Wait until the store shows a finished trial of `run` (polled, with a deadline)."""
    deadline = time.monotonic() + 30
    with flowsdk.Client(store) as client:
        while time.monotonic() < deadline:
            trials = [a for a in client.get_run(run).actions if a.task == "optuna.trial"]
            if any(a.phase is flowsdk.ActionPhase.SUCCEEDED for a in trials):
                return
            await asyncio.sleep(0.01)  # polls the store, until the deadline
    raise TimeoutError("no finished trial was recorded within 30 s")


@env.task
async def trial(x: float, depth: int) -> float:
    folder = Path(os.environ["HPO_DIR"])
    with (folder / "started").open("a") as f:
        f.write(f"{x}\n")
    done = folder / "done"
    if os.environ.get("HPO_BLOCK") and done.exists() and len(done.read_text().split()) >= 5:
        await _one_trial_recorded(os.environ["HPO_STORE"], flowsdk.current_action().run)
        (folder / "blocked").write_text("yes")
        await asyncio.Event().wait()  # until the runner is killed
    loss = 0.0
    for step in range(4):
        loss = (x - 0.3) ** 2 + depth / 10 + 1 / (step + 1)
        await flowsdk.report(loss, step=step)
    with done.open("a") as f:
        f.write(f"{x}\n")
    return loss


def space(t: optuna.Trial) -> dict[str, Any]:
    return {"x": t.suggest_float("x", 0.0, 1.0), "depth": t.suggest_int("depth", 1, 4)}


@env.task
async def search() -> dict[str, int]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=1, n_startup_trials=2),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    await optimize(study, trial, space, n_trials=12, concurrency=3)
    counts: dict[str, int] = {"trials": len(study.trials)}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


@env.task
async def pruned_search() -> dict[str, Any]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=7),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    await optimize(study, trial, space, n_trials=10, concurrency=1)
    summary: dict[str, Any] = {
        "states": [t.state.name for t in study.trials],
        "params": [t.params for t in study.trials],
        "values": [t.value for t in study.trials],
        "steps": [[[k, v] for k, v in sorted(t.intermediate_values.items())] for t in study.trials],
    }
    if os.environ.get("HPO_FAIL"):
        (Path(os.environ["HPO_DIR"]) / "study.json").write_text(json.dumps(summary))
        raise RuntimeError("the search fails after its study, to be retried")
    return summary
