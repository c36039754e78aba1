"""Progress from a plain `def` body: `flowsdk.report_sync` (it runs in a worker thread).

A `def` body cannot `await flowsdk.report(...)`: `report_sync` records the
report and returns once the observers have seen it, as `report` does, and is
the body's point of cancellation: a cancel decided on that report (HPO pruning),
or one that came while the thread computed, raises `CancelledError` there, so
the thread stops and runs its cleanup. A cancel decided at the report is
waited for as an async body's is: the action ends once the thread's cleanup
has run, not `cleanup_incomplete`.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from flowsdk import AbortCause, ActionPhase, RunPhase
from flowsdk.errors import NotInRunError
from flowsdk.store import MemoryStore
from flowsdk.testing import sqlite_url
from tests.support import assert_clean

WAIT = 30.0  # seconds: a deadline for a thread's event, never a pace


@pytest.mark.timeout(60)
def test_a_def_body_reports_and_is_pruned_at_a_report_as_an_async_body_is(
    tmp_path: Path,
) -> None:
    env = flowsdk.TaskEnvironment("sync-prune")
    reached: list[tuple[float, int]] = []
    cleaned: list[float] = []

    @env.task
    def train(rate: float) -> float:
        try:
            for step in range(5):
                flowsdk.report_sync(rate * step, step=step, name="loss")
                reached.append((rate, step))  # never after the report the observer pruned
            return rate
        finally:
            cleaned.append(rate)

    @env.task
    async def main() -> list[Any]:
        def on_report(report: flowsdk.Report) -> None:
            if report.value >= 0.5:
                report.cancel(f"pruned at step {report.step}")

        results = await asyncio.gather(
            flowsdk.follow(train(0.1), on_report),
            flowsdk.follow(train(0.2), on_report),
            return_exceptions=True,
        )
        # The pruned body's cleanup has run by the time its awaiter has the outcome.
        return [type(r).__name__ for r in results] + [sorted(cleaned)]

    url = sqlite_url(tmp_path / "s.db")
    run = flowsdk.run(main, store=url)
    assert run.phase is RunPhase.SUCCEEDED
    assert run.result() == ["float", "CancelledError", [0.1, 0.2]]
    a1, a2 = run.action("a1"), run.action("a2")
    assert (a1.phase, a2.phase) == (ActionPhase.SUCCEEDED, ActionPhase.ABORTED)
    assert a2.abort is not None
    assert (a2.abort.cause, a2.abort.reason) == (AbortCause.CANCELLED, "pruned at step 3")
    assert not a2.cleanup_incomplete
    assert [s for r, s in reached if r == 0.2] == [0, 1, 2]
    assert [s for r, s in reached if r == 0.1] == [0, 1, 2, 3, 4]
    with flowsdk.Client(url) as client:
        reports = client.progress(run.name, 1, "a2")
    assert [(p.name, p.step) for p in reports] == [("loss", step) for step in range(4)]
    assert [p.value for p in reports] == pytest.approx([0.2 * step for step in range(4)])
    assert_clean(run)


@pytest.mark.timeout(60)
def test_a_cancel_that_comes_while_a_def_body_computes_stops_it_at_its_next_report() -> None:
    """The action ends at once (the thread cannot be interrupted); the thread stops at a report."""
    env = flowsdk.TaskEnvironment("sync-later")
    computing, resume, stopped = threading.Event(), threading.Event(), threading.Event()
    seen: list[str] = []

    @env.task
    def work() -> int:
        step = 0
        try:
            while True:
                flowsdk.report_sync(step, step=step)
                step += 1
                if step == 2:
                    computing.set()
                    assert resume.wait(WAIT)  # computing while the cancel comes
        except asyncio.CancelledError as exc:
            seen.append(f"{step}: {exc}")
            raise
        finally:
            stopped.set()

    @env.task
    async def main() -> bool:
        t = asyncio.create_task(work())
        assert await asyncio.to_thread(computing.wait, WAIT)
        t.cancel("enough")
        with_cancel = await asyncio.gather(t, return_exceptions=True)
        resume.set()
        assert await asyncio.to_thread(stopped.wait, WAIT)
        return isinstance(with_cancel[0], asyncio.CancelledError)

    run = flowsdk.run(main, store=MemoryStore())
    assert run.result() is True
    child = run.action("a1")
    assert child.phase is ActionPhase.ABORTED
    assert child.cleanup_incomplete  # it ended while the thread still computed
    assert len(seen) == 1
    assert seen[0].startswith("2: ")
    assert "enough" in seen[0]  # the cancel's message, as an async body gets it


@pytest.mark.timeout(60)
def test_report_sync_from_a_thread_of_an_async_body_reports_for_that_body() -> None:
    env = flowsdk.TaskEnvironment("sync-to-thread")
    seen: list[tuple[str, float]] = []

    def blocking(n: int) -> int:
        for i in range(n):
            flowsdk.report_sync(i)
        return n

    @env.task
    async def child() -> int:
        return await asyncio.to_thread(blocking, 3)

    @env.task
    async def main() -> int:
        return await flowsdk.follow(child(), lambda r: seen.append((r.action, r.value)))

    run = flowsdk.run(main, store=MemoryStore())
    assert run.result() == 3
    assert seen == [("a1", 0.0), ("a1", 1.0), ("a1", 2.0)]


@pytest.mark.timeout(60)
def test_report_sync_refuses_the_event_loop_bad_values_and_outside_a_run() -> None:
    with pytest.raises(NotInRunError, match="outside a run"):
        flowsdk.report_sync(1.0)
    env = flowsdk.TaskEnvironment("sync-bad")
    errors: list[str] = []

    @env.task
    def body() -> None:
        for kwargs in ({"value": "x"}, {"value": 1, "step": -1}, {"value": 1, "name": ""}):
            try:
                flowsdk.report_sync(**kwargs)
            except (TypeError, ValueError) as exc:
                errors.append(type(exc).__name__)

    @env.task
    async def main() -> str:
        await body()
        try:
            flowsdk.report_sync(1.0)  # on the run's loop: it would wait for itself
        except RuntimeError as exc:
            return str(exc)
        return "reported"

    run = flowsdk.run(main, store=MemoryStore())
    assert errors == ["TypeError", "ValueError", "ValueError"]
    assert "await flowsdk.report(" in run.result()
    assert run.actions[1].phase is ActionPhase.SUCCEEDED


@pytest.mark.timeout(60)
def test_an_optuna_study_prunes_a_def_objective_at_its_report() -> None:
    """A sync objective (a blocking training loop) in `optimize`: pruned where it reports."""
    optuna = pytest.importorskip("optuna")
    from flowsdk.integrations.optuna import optimize

    env = flowsdk.TaskEnvironment("sync-optuna")
    stopped_at: dict[float, int] = {}

    @env.task
    def train(x: float) -> float:
        step = 0
        try:
            for step in range(5):  # `step` is read in the finally
                flowsdk.report_sync(x * step, step=step)
            return x
        finally:
            stopped_at[x] = step

    @env.task
    async def search() -> list[str]:
        study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.5))
        study.enqueue_trial({"x": 0.05})
        study.enqueue_trial({"x": 0.3})
        await optimize(study, train, lambda t: {"x": t.suggest_float("x", 0, 1)}, n_trials=2)
        return sorted(f"{t.params['x']} {t.state.name}" for t in study.trials)

    run = flowsdk.run(search, store=MemoryStore())
    assert run.result() == ["0.05 COMPLETE", "0.3 PRUNED"]
    assert stopped_at == {0.05: 4, 0.3: 2}  # 0.3 * 2 = 0.6: pruned at that report
    [pruned] = [a for a in run.actions if a.task == "sync-optuna.train" and a.abort is not None]
    assert pruned.phase is ActionPhase.ABORTED
    assert not pruned.cleanup_incomplete
