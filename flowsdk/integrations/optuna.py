"""Run an Optuna study with each trial as a flowsdk action (extra `flowsdk[optuna]`).

    import optuna
    from flowsdk.integrations.optuna import optimize

    @env.task
    async def train(lr: float, depth: int) -> float:   # never imports Optuna
        for epoch in range(20):
            loss = ...
            await flowsdk.report(loss, step=epoch)
        return loss

    def space(trial: optuna.Trial) -> dict[str, Any]:
        return {"lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
                "depth": trial.suggest_int("depth", 1, 8)}

    @env.task
    async def search() -> float:
        study = optuna.create_study(pruner=optuna.pruners.MedianPruner(),
                                    sampler=optuna.samplers.TPESampler(seed=0))
        await optimize(study, train, space, n_trials=40, concurrency=8)
        return study.best_value

The study lives in the parent's body: the sampler suggests there, each
report of a trial is passed to `trial.report` there, and the pruner decides
there; a pruned trial's action is cancelled at that very report (recorded
`ABORTED`, cause `cancelled`, with a reason such as "pruned by MedianPruner at
step 4 (value 0.52; median 0.31)"). `study.tell` gets COMPLETE, PRUNED or
FAIL. Each trial's parameters are recorded by a small action of their own
(`optuna.suggest`), and each trial runs under an action that records its
outcome (`optuna.trial`: the value or the prune, and the reports the study
was told), so a retried run hands the same parameters to the same trials and
replays every finished one, completed or pruned: the study is told the same
reports and the same outcome again, and the objective does not run. Failed
and unfinished trials run again with their recorded parameters.
"""

from __future__ import annotations

import asyncio
import contextvars
import statistics
from collections.abc import Callable, Coroutine
from typing import Any

import optuna
from optuna.trial import TrialState

from flowsdk._progress import Report, follow
from flowsdk._task import Task, TaskEnvironment

__all__ = ["optimize"]

Space = Callable[[optuna.Trial], dict[str, Any]]

_env = TaskEnvironment("optuna")
_asking: contextvars.ContextVar[Callable[[int], dict[str, Any]] | None] = contextvars.ContextVar(
    "flowsdk.optuna.asking", default=None
)
# The study's side of a trial: the objective, and the judge of its reports (the
# trial's number, the step, the value -> the reason to prune, or None).
_Judge = Callable[[int, int, float], "str | None"]
_judging: contextvars.ContextVar[tuple[Task[..., Any], _Judge] | None] = contextvars.ContextVar(
    "flowsdk.optuna.judging", default=None
)


@_env.task
async def suggest(number: int) -> dict[str, Any]:
    """Ask the parent's study for the parameters of trial `number` (recorded for a retry)."""
    ask = _asking.get()
    if ask is None:
        raise RuntimeError("optuna.suggest runs only as a step of flowsdk.integrations.optuna")
    return ask(number)


