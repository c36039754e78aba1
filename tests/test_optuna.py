"""The Optuna integration under a retry, a stop, a cancel, a kept study and several metrics."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest

import flowsdk
from flowsdk import ActionPhase, RunPhase
from flowsdk.integrations.optuna import optimize
from flowsdk.testing import Gate
from tests.support import assert_clean

optuna.logging.set_verbosity(optuna.logging.WARNING)
TS = optuna.trial.TrialState

env = flowsdk.TaskEnvironment("hpo")
FAIL_AFTER: list[bool] = []  # the search fails once its study is over (to be retried)
STUDIES: list[optuna.Study] = []
STORAGE: list[str] = []  # an Optuna storage URL: the study is kept there, and loaded again
GATES: list[Gate] = []
RAN: list[float] = []
BROKEN: list[bool] = []  # the objective raises (its trials fail, to run again in a retry)
ENGINES: list[Any] = []  # the SQLAlchemy engines of the kept studies' storages


def loss_of(lr: float, depth: int) -> float:
    return (lr - 0.03) ** 2 * 100 + depth / 10


@env.task
async def objective(lr: float, depth: int) -> float:
    RAN.append(lr)
    if BROKEN:
        raise ValueError("diverged")
    if GATES:
        await GATES[0].enter()
    loss = loss_of(lr, depth)
    for step in range(3):
        await flowsdk.report(float(step), step=step, name="samples")
        await flowsdk.report(loss + 1 / (step + 1), step=step, name="loss")
    return loss


def space(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "lr": trial.suggest_float("lr", 1e-3, 1e-1, log=True),
        "depth": trial.suggest_int("depth", 1, 4),
    }


@env.task
async def search(n_trials: int, concurrency: int, baseline: bool, metric: str | None) -> int:
    if STORAGE:
        storage = optuna.storages.RDBStorage(STORAGE[0])
        ENGINES.append(storage.engine)  # disposed by the fixture: no connection left open
        study = optuna.create_study(
            study_name="kept", storage=storage, load_if_exists=True,
            sampler=optuna.samplers.RandomSampler(seed=5),
        )  # fmt: skip
    else:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    if baseline:
        study.enqueue_trial({"lr": 0.01, "depth": 1})
    STUDIES.append(study)
    await optimize(
        study, objective, space, n_trials=n_trials, concurrency=concurrency, metric=metric
    )
    if FAIL_AFTER:
        raise RuntimeError("the search fails after its study, to be retried")
    return len(study.trials)


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    yield
    for engine in ENGINES:
        engine.dispose()
    ENGINES.clear()
    FAIL_AFTER.clear()
    STUDIES.clear()
    STORAGE.clear()
    GATES.clear()
    RAN.clear()
    BROKEN.clear()


def pairs(study: optuna.Study) -> list[tuple[str, dict[str, Any], float | None]]:
    return [(t.state.name, t.params, t.value) for t in study.trials]


@pytest.mark.timeout(60)
def test_a_retry_with_an_enqueued_baseline_tells_each_trial_its_own_parameters(
    tmp_path: Path,
) -> None:
    """The search's own `enqueue_trial` comes first, as in the attempt before: no shift."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    FAIL_AFTER.append(True)
    first = flowsdk.run(search, 5, 1, True, "loss", name="baseline", store=url)
    assert first.phase is RunPhase.FAILED
    before = pairs(STUDIES[0])
    assert before[0][1] == {"lr": 0.01, "depth": 1}
    FAIL_AFTER.clear()
    ran = len(RAN)
    with flowsdk.Client(url) as client:
        again = client.retry("baseline")
    assert again.result() == 5
    assert len(RAN) == ran  # every trial replayed
    after = pairs(STUDIES[1])
    assert after == before
    for _, params, value in after:
        assert value == pytest.approx(loss_of(**params))


