"""Progress reports, the observers that follow them, per-action logs, and the Optuna study."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

import flowsdk
from flowsdk import AbortCause, ActionPhase, RunPhase
from flowsdk.errors import NotInRunError
from flowsdk.integrations.optuna import optimize
from flowsdk.store import MemoryStore

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("tests.progress")


def test_a_pruned_child_is_aborted_at_its_report_with_the_reason_and_its_finally_runs() -> None:
    env = flowsdk.TaskEnvironment("prune")
    seen: list[tuple[str, int | None, float]] = []
    reached: list[int] = []
    cleaned: list[str] = []

    @env.task
    async def train(rate: float) -> float:
        try:
            for step in range(5):
                await flowsdk.report(rate * step, step=step)
                reached.append(step)  # never after the report the observer pruned
            return rate
        finally:
            cleaned.append(flowsdk.current_action().name)

    @env.task
    async def main() -> list[str]:
        def on_report(report: flowsdk.Report) -> None:
            seen.append((report.action, report.step, report.value))
            if report.value >= 0.5:
                report.cancel(f"pruned at step {report.step}")

        results = await asyncio.gather(
            flowsdk.follow(train(0.1), on_report),
            flowsdk.follow(train(0.2), on_report),
            return_exceptions=True,
        )
        return [type(r).__name__ for r in results]

    run = flowsdk.run(main, store=MemoryStore())
    assert run.phase is RunPhase.SUCCEEDED
    assert run.result() == ["float", "CancelledError"]
    a1, a2 = run.actions[1], run.actions[2]
    assert (a1.phase, a2.phase) == (ActionPhase.SUCCEEDED, ActionPhase.ABORTED)
    assert a2.abort is not None
    assert a2.abort.cause is AbortCause.CANCELLED
    assert a2.abort.reason == "pruned at step 3"
    assert sorted(cleaned) == ["a1", "a2"]
    # a1 reached every step; a2 stopped at the report of step 3, before its next line.
    assert reached.count(2) == 2
    assert reached.count(3) == 1
    assert reached.count(4) == 1
    assert [s for a, s, _ in seen if a == "a2"] == [0, 1, 2, 3]


def test_a_prune_decided_on_the_last_report_stops_the_body_at_that_report() -> None:
    env = flowsdk.TaskEnvironment("last")
    after: list[str] = []

    @env.task
    async def train() -> str:
        await flowsdk.report(1.0, step=0)
        await flowsdk.report(9.0, step=1)  # the last report: pruned here
        after.append("returned")
        return "done"

    @env.task
    async def main() -> str:
        def on_report(report: flowsdk.Report) -> None:
            if report.step == 1:
                task.cancel("worse than the median")  # the task awaiting the call

        task = asyncio.create_task(flowsdk.follow(train(), on_report))
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "finished"

    run = flowsdk.run(main, store=MemoryStore())
    assert run.result() == "cancelled"
    assert after == []
    child = run.actions[1]
    assert child.phase is ActionPhase.ABORTED
    assert child.abort is not None
    assert child.abort.reason == "worse than the median"


def test_reports_of_grandchildren_are_not_passed_to_the_grandparent() -> None:
    env = flowsdk.TaskEnvironment("nested")
    seen: list[str] = []

    @env.task
    async def leaf() -> None:
        await flowsdk.report(1.0)

    @env.task
    async def middle() -> None:
        await leaf()
        await flowsdk.report(2.0)

    @env.task
    async def main() -> None:
        await flowsdk.follow(middle(), lambda r: seen.append(f"{r.action}={r.value}"))

    flowsdk.run(main, store=MemoryStore())
    assert seen == ["a1=2.0"]


def test_report_rejects_bad_input_and_runs_only_in_a_run() -> None:
    with pytest.raises(NotInRunError, match="outside a run"):
        asyncio.run(flowsdk.report(1.0))
    env = flowsdk.TaskEnvironment("bad")
    errors: list[str] = []

    @env.task
    async def main() -> None:
        for kwargs in (
            {"value": "x"},
            {"value": True},
            {"value": 1, "step": -1},
            {"value": 1, "name": ""},
            {"value": 1, "step": 2**63},  # past what a store keeps: it failed the run's writer
            {"value": 10**400},  # no float holds it
        ):
            try:
                await flowsdk.report(**kwargs)
            except (TypeError, ValueError) as exc:
                errors.append(type(exc).__name__)

    flowsdk.run(main, store=MemoryStore())
    assert errors == ["TypeError", "TypeError", "ValueError", "ValueError"] + ["ValueError"] * 2


def test_the_largest_step_is_kept_by_the_sqlite_store(tmp_path: Path) -> None:
    """A step of 2**63 - 1 is recorded and read back whole."""
    env = flowsdk.TaskEnvironment("bigstep")

    @env.task
    async def main() -> None:
        await flowsdk.report(0.5, step=2**63 - 1)

    store = f"sqlite:///{tmp_path / 'store.db'}"
    run = flowsdk.run(main, store=store)
    assert run.phase is flowsdk.RunPhase.SUCCEEDED
    with flowsdk.Client(store) as client:
        assert [p.step for p in client.progress(run.name)] == [2**63 - 1]
    with pytest.raises(TypeError, match="call of a task"):
        _ = flowsdk.follow(42, print)  # type: ignore[arg-type]


def test_report_takes_ints_and_subclasses_of_int_and_float_as_floats() -> None:
    env = flowsdk.TaskEnvironment("reals")

    class Ratio(float):
        pass

    class Level(enum.IntEnum):
        HIGH = 7

    @env.task
    async def child() -> None:
        for value in (3, Ratio(0.5), Level.HIGH, 2.5):
            await flowsdk.report(value)

    seen: list[tuple[type, float]] = []

    @env.task
    async def main() -> None:
        await flowsdk.follow(child(), lambda r: seen.append((type(r.value), r.value)))

    flowsdk.run(main, store=MemoryStore())
    assert seen == [(float, 3.0), (float, 0.5), (float, 7.0), (float, 2.5)]


def test_logs_are_captured_per_action_at_the_log_level_and_each_is_bounded() -> None:
    env = flowsdk.TaskEnvironment("logged")

    @env.task
    async def quiet() -> None:
        log.debug("not kept: below INFO")
        log.info("kept \x1b[2J")
        log.warning("x" * 20_000)

    @env.task(log_level="DEBUG")
    async def chatty() -> None:
        log.setLevel(logging.DEBUG)
        try:
            log.debug("kept at DEBUG")
        finally:
            log.setLevel(logging.NOTSET)

    @env.task
    async def main() -> None:
        log.info("the root's own")
        await quiet()
        await chatty()

    store = MemoryStore()
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    run = flowsdk.run(main, store=store)
    assert (root.level, list(root.handlers)) == before  # the handler is gone with the run
    records = store.load_logs(run.name, 1)
    assert [(e.action, e.level) for e in records] == [
        ("a0", "INFO"),
        ("a1", "INFO"),
        ("a1", "WARNING"),
        ("a2", "DEBUG"),
    ]
    assert records[1].message == "kept \x1b[2J"
    assert len(records[2].message.encode()) <= 8 * 1024
    assert records[2].message.endswith("[truncated]")
    log.info("outside any run: not kept")
    with pytest.raises(ValueError, match="log_level"):
        flowsdk.TaskEnvironment("wrong", log_level="LOUD")


def test_show_and_logs_print_progress_and_logs_with_escapes_made_visible(tmp_path: Path) -> None:
    env = flowsdk.TaskEnvironment("shown")

    @env.task
    async def work() -> None:
        log.info("evil \x1b]0;title\x07 text")
        await flowsdk.report(0.5, step=3, name="loss")
        await flowsdk.report(1 / 3, step=12, name="loss")

    @env.task
    async def main() -> None:
        await work()

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    flowsdk.run(main, name="shown", store=url)

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "flowsdk", *args, "--store", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        return done.stdout

    tree = cli("show", "shown")
    assert "loss 0.3333 @12" in tree
    detail = cli("show", "shown", "a1")
    assert "\x1b" not in detail
    assert "\x07" not in detail
    assert "evil \\x1b]0;title\\x07 text" in detail
    assert "step      3  0.5" in detail
    steps = [line for line in detail.splitlines() if line.startswith("    step ")]
    assert len(steps) == 2
    assert len({line.index("20") for line in steps}) == 1, steps  # the times line up
    printed = cli("logs", "shown")
    assert "a1 INFO tests.progress: evil \\x1b]0;title\\x07 text" in printed
    assert "\x1b" not in printed
    data = json.loads(cli("show", "shown", "a1", "--json"))
    assert [(p["name"], p["step"]) for p in data["progress"]] == [("loss", 3), ("loss", 12)]
    assert data["logs"][0]["message"] == "evil \x1b]0;title\x07 text"
    followed = cli("logs", "shown", "a1", "--follow", "--json")
    assert json.loads(followed.splitlines()[0])["action"] == "a1"


def _study_counts(run: flowsdk.Run[Any], study: optuna.Study) -> None:
    trials = [a for a in run.actions if a.task.endswith(".objective")]
    phases = [a.phase for a in trials]
    states = [t.state for t in study.trials]
    TS = optuna.trial.TrialState
    assert states.count(TS.COMPLETE) == phases.count(ActionPhase.SUCCEEDED)
    assert states.count(TS.PRUNED) == phases.count(ActionPhase.ABORTED)
    assert states.count(TS.FAIL) == phases.count(ActionPhase.FAILED)


def test_an_optuna_study_prunes_in_the_parent_and_its_states_match_the_records() -> None:
    env = flowsdk.TaskEnvironment("study")
    studies: list[optuna.Study] = []

    @env.task
    async def objective(x: float) -> float:
        if x > 0.9:
            raise ValueError("diverged")
        for step in range(6):
            await flowsdk.report((x - 0.2) ** 2 + 1 / (step + 1), step=step)
        return (x - 0.2) ** 2

    def space(trial: optuna.Trial) -> dict[str, Any]:
        return {"x": trial.suggest_float("x", 0.0, 1.0)}

    @env.task
    async def main() -> int:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            sampler=optuna.samplers.RandomSampler(seed=3),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3),
        )
        studies.append(study)
        await optimize(study, objective, space, n_trials=20, concurrency=4)
        return len(study.trials)

    run = flowsdk.run(main, store=MemoryStore())
    assert run.result() == 20
    study = studies[0]
    _study_counts(run, study)
    pruned = [a for a in run.actions if a.phase is ActionPhase.ABORTED]
    assert pruned, "the median pruner pruned nothing"
    for action in pruned:
        assert action.abort is not None
        assert action.abort.cause is AbortCause.CANCELLED
        assert (action.abort.reason or "").startswith("pruned by MedianPruner at step ")
        assert "median" in (action.abort.reason or "")
    with pytest.raises(ValueError, match="n_trials"):
        asyncio.run(optimize(study, objective, space, n_trials=0))


def test_a_grid_search_stops_when_its_grid_is_spent_as_in_optunas_own_optimize() -> None:
    """`GridSampler` calls `study.stop()` on its last point: no more trials, no error.

    Outside Optuna's own `optimize` that call raises RuntimeError; `optimize`
    here runs the study as that loop does. One trial at a time, so the grid of
    three is spent after three trials, as `study.optimize(n_trials=10)` does.
    """
    env = flowsdk.TaskEnvironment("grid")
    studies: list[optuna.Study] = []

    @env.task
    async def objective(x: float) -> float:
        await flowsdk.report(x, step=0)
        return x

    @env.task
    async def main() -> list[float]:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.GridSampler({"x": [0.1, 0.2, 0.3]}))
        studies.append(study)
        space = lambda t: {"x": t.suggest_float("x", 0.0, 1.0)}  # noqa: E731
        await optimize(study, objective, space, n_trials=10, concurrency=1)
        return sorted(t.params["x"] for t in study.trials)

    run = flowsdk.run(main, store=MemoryStore())
    assert run.phase is RunPhase.SUCCEEDED, run.result
    assert run.result() == [0.1, 0.2, 0.3]
    assert {t.state for t in studies[0].trials} == {optuna.trial.TrialState.COMPLETE}
    assert len([a for a in run.actions if a.task == "grid.objective"]) == 3
    # Outside, Optuna's own rule holds again.
    with pytest.raises(RuntimeError, match="inside an objective function"):
        studies[0].stop()


def test_an_error_telling_the_study_ends_the_search_with_that_error() -> None:
    """A sampler (or storage) that fails when told a trial's end: `optimize` raises it.

    It used to be left in a task nobody read ("Task exception was never
    retrieved"), and the search went on.
    """

    class Failing(optuna.samplers.RandomSampler):
        def after_trial(self, *args: Any) -> None:
            raise OSError("the study's storage went away")

    env = flowsdk.TaskEnvironment("tellfail")

    @env.task
    async def objective(x: float) -> float:
        return x

    @env.task
    async def main() -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=Failing(seed=0))
        space = lambda t: {"x": t.suggest_float("x", 0.0, 1.0)}  # noqa: E731
        await optimize(study, objective, space, n_trials=5, concurrency=1)

    run = flowsdk.run(main, store=MemoryStore())
    assert run.phase is RunPhase.FAILED
    error = run.action("a0").error
    assert error is not None
    assert (error.type, error.message) == ("OSError", "the study's storage went away")
    assert len([a for a in run.actions if a.task == "tellfail.objective"]) == 1


def test_a_retried_study_replays_pruned_and_completed_trials_with_their_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pruned trial is finished: a retry tells the study the same outcome, reports included."""
    from tests.workflows import hpo_study

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.setenv("HPO_DIR", str(tmp_path))
    monkeypatch.setenv("HPO_FAIL", "1")
    first = flowsdk.run(hpo_study.pruned_search, name="pruned", store=url)
    assert first.phase is RunPhase.FAILED
    before = json.loads((tmp_path / "study.json").read_text())
    assert "PRUNED" in before["states"], before["states"]
    assert "COMPLETE" in before["states"], before["states"]
    started = (tmp_path / "started").read_text()
    assert len(started.split()) == 10
    monkeypatch.delenv("HPO_FAIL")
    with flowsdk.Client(url) as client:
        again = client.retry("pruned")
    assert again.phase is RunPhase.SUCCEEDED
    # No trial ran again: the completed and the pruned ones were replayed.
    assert (tmp_path / "started").read_text() == started
    # The study of the retry saw the same trials: states, parameters, values and reports.
    assert again.result() == before
    trials = [a for a in again.actions if a.task == "optuna.trial"]
    assert len(trials) == 10
    assert all(a.replayed for a in trials)


def test_a_killed_study_retried_replays_finished_trials_with_the_same_parameters(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    env = {**os.environ, "HPO_DIR": str(tmp_path), "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
    runner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowsdk",
            "run",
            "tests.workflows.hpo_study:search",
            "--name",
            "study",
            "--store",
            url,
            "--quiet",
        ],
        cwd=REPO,
        env={**env, "HPO_BLOCK": "1", "HPO_STORE": url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "blocked").exists():  # a file gate between processes
            assert runner.poll() is None, "the runner ended before it blocked"
            assert time.monotonic() < deadline, "the study never reached its gate"
            time.sleep(0.05)  # polling the file gate above, bounded by the deadline
        runner.send_signal(signal.SIGKILL)
    finally:
        runner.kill()
        runner.wait(timeout=30)
    finished = len((tmp_path / "done").read_text().split())
    retried = subprocess.run(
        [sys.executable, "-m", "flowsdk", "retry", "study", "--store", url, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert retried.returncode == 0, retried.stderr
    assert "NondeterminismError" not in retried.stderr
    with flowsdk.Client(url) as client:
        run = client.get_run("study")
        first = client.get_run("study", attempt=1)
        # Without an attempt, progress and logs are the latest attempt's.
        reports = client.progress("study")
        assert reports == client.progress("study", 2) != client.progress("study", 1)
        assert client.latest_progress("study") == client.latest_progress("study", 2)
        assert client.logs("study") == client.logs("study", 2)
    assert reports
    assert run.record.attempt == 2
    assert run.phase is RunPhase.SUCCEEDED
    counts = run.result()
    assert counts["trials"] == 12
    # Every trial the first attempt recorded finished (its `optuna.trial` SUCCEEDED,
    # whether completed or pruned) is replayed, and only those; its objective does
    # not run. An objective that returned while its trial's end was not written yet
    # (just before the kill) is replayed under its trial, which runs again.
    wrappers = "optuna.trial"
    replayed = {a.key for a in run.actions if a.replayed and a.task == wrappers}
    recorded = {
        a.key for a in first.actions if a.task == wrappers and a.phase is ActionPhase.SUCCEEDED
    }
    assert replayed == recorded
    succeeded = [
        a for a in first.actions if a.task == "hpo_study.trial" and a.phase is ActionPhase.SUCCEEDED
    ]
    assert 1 <= len(succeeded) <= finished
    again_by_key = {a.key: a for a in run.actions}
    for objective in succeeded:
        parent = objective.key.rsplit("/", 1)[0]
        assert parent in replayed or again_by_key[objective.key].replayed, objective.key
    # The same parameters as the first attempt, trial by trial.
    before = {a.key: a for a in first.actions if a.task in (wrappers, "hpo_study.trial")}
    inputs = first.payloads()
    again = run.payloads()
    for action in run.actions:
        old = before.get(action.key)
        if old is not None:
            assert again[action.name][0] == inputs[old.name][0]


def test_an_observer_that_raises_gives_its_error_to_the_parent_and_never_retries_the_child() -> (
    None
):
    """The observer is the parent's code: its error is raised where the parent awaits the call.

    The child is cancelled at that report (recorded with the error as the reason),
    not failed, so its `retries` do not run its body again.
    """
    env = flowsdk.TaskEnvironment("badobserver")
    bodies: list[int] = []
    after: list[int] = []

    @env.task(retries=2)
    async def train() -> float:
        bodies.append(1)
        for step in range(3):
            await flowsdk.report(float(step), step=step)
            after.append(step)
        return 1.0

    def buggy(report: flowsdk.Report) -> None:
        if report.step == 1:
            raise ZeroDivisionError("division by zero")

    @env.task
    async def main() -> str:
        try:
            await flowsdk.follow(train(), buggy)
        except ZeroDivisionError as exc:
            return f"parent got {exc}"
        return "no error"

    run = flowsdk.run(main, store=MemoryStore())
    assert run.result() == "parent got division by zero"
    assert bodies == [1]
    assert after == [0]
    child = run.action("a1")
    assert child.phase is ActionPhase.ABORTED
    assert child.abort is not None
    assert child.abort.reason == "its observer raised ZeroDivisionError: division by zero"


def test_an_observer_cancelling_the_parent_itself_stops_the_child_at_its_report() -> None:
    env = flowsdk.TaskEnvironment("direct")
    after: list[int] = []

    @env.task
    async def train() -> None:
        for step in range(3):
            await flowsdk.report(float(step), step=step)
            after.append(step)

    @env.task
    async def main() -> str:
        me = asyncio.current_task()
        assert me is not None

        def on_report(report: flowsdk.Report) -> None:
            if report.step == 1:
                me.cancel("enough")  # the parent awaits the call directly

        try:
            await flowsdk.follow(train(), on_report)
        except asyncio.CancelledError:
            return "stopped"
        return "finished"

    run = flowsdk.run(main, store=MemoryStore())
    assert run.result() == "stopped"
    assert after == [0]
    assert run.actions[1].phase is ActionPhase.ABORTED