async def optimize(
    study: optuna.Study,
    objective: Task[..., Any],
    space: Space,
    *,
    n_trials: int,
    concurrency: int = 4,
) -> optuna.Study:
    """Run `n_trials` trials of `study`, each an action of `objective`, `concurrency` at a time.

    Call it from a task body (the trials are its children). `space(trial)`
    suggests a trial's parameters with Optuna's `trial.suggest_*` and returns
    them as keyword arguments of `objective`. `objective`'s body reports its
    intermediate values with `flowsdk.report(value, step=...)` and returns
    the trial's value.

    Raises:
        TypeError: `objective` is not a flowsdk task.
        ValueError: `n_trials` or `concurrency` is not a whole number >= 1, or
            the study has more than one objective.
    """
    if not isinstance(objective, Task):
        raise TypeError(f"objective must be a flowsdk task (@env.task), not {objective!r}")
    for label, number in (("n_trials", n_trials), ("concurrency", concurrency)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{label} must be a whole number >= 1, not {number!r}")
    if len(study.directions) != 1:
        raise ValueError("optimize runs studies of one objective; this study has several")
    trials: dict[int, optuna.Trial] = {}  # asked by `suggest`, or for a replayed one here
    told: dict[int, set[int]] = {}  # the steps each trial's reports were told at, as they came

    def ask(number: int) -> dict[str, Any]:
        trial = trials[number] = study.ask()
        return space(trial)

    def judge(number: int, step: int, value: float) -> str | None:
        trial = trials[number]
        trial.report(value, step)
        told[number].add(step)
        return _reason(study, step, value) if trial.should_prune() else None

    token = _asking.set(ask)
    judging = _judging.set((objective, judge))
    running: set[asyncio.Task[None]] = set()
    try:
        for number in range(n_trials):
            while len(running) >= concurrency:
                _, pending = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                running = set(pending)
            params = await suggest(number)
            if number not in trials:
                # Replayed from an earlier attempt: the same parameters again.
                study.enqueue_trial(params, skip_if_exists=False)
                trials[number] = study.ask()
                space(trials[number])
            told[number] = set()
            # Called here, in order, so that a retry finds each call at the same place.
            outcome = trial(number, params)
            running.add(asyncio.create_task(_tell(study, trials[number], outcome, told[number])))
        if running:
            await asyncio.gather(*running)
    finally:
        _asking.reset(token)
        _judging.reset(judging)
        for task in running:
            task.cancel()
    return study


@_env.task
async def trial(number: int, params: dict[str, Any]) -> dict[str, Any]:
    """Run trial `number` of the parent's study: its objective, judged at each report.

    Returns the trial's outcome, recorded so that a retry replays it: `state`
    (`COMPLETE` or `PRUNED`), `value`, `reason` (of a prune) and `reports`,
    the `[step, value]` pairs the study was told. An objective that raises
    makes the trial fail (and run again in a retry).
    """
    judging = _judging.get()
    if judging is None:
        raise RuntimeError("optuna.trial runs only as a step of flowsdk.integrations.optuna")
    objective, judge = judging
    reports: list[list[float]] = []
    pruned: list[str] = []
    steps = [0]  # the step of a report that gives none: one after the last

    def on_report(report: Report) -> None:
        step = report.step if report.step is not None else steps[0]
        steps[0] = step + 1
        if pruned:
            return
        reports.append([step, report.value])
        reason = judge(number, step, report.value)
        if reason is not None:
            pruned.append(reason)
            report.cancel(reason)

    try:
        value = await follow(objective(**params), on_report)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not pruned or (task is not None and task.cancelling()):
            raise  # the search itself is being cancelled: the trial stays unfinished
        value = None
    if pruned:  # cancelled at its report, or it absorbed the cancel and returned
        return {"state": "PRUNED", "value": None, "reason": pruned[0], "reports": reports}
    return {"state": "COMPLETE", "value": value, "reason": None, "reports": reports}


async def _tell(
    study: optuna.Study, asked: optuna.Trial, outcome: Coroutine[Any, Any, Any], told: set[int]
) -> None:
    """Tell the study how the trial ended, and the reports it was not told yet (a replay's)."""
    try:
        ended = await outcome
    except Exception:  # the objective raised (a cancel, a BaseException, goes on)
        study.tell(asked, state=TrialState.FAIL)
        return
    for step, value in ended["reports"]:
        if int(step) not in told:  # a replayed trial's reports, told again
            asked.report(value, int(step))
    if ended["state"] == "PRUNED":
        study.tell(asked, state=TrialState.PRUNED)
        return
    try:
        study.tell(asked, float(ended["value"]))
    except (TypeError, ValueError):
        study.tell(asked, state=TrialState.FAIL)


def _reason(study: optuna.Study, step: int, value: float) -> str:
    """Say why the pruner stopped a trial: its name, the step, the value (and the median)."""
    pruner = study.pruner
    name = type(pruner).__name__
    if isinstance(pruner, optuna.pruners.MedianPruner | optuna.pruners.PercentilePruner):
        others = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if step in t.intermediate_values
        ]
        if others:
            median = statistics.median(others)
            return f"pruned by {name} at step {step} (value {value:.4g}; median {median:.4g})"
    return f"pruned by {name} at step {step} (value {value:.4g})"