@pytest.mark.timeout(60)
def test_a_retry_on_a_study_kept_in_storage_adds_no_trial_twice(tmp_path: Path) -> None:
    """A study loaded again by name holds the first attempt's trials: they are not told again."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    STORAGE.append(f"sqlite:///{tmp_path / 'optuna.db'}")
    FAIL_AFTER.append(True)
    flowsdk.run(search, 6, 2, False, "loss", name="kept", store=url)
    before = pairs(STUDIES[0])
    FAIL_AFTER.clear()
    with flowsdk.Client(url) as client:
        again = client.retry("kept")
    assert again.result() == 6
    assert pairs(STUDIES[1]) == before


@pytest.mark.timeout(60)
def test_a_retry_of_a_retry_on_a_kept_study_tells_each_trial_once(tmp_path: Path) -> None:
    """Failed in attempt 1, completed in attempt 2, replayed in attempt 3: told once."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    STORAGE.append(f"sqlite:///{tmp_path / 'optuna.db'}")
    FAIL_AFTER.append(True)
    BROKEN.append(True)
    flowsdk.run(search, 3, 1, False, "loss", name="thrice", store=url)
    BROKEN.clear()
    with flowsdk.Client(url) as client:
        client.retry("thrice")  # the trials run again and complete; the search fails after
        FAIL_AFTER.clear()
        third = client.retry("thrice")
    assert third.phase is RunPhase.SUCCEEDED
    states = [t.state for t in STUDIES[-1].trials]
    assert states.count(TS.COMPLETE) == 3
    assert states.count(TS.FAIL) == 3


@pytest.mark.timeout(60)
def test_the_study_is_told_the_named_metric_only() -> None:
    run = flowsdk.run(search, 4, 2, False, "loss", store="memory://")
    assert run.phase is RunPhase.SUCCEEDED
    for t in STUDIES[0].trials:
        assert t.intermediate_values == {
            step: pytest.approx(loss_of(**t.params) + 1 / (step + 1)) for step in range(3)
        }


@pytest.mark.timeout(60)
def test_without_a_metric_the_first_reported_name_is_told_and_the_others_are_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="flowsdk"):
        run = flowsdk.run(search, 2, 1, False, None, store="memory://")
    assert run.phase is RunPhase.SUCCEEDED
    for t in STUDIES[0].trials:
        assert t.intermediate_values == {0: 0.0, 1: 1.0, 2: 2.0}  # "samples" came first
    [warning] = [
        r.getMessage() for r in caplog.records if "not told to the study" in r.getMessage()
    ]
    assert "'loss'" in warning
    assert "'samples'" in warning


async def search_with_trials_held(concurrency: int) -> flowsdk.RunHandle[int]:
    """Start a search of 8 trials and return once `concurrency` of them run, held at a gate."""
    GATES.append(Gate("trial"))
    handle = await flowsdk.start(search, 8, concurrency, False, "loss", store="memory://")
    await GATES[0].wait_running(concurrency)
    return handle


@pytest.mark.timeout(60)
async def test_a_stop_and_wait_lets_the_running_trials_finish_and_starts_no_more() -> None:
    handle = await search_with_trials_held(2)
    await handle.stop(reason="need the machine")
    GATES[0].release_all()
    run = await handle.wait()
    assert run.phase is RunPhase.STOPPED
    objectives = [a for a in run.actions if a.task == "hpo.objective"]
    assert len(objectives) == 2
    assert [a.phase for a in objectives] == [ActionPhase.SUCCEEDED] * 2
    assert [t.state for t in STUDIES[0].trials] == [TS.COMPLETE, TS.COMPLETE]


@pytest.mark.timeout(60)
async def test_an_aborted_search_tells_the_study_its_interrupted_trials_failed() -> None:
    handle = await search_with_trials_held(3)
    await handle.abort(reason="wrong dataset")
    run = await handle.wait()
    assert run.phase is RunPhase.ABORTED
    assert [t.state for t in STUDIES[0].trials] == [TS.FAIL] * 3
    assert_clean(run)
