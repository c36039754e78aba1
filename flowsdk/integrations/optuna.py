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
import logging
import statistics
from collections.abc import Callable, Coroutine
from typing import Any

import optuna
from optuna.trial import TrialState

from flowsdk._info import current_action
from flowsdk._progress import Report, follow
from flowsdk._task import Task, TaskEnvironment
from flowsdk.errors import NondeterminismError, RunStoppingError

__all__ = ["optimize"]

Space = Callable[[optuna.Trial], dict[str, Any]]
# The user attribute that names a trial's run and number in the search (`_replay`).
_TAG = "flowsdk"
logger = logging.getLogger("flowsdk")

_env = TaskEnvironment("optuna")
_asking: contextvars.ContextVar[Callable[[int], list[Any]] | None] = contextvars.ContextVar(
    "flowsdk.optuna.asking", default=None
)
# The study's side of a trial: the objective, and the judge of its reports (the
# trial's number, the report's name, step and value -> whether the study was told
# it, and the reason to prune, or None).
_Judge = Callable[[int, str, int, float], "tuple[bool, str | None]"]
_judging: contextvars.ContextVar[tuple[Task[..., Any], _Judge] | None] = contextvars.ContextVar(
    "flowsdk.optuna.judging", default=None
)


@_env.task
async def suggest(number: int) -> list[Any]:
    """Ask the parent's study for the parameters of trial `number` (recorded for a retry).

    Returns `[params, study name, Optuna's number of the trial]` (what the records
    show of it; a retry finds the trial in a study kept in storage by its tag).
    """
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
    metric: str | None = None,
) -> optuna.Study:
    """Run `n_trials` trials of `study`, each an action of `objective`, `concurrency` at a time.

    Call it from a task body (the trials are its children). `space(trial)`
    suggests a trial's parameters with Optuna's `trial.suggest_*` and returns
    them as keyword arguments of `objective`. `objective`'s body reports its
    intermediate values with `flowsdk.report(value, step=...)` (a plain `def`
    objective with `flowsdk.report_sync`) and returns
    the trial's value. The study is told the reports named `metric` (by
    default the name of the search's first report); others are recorded only.

    A stop-and-wait of the run starts no more trials and lets the running ones
    finish, told to the study; a cancel (an abort) tells the study that the
    trials it interrupted failed.

    Raises:
        TypeError: `objective` is not a flowsdk task.
        ValueError: `n_trials` or `concurrency` is not a whole number >= 1, or
            the study has more than one objective.
        NondeterminismError: (in a retry) the study's waiting trials give a
            replayed trial other parameters than the attempt before recorded.
    """
    if not isinstance(objective, Task):
        raise TypeError(f"objective must be a flowsdk task (@env.task), not {objective!r}")
    for label, number in (("n_trials", n_trials), ("concurrency", concurrency)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{label} must be a whole number >= 1, not {number!r}")
    if len(study.directions) != 1:
        raise ValueError("optimize runs studies of one objective; this study has several")
    trials: dict[int, optuna.Trial | None] = {}  # None: told in an earlier attempt (storage)
    told: dict[int, set[int]] = {}  # the steps each trial's reports were told at, as they came
    ended: set[int] = set()  # the trials the study was told the end of
    named = [metric]  # the name of the reports the study is told

    run = current_action().run

    def ask(number: int) -> list[Any]:
        trial = trials[number] = study.ask()
        trial.set_user_attr(_TAG, f"{run}/{number}")
        return [space(trial), study.study_name, trial.number]

    def judge(number: int, name: str, step: int, value: float) -> tuple[bool, str | None]:
        if named[0] is None:
            named[0] = name
        if name != named[0]:
            if name not in ignored:
                ignored.add(name)
                logger.warning(
                    "optimize: reports named %r are not told to the study, only those named "
                    "%r (pass metric= to choose)",
                    name,
                    named[0],
                )
            return False, None
        trial = trials[number]
        if trial is None:
            return False, None  # the study (in storage) was told this trial's end already
        trial.report(value, step)
        told[number].add(step)
        return True, _reason(study, step, value) if trial.should_prune() else None

    ignored: set[str] = set()
    token = _asking.set(ask)
    judging = _judging.set((objective, judge))
    running: set[asyncio.Task[None]] = set()
    looping = _OptimizeLoop(study)
    try:
        for number in range(n_trials):
            while len(running) >= concurrency:
                done, pending = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                running = set(pending)
                for told_one in done:
                    told_one.result()  # telling the study failed (its storage, its sampler)
            if looping.stopped():
                break  # `study.stop()`: a `GridSampler` whose grid is spent, say
            try:
                recorded = await suggest(number)
                params = _replay(study, space, trials, number, recorded, f"{run}/{number}")
                told[number] = set()
                # Called here, in order, so that a retry finds each call at the same place.
                outcome = trial(number, params)
            except RunStoppingError:
                break  # a stop-and-wait: no more trials; the running ones finish
            asked = trials[number]
            running.add(asyncio.create_task(_tell(study, asked, outcome, told[number], ended)))
        if running:
            await asyncio.gather(*running)
    finally:
        _asking.reset(token)
        _judging.reset(judging)
        for task in running:
            task.cancel()
        try:
            for asked in trials.values():
                if asked is not None and asked.number not in ended:
                    # Asked and never told (the search was cancelled, or stopped before
                    # its call): failed, as Optuna's own `optimize` tells an interrupted
                    # trial.
                    ended.add(asked.number)
                    study.tell(asked, state=TrialState.FAIL, skip_if_finished=True)
        finally:
            looping.close()
    return study


class _OptimizeLoop:
    """Run the study as Optuna's own `optimize` does, for `study.stop()`.

    Optuna lets `study.stop()` be called only inside its `optimize` loop (it
    raises `RuntimeError` elsewhere), and a `GridSampler` calls it when it
    tells the study of the trial that spends its grid: the study's trials are
    told here, so this marks the loop's thread as in that loop (Optuna's own
    thread-local flag), and a stop asks for no more trials (its flag), as in
    Optuna. A version of Optuna without those attributes is left as it is.
    """

    __slots__ = ("before", "local", "study")

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        local = getattr(study, "_thread_local", None)
        self.local = local if hasattr(study, "_stop_flag") else None
        self.before = getattr(self.local, "in_optimize_loop", None)
        if self.local is not None and isinstance(self.before, bool):
            study._stop_flag = False
            self.local.in_optimize_loop = True
        else:
            self.local = None

    def stopped(self) -> bool:
        """Whether `study.stop()` was called since the search began."""
        return self.local is not None and bool(self.study._stop_flag)

    def close(self) -> None:
        if self.local is not None:
            self.local.in_optimize_loop = self.before


def _replay(
    study: optuna.Study,
    space: Space,
    trials: dict[int, optuna.Trial | None],
    number: int,
    recorded: Any,
    tag: str,
) -> dict[str, Any]:
    """The parameters of trial `number`, and its trial in `study` when `suggest` was replayed.

    Every trial the search asks is tagged with the run and its number (`tag`). A
    study kept in storage that holds a tagged trial with the same parameters,
    finished, was told it already (by any attempt before): it is not told again;
    a tagged one left unfinished (its runner was killed) is failed, and the trial
    runs again on a new one. Otherwise the same parameters are asked again:
    through the study's waiting trials (`enqueue_trial`), or, if the study has
    some waiting (`enqueue_trial` of the search's own code, which the attempt
    before asked at the same trial), through the oldest of them.
    """
    params = recorded if isinstance(recorded, dict) else recorded[0]  # a dict: older records
    if number in trials:
        return params  # asked now, by `suggest`
    for kept in study.get_trials(deepcopy=False):
        if kept.user_attrs.get(_TAG) != tag or kept.params != params:
            continue
        if kept.state in (TrialState.COMPLETE, TrialState.PRUNED):
            trials[number] = None
            return params
        if kept.state in (TrialState.RUNNING, TrialState.WAITING):
            study.tell(kept.number, state=TrialState.FAIL, skip_if_finished=True)
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.enqueue_trial(params, skip_if_exists=False)
    asked = trials[number] = study.ask()
    asked.set_user_attr(_TAG, tag)
    again = space(asked)
    if again != params:
        raise NondeterminismError(
            f"trial {number} of the search was recorded with the parameters {params!r}, and "
            f"the study of this attempt gives it {again!r} (the study's waiting trials, made "
            "with enqueue_trial, differ from the attempt before: on a study kept in storage, "
            "enqueue with skip_if_exists=True); start a new run instead"
        )
    return params


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
    steps = [0]  # the step of a told report that gives none: one after the last told

    def on_report(report: Report) -> None:
        if pruned:
            return
        step = report.step if report.step is not None else steps[0]
        judged, reason = judge(number, report.name, step, report.value)
        if not judged:
            return  # another metric than the study's
        steps[0] = step + 1
        reports.append([step, report.value])
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
    study: optuna.Study,
    asked: optuna.Trial | None,
    outcome: Coroutine[Any, Any, Any],
    told: set[int],
    ended: set[int],
) -> None:
    """Tell the study how the trial ended, and the reports it was not told yet (a replay's).

    `asked` is None for a trial a study kept in storage was told already.
    """
    try:
        result = await outcome
    except Exception:  # the objective raised (a cancel, a BaseException, goes on)
        if asked is not None:
            ended.add(asked.number)
            study.tell(asked, state=TrialState.FAIL)
        return
    if asked is None:
        return
    ended.add(asked.number)
    for step, value in result["reports"]:
        if int(step) not in told:  # a replayed trial's reports, told again
            asked.report(value, int(step))
    if result["state"] == "PRUNED":
        study.tell(asked, state=TrialState.PRUNED)
        return
    try:
        study.tell(asked, float(result["value"]))
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
