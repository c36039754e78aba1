"""SPEC §9: task bodies on Ray, every lifetime rule holding across the boundary.

All of these run against one real local Ray cluster for the session
(`tests/ray_support.py`). A remote body's `finally` writes a marker file
holding its worker's pid, so each test sees that the cleanup ran on the
worker, not in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from flowsdk import AbortCause, ActionPhase, EventKind
from flowsdk.errors import (
    ActionAbortedError,
    ActionMarkedFailedError,
    InvalidStateError,
    RuntimeUserError,
    TaskTimeoutError,
)
from tests.ray_support import wait_for_file, wait_for_file_sync
from tests.support import assert_clean, by_task

pytest.importorskip("ray")
# One worker runs every Ray test (`make test` distributes with `--dist loadgroup`): one cluster.
pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.xdist_group("ray")]

env = flowsdk.TaskEnvironment("onray", executor="ray", grace_period=5.0)
_drivers = itertools.count(1)


def driver() -> flowsdk.TaskEnvironment:
    """A fresh driver-side environment (each test's root is called `main`)."""
    return flowsdk.TaskEnvironment(f"driver{next(_drivers)}")


def mark(path: str, text: str) -> None:
    Path(path).write_text(text)


@env.task
async def square(x: int) -> int:
    return x * x


class BodyError(Exception):
    pass


@env.task
async def fails(text: str) -> int:
    raise BodyError(text)


@env.task
async def sleeper(folder: str) -> str:
    """Say it started, sleep; on cancellation write why and where into `done`."""
    mark(f"{folder}/started", str(os.getpid()))
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError as exc:
        abort = flowsdk.current_action().abort
        mark(f"{folder}/why", f"{exc}|{abort.cause.value if abort else None}")
        raise
    finally:
        mark(f"{folder}/done", str(os.getpid()))
    return "slept"


@env.task
def plain_square(x: int) -> int:
    """A plain `def` body: on its worker it runs in a thread, as locally."""
    return x * x


@env.task
def plain_fails(text: str) -> int:
    raise BodyError(text)


@env.task
def plain_introspect(tag: str) -> dict[str, Any]:
    info = flowsdk.current_action()
    logging.getLogger("user.remote").info("plain %s", tag)
    return {"name": info.name, "task": info.task, "attempt": info.attempt, "pid": os.getpid()}


@env.task
def plain_spins(folder: str) -> None:
    """Say it started, then work in a loop that no cancel can interrupt (a thread)."""
    mark(f"{folder}/started", str(os.getpid()))
    while True:
        time.sleep(0.01)  # the body's uninterruptible work


def assert_cleaned_on_worker(folder: Path) -> None:
    pid = wait_for_file_sync(folder / "done")
    assert int(pid) != os.getpid()
    assert pid == (folder / "started").read_text()


def running_event(run: flowsdk.Run[Any], action: str) -> str:
    messages = [
        e.message or ""
        for e in run.events
        if e.kind is EventKind.ACTION and e.action == action and e.phase == "RUNNING"
    ]
    return next(m for m in messages if m.startswith("running on Ray"))


def test_value_and_error_round_trip() -> None:
    causes: list[BaseException | None] = []

    @driver().task
    async def main() -> int:
        value = await square(7)
        try:
            await fails("bad input 42")
        except RuntimeUserError as exc:
            causes.append(exc.__cause__)
        return value

    run = flowsdk.run(main)
    assert run.result() == 49
    assert [a.executor for a in run.actions] == ["local", "ray", "ray"]
    [cause] = causes
    assert type(cause) is BodyError
    assert str(cause) == "bad input 42"
    failed = by_task(run, "fails")[0]
    assert failed.phase is ActionPhase.FAILED
    assert failed.error is not None
    assert failed.error.type.endswith("BodyError")
    assert "Raised on a Ray worker" in failed.error.traceback
    assert "in fails" in failed.error.traceback
    message = running_event(run, by_task(run, "square")[0].name)
    assert "actor " in message
    assert "task " in message
    assert_clean(run)


def test_a_plain_def_body_runs_on_ray_and_returns_its_value() -> None:
    @driver().task
    async def main() -> list[int]:
        return list(await asyncio.gather(plain_square(7), square(7), plain_square(8)))

    run = flowsdk.run(main)
    assert run.result() == [49, 49, 64]
    assert [a.executor for a in run.actions] == ["local", "ray", "ray", "ray"]
    assert_clean(run)


def test_a_plain_def_body_raising_on_ray_gives_its_error_to_the_parent() -> None:
    causes: list[BaseException | None] = []

    @driver().task
    async def main() -> None:
        try:
            await plain_fails("bad input 43")
        except RuntimeUserError as exc:
            causes.append(exc.__cause__)

    run = flowsdk.run(main)
    [cause] = causes
    assert type(cause) is BodyError
    assert str(cause) == "bad input 43"
    failed = by_task(run, "plain_fails")[0]
    assert failed.phase is ActionPhase.FAILED
    assert failed.error is not None
    assert failed.error.type.endswith("BodyError")
    assert "Raised on a Ray worker" in failed.error.traceback
    assert "in plain_fails" in failed.error.traceback


@contextlib.contextmanager
def handling(name: str, handler: logging.Handler) -> Iterator[None]:
    """Give logger `name` the handler while the block runs (remote records come back to it)."""
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def test_current_action_and_logging_work_in_a_plain_def_body_on_ray() -> None:
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    @driver().task
    async def main() -> dict[str, Any]:
        return await plain_introspect("hello")

    with handling("user.remote", Collect()):
        run = flowsdk.run(main)
    info = run.result()
    assert info == {"name": "a1", "task": "onray.plain_introspect", "attempt": 1,
                    "pid": info["pid"]}  # fmt: skip
    assert info["pid"] != os.getpid()
    assert seen == ["plain hello"]


def test_an_abort_ends_a_plain_def_body_on_ray_at_once_and_its_actor_after_the_grace(
    tmp_path: Path,
) -> None:
    """As locally, a cancelled `def` body ends at once; its function runs on for the grace."""

    @driver().task
    async def main(folder: str) -> str:
        try:
            await plain_spins(folder)
        except ActionAbortedError as exc:
            return f"aborted: {exc.reason}"
        return "finished"

    async def scenario() -> tuple[flowsdk.Run[Any], bool]:
        handle = await flowsdk.start(main, str(tmp_path))
        await wait_for_file(tmp_path / "started")
        await handle.abort("a1", reason="enough spinning")
        run = await handle.wait()
        # Ended well before its grace period (5 s): the worker still runs the function.
        return run, pid_alive(int((tmp_path / "started").read_text()))

    run, alive_at_end = asyncio.run(scenario())
    assert run.result() == "aborted: enough spinning"
    child = by_task(run, "plain_spins")[0]
    assert child.phase is ActionPhase.ABORTED
    assert child.abort is not None
    assert (child.abort.cause, child.abort.reason) == (AbortCause.EXTERNAL, "enough spinning")
    assert child.cleanup_incomplete is True
    assert child.ended_at is not None
    assert child.abort.requested_at is not None
    assert (child.ended_at - child.abort.requested_at).total_seconds() < env.options.grace_period
    assert alive_at_end
    # Then the actor exits with its thread: nothing runs on past the grace period.
    assert wait_until_gone(int((tmp_path / "started").read_text()))
    assert_clean(run)


def test_a_body_wrapped_by_flowsdk_is_not_blamed_on_the_user() -> None:
    """An unpicklable object of flowsdk's own is named as flowsdk's, not the function's."""
    from types import SimpleNamespace

    from flowsdk._execute_thread import in_thread
    from flowsdk.errors import SerializationError
    from flowsdk.executors._ray_body import body_bytes

    def double(x: int) -> int:
        return 2 * x

    wrapped: Any = SimpleNamespace(name="onray.double", fn=in_thread(double))
    with pytest.raises(SerializationError) as info:
        body_bytes(wrapped)
    message = str(info.value)
    assert "flowsdk's own flowsdk._execute_thread.in_thread.<locals>.body" in message
    assert "the global 'current' (a _contextvars.ContextVar)" in message
    assert "not a problem with your function" in message


def test_current_action_and_logging_reach_the_driver() -> None:
    seen: list[tuple[str, str, str | None]] = []

    class PerAction(logging.Handler):
        """A handler keyed on the action's context, as per-action log capture is."""

        def emit(self, record: logging.LogRecord) -> None:
            from flowsdk._action import current

            action = current.get()
            seen.append((record.getMessage(), record.levelname, action.name if action else None))

    @env.task
    async def introspect(tag: str) -> dict[str, Any]:
        info = flowsdk.current_action()
        logging.getLogger("user.remote").info("hello %s from pid %d", tag, os.getpid())
        try:
            raise ValueError("logged")
        except ValueError:
            logging.getLogger("user.remote").exception("with traceback")
        return {"run": info.run, "name": info.name, "task": info.task, "attempt": info.attempt,
                "group": info.group, "pid": os.getpid()}  # fmt: skip

    @driver().task
    async def main() -> dict[str, Any]:
        with flowsdk.group("stage"):
            return await introspect("x")

    with handling("user.remote", PerAction()):
        run = flowsdk.run(main)
    info = run.result()
    assert info["pid"] != os.getpid()
    assert info == {"run": run.name, "name": "a1", "task": "onray.introspect", "attempt": 1,
                    "group": "stage", "pid": info["pid"]}  # fmt: skip
    assert seen[0] == (f"hello x from pid {info['pid']}", "INFO", "a1")
    assert seen[1][1:] == ("ERROR", "a1")


def test_a_debug_log_level_captures_debug_records_on_ray() -> None:
    """`log_level="DEBUG"` keeps a body's debug records on a Ray worker, as locally."""
    seen: list[tuple[str, str]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), record.levelname))

    @env.task(log_level="DEBUG")
    async def chatty(tag: str) -> None:
        logging.getLogger("user.remote").debug("deep %s", tag)
        logging.getLogger("user.remote").info("plain %s", tag)

    @driver().task
    async def main() -> None:
        await chatty("x")

    with handling("user.remote", Collect()):
        run = flowsdk.run(main)
    assert run.phase is flowsdk.RunPhase.SUCCEEDED
    assert seen == [("deep x", "DEBUG"), ("plain x", "INFO")]


def test_report_channel_delivers_to_the_driver_sink() -> None:
    from flowsdk.executors._ray_worker import report_from_worker
    from flowsdk.executors._remote import set_report_sink

    got: list[tuple[str, float, int | None, str]] = []

    async def sink(action: Any, value: float, step: int | None, name: str) -> None:
        got.append((action.name, value, step, name))

    @env.task
    async def reporter() -> int:
        for step in range(3):
            await report_from_worker(step / 2, step, "loss")
        return len(got)  # the driver's list, as pickled: empty on the worker

    @driver().task
    async def main() -> int:
        return await reporter()

    previous = set_report_sink(sink)
    try:
        run = flowsdk.run(main)
    finally:
        set_report_sink(previous)
    assert run.phase is flowsdk.RunPhase.SUCCEEDED
    assert got == [("a1", 0.0, 0, "loss"), ("a1", 0.5, 1, "loss"), ("a1", 1.0, 2, "loss")]


def test_report_without_a_sink_raises_in_the_body() -> None:
    from flowsdk.executors._ray_worker import report_from_worker
    from flowsdk.executors._remote import set_report_sink

    @env.task
    async def reporter_alone() -> None:
        await report_from_worker(1.0, None, "value")

    @driver().task
    async def main() -> None:
        await reporter_alone()

    previous = set_report_sink(None)
    try:
        run = flowsdk.run(main)
    finally:
        set_report_sink(previous)
    with pytest.raises(RuntimeUserError) as info:
        run.result()
    assert isinstance(info.value.__cause__, InvalidStateError)
    assert "no report sink" in str(info.value.__cause__)


def test_a_remote_body_reports_and_is_pruned_at_its_report(tmp_path: Path) -> None:
    """`flowsdk.report` on Ray: recorded by the driver, seen by `follow`, pruned right there."""
    marker = tmp_path / "finally"

    @env.task
    async def trial(path: str) -> int:
        try:
            for step in range(10):
                await flowsdk.report(1.0 / (step + 1), step=step, name="loss")
            return 10
        finally:
            mark(path, f"pid {os.getpid()} at {flowsdk.current_action().abort}")

    seen: list[tuple[int | None, float]] = []

    def prune(report: flowsdk.Report) -> None:
        seen.append((report.step, report.value))
        if report.step == 3:
            report.cancel("pruned at step 3")

    @driver().task
    async def main(path: str) -> str:
        try:
            await flowsdk.follow(trial(path), prune)
        except asyncio.CancelledError:
            return "pruned"
        return "finished"

    run = flowsdk.run(main, str(marker), store=f"sqlite:///{tmp_path / 's.db'}")
    assert run.result() == "pruned"
    assert seen == [(0, 1.0), (1, 0.5), (2, 1.0 / 3), (3, 0.25)]  # nothing after the prune
    [child] = by_task(run, "onray.trial")
    assert child.phase is ActionPhase.ABORTED
    assert child.abort is not None
    assert child.abort.cause is AbortCause.CANCELLED
    assert child.abort.reason == "pruned at step 3"
    text = marker.read_text()
    assert text.startswith("pid ")
    assert f"pid {os.getpid()} " not in text  # the cleanup ran on the worker
    with flowsdk.Client(f"sqlite:///{tmp_path / 's.db'}") as client:
        progress = client.progress(run.name, run.attempt)
    assert [(p.action, p.step) for p in progress] == [(child.name, s) for s in range(4)]
    shown = subprocess.run(
        [sys.executable, "-m", "flowsdk", "show", run.name, child.name, "--store",
         f"sqlite:///{tmp_path / 's.db'}"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "task      onray.trial   on ray" in shown.stdout


def test_a_plain_def_body_on_ray_reports_and_is_pruned_at_its_report(tmp_path: Path) -> None:
    """`flowsdk.report_sync` in a `def` body on Ray: as locally, the prune lands at the report."""
    marker = tmp_path / "finally"

    @env.task
    def trial_sync(path: str) -> int:
        try:
            for step in range(10):
                flowsdk.report_sync(1.0 / (step + 1), step=step, name="loss")
            return 10
        finally:
            mark(path, f"pid {os.getpid()}")

    def prune(report: flowsdk.Report) -> None:
        if report.step == 3:
            report.cancel("pruned at step 3")

    @driver().task
    async def main(path: str) -> str:
        try:
            await flowsdk.follow(trial_sync(path), prune)
        except asyncio.CancelledError:
            return "pruned"
        return "finished"

    url = f"sqlite:///{tmp_path / 's.db'}"
    run = flowsdk.run(main, str(marker), store=url)
    assert run.result() == "pruned"
    [child] = by_task(run, "onray.trial_sync")
    assert child.phase is ActionPhase.ABORTED
    assert child.abort is not None
    assert child.abort.reason == "pruned at step 3"
    assert not child.cleanup_incomplete  # its thread stopped at the report and cleaned up
    text = marker.read_text()
    assert text.startswith("pid ")
    assert f"pid {os.getpid()}" != text  # the cleanup ran on the worker
    with flowsdk.Client(url) as client:
        progress = client.progress(run.name, run.attempt)
    assert [(p.action, p.step) for p in progress] == [(child.name, s) for s in range(4)]


def test_an_optuna_study_with_trials_on_ray_prunes_in_the_parent() -> None:
    """The Optuna integration with the objective's bodies on Ray: reports cross, prunes land."""
    optuna = pytest.importorskip("optuna")
    from flowsdk.integrations.optuna import optimize

    @env.task
    async def ray_objective(x: float) -> float:
        for step in range(4):
            await flowsdk.report((x - 0.2) ** 2 + 1 / (step + 1), step=step)
        return (x - 0.2) ** 2

    def space(trial: Any) -> dict[str, Any]:
        return {"x": trial.suggest_float("x", 0.0, 1.0)}

    studies: list[Any] = []

    @driver().task
    async def search() -> int:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            sampler=optuna.samplers.RandomSampler(seed=5),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        )
        studies.append(study)
        await optimize(study, ray_objective, space, n_trials=8, concurrency=2)
        return len(study.trials)

    run = flowsdk.run(search)
    assert run.result() == 8
    trials = by_task(run, "onray.ray_objective")
    states = [t.state for t in studies[0].trials]
    done = optuna.trial.TrialState
    assert states.count(done.COMPLETE) == sum(a.phase is ActionPhase.SUCCEEDED for a in trials)
    assert states.count(done.PRUNED) == sum(a.phase is ActionPhase.ABORTED for a in trials)
    for action in trials:
        if action.phase is ActionPhase.ABORTED:
            assert action.abort is not None
            assert (action.abort.reason or "").startswith("pruned by MedianPruner at step ")


def test_root_exit_cancels_the_remote_body(tmp_path: Path) -> None:
    @driver().task
    async def main(folder: str) -> str:
        asyncio.create_task(sleeper(folder))  # noqa: RUF006 (the root's exit ends it)
        await wait_for_file(Path(folder) / "started")
        return "root done"

    run = flowsdk.run(main, str(tmp_path))
    assert run.result() == "root done"
    child = by_task(run, "sleeper")[0]
    assert child.phase is ActionPhase.ABORTED
    assert child.abort is not None
    assert child.abort.cause is AbortCause.ROOT_EXIT
    assert_cleaned_on_worker(tmp_path)
    assert (tmp_path / "why").read_text().endswith("|root_exit")
    assert_clean(run)


def test_task_cancel_reaches_the_remote_body(tmp_path: Path) -> None:
    @driver().task
    async def main(folder: str) -> str:
        t = asyncio.create_task(sleeper(folder))
        await wait_for_file(Path(folder) / "started")
        t.cancel("early stop")
        try:
            await t
        except asyncio.CancelledError:
            return "cancelled"
        return "not cancelled"

    run = flowsdk.run(main, str(tmp_path))
    assert run.result() == "cancelled"
    child = by_task(run, "sleeper")[0]
    assert child.phase is ActionPhase.ABORTED
    assert child.abort is not None
    assert (child.abort.cause, child.abort.reason) == (AbortCause.CANCELLED, "early stop")
    assert_cleaned_on_worker(tmp_path)
    assert "early stop" in (tmp_path / "why").read_text()


def test_external_abort_from_the_cli(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    folder = tmp_path / "m"
    folder.mkdir()

    @driver().task
    async def main(folder: str) -> str:
        try:
            await sleeper(folder)
        except ActionAbortedError as exc:
            return f"aborted: {exc.reason}"
        return "finished"

    async def scenario() -> flowsdk.Run[Any]:
        handle = await flowsdk.start(main, str(folder), store=store)
        await wait_for_file(folder / "started")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flowsdk", "abort", handle.name, "a1",
            "--reason", "operator says", "--store", store,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, (out, err)
        return await handle.wait()

    run = asyncio.run(scenario())
    assert run.result() == "aborted: operator says"
    child = by_task(run, "sleeper")[0]
    assert child.phase is ActionPhase.ABORTED
    assert child.abort is not None
    assert child.abort.cause is AbortCause.EXTERNAL
    assert_cleaned_on_worker(folder)
    assert (folder / "why").read_text().endswith("|external")


def test_mark_failed_reaches_the_remote_body(tmp_path: Path) -> None:
    @driver().task
    async def main(folder: str) -> str:
        try:
            await sleeper(folder)
        except RuntimeUserError as exc:
            return type(exc.__cause__).__name__
        return "finished"

    async def scenario() -> flowsdk.Run[Any]:
        handle = await flowsdk.start(main, str(tmp_path))
        await wait_for_file(tmp_path / "started")
        await handle.mark_failed("a1", reason="bad trial")
        return await handle.wait()

    run = asyncio.run(scenario())
    assert run.result() == ActionMarkedFailedError.__name__
    child = by_task(run, "sleeper")[0]
    assert child.phase is ActionPhase.FAILED
    assert child.abort is not None
    assert child.abort.cause is AbortCause.MARK_FAILED
    assert_cleaned_on_worker(tmp_path)


def test_timeout_counts_on_the_worker(tmp_path: Path) -> None:
    timed = flowsdk.TaskEnvironment("onray_timed", executor="ray", timeout=0.5)

    @timed.task
    async def slow(folder: str) -> str:
        mark(f"{folder}/started", str(os.getpid()))
        try:
            await asyncio.sleep(60)
        finally:
            mark(f"{folder}/done", str(os.getpid()))
        return "slow"

    @driver().task
    async def main(folder: str) -> str:
        try:
            await slow(folder)
        except RuntimeUserError as exc:
            return type(exc).__name__
        return "finished"

    run = flowsdk.run(main, str(tmp_path))
    assert run.result() == TaskTimeoutError.__name__
    child = by_task(run, "slow")[0]
    assert child.phase is ActionPhase.FAILED
    assert child.abort is not None
    assert child.abort.cause is AbortCause.TIMEOUT
    assert_cleaned_on_worker(tmp_path)


def test_stop_and_abandon_reaches_the_remote_body(tmp_path: Path) -> None:
    @driver().task
    async def main(folder: str) -> str:
        return await sleeper(folder)

    async def scenario() -> flowsdk.Run[Any]:
        handle = await flowsdk.start(main, str(tmp_path))
        await wait_for_file(tmp_path / "started")
        await handle.stop(abandon=True, reason="enough")
        return await handle.wait()

    run = asyncio.run(scenario())
    assert run.phase is flowsdk.RunPhase.STOPPED
    child = by_task(run, "sleeper")[0]
    assert child.phase is ActionPhase.ABANDONED
    assert child.abort is not None
    assert child.abort.cause is AbortCause.STOP
    assert_cleaned_on_worker(tmp_path)


def test_stop_and_wait_lets_the_remote_body_finish(tmp_path: Path) -> None:
    @env.task
    async def gated(folder: str) -> str:
        mark(f"{folder}/started", str(os.getpid()))
        while not Path(folder, "go").exists():
            await asyncio.sleep(0.01)  # polling a file this test writes
        return "finished"

    @driver().task
    async def main(folder: str) -> str:
        return await gated(folder)

    async def scenario() -> flowsdk.Run[Any]:
        handle = await flowsdk.start(main, str(tmp_path))
        await wait_for_file(tmp_path / "started")
        await handle.stop(reason="drain")
        (tmp_path / "go").write_text("go")
        return await handle.wait()

    run = asyncio.run(scenario())
    assert run.phase is flowsdk.RunPhase.STOPPED
    child = by_task(run, "gated")[0]
    assert child.phase is ActionPhase.SUCCEEDED


def test_a_body_swallowing_cancellation_is_killed_after_its_grace(tmp_path: Path) -> None:
    stubborn_env = flowsdk.TaskEnvironment("onray_stubborn", executor="ray", grace_period=0.3)

    @stubborn_env.task
    async def stubborn(folder: str) -> str:
        mark(f"{folder}/started", str(os.getpid()))
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                mark(f"{folder}/swallowed", "yes")

    @driver().task
    async def main(folder: str) -> str:
        t = asyncio.create_task(stubborn(folder))
        await wait_for_file(Path(folder) / "started")
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
        return "done"

    run = flowsdk.run(main, str(tmp_path))
    child = by_task(run, "stubborn")[0]
    assert child.phase is ActionPhase.ABORTED
    assert child.cleanup_incomplete is True
    assert (tmp_path / "swallowed").exists()
    pid = int((tmp_path / "started").read_text())
    assert wait_until_gone(pid)
    assert_clean(run)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until_gone(pid: int) -> bool:
    async def poll() -> bool:
        for _ in range(3000):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            await asyncio.sleep(0.01)  # polling for another process's exit
        return False

    return asyncio.run(poll())


def test_early_cancel_race_never_lets_a_body_run_on(tmp_path: Path) -> None:
    @env.task
    async def brief(folder: str, i: int) -> None:
        # The body's work: its first await, where a cancel lands. Long, so that only a cancel
        # that never arrives lets it run on; at 50 ms a loaded machine delivered some too late.
        await asyncio.sleep(30)
        mark(f"{folder}/ran-{i}", "ran past its first await")

    @driver().task
    async def main(folder: str, count: int) -> int:
        rng = random.Random(13)
        cancelled = 0
        for i in range(count):
            t = asyncio.create_task(brief(folder, i))
            # The delay IS the behaviour under test: a cancel 0-5 ms after submission.
            await asyncio.sleep(rng.uniform(0, 0.005))
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                cancelled += 1
        return cancelled

    run = flowsdk.run(main, str(tmp_path), 300)
    assert run.result() == 300
    ran = sorted(p.name for p in tmp_path.glob("ran-*"))
    assert ran == []
    assert all(a.phase is ActionPhase.ABORTED for a in by_task(run, "brief"))


def test_nested_calls_are_refused() -> None:
    @env.task
    async def nests() -> int:
        return await square(2)

    @driver().task
    async def main() -> str:
        try:
            await nests()
        except RuntimeUserError as exc:
            return f"{type(exc.__cause__).__name__}: {exc.__cause__}"
        return "nested"

    run = flowsdk.run(main)
    text = run.result()
    assert text.startswith("InvalidStateError: a body running on Ray cannot start child actions")
    assert "onray.square" in text
    assert len(run.actions) == 2  # nothing was submitted for the nested call


def test_a_dead_worker_fails_the_attempt_and_it_is_retried(tmp_path: Path) -> None:
    retried = flowsdk.TaskEnvironment("onray_retried", executor="ray", retries=1, backoff=0)

    @retried.task
    async def dies_once(folder: str) -> int:
        first = Path(folder, "first")
        if not first.exists():
            first.write_text(str(os.getpid()))
            os._exit(1)
        return 2

    @driver().task
    async def main(folder: str) -> int:
        return await dies_once(folder)

    run = flowsdk.run(main, str(tmp_path))
    assert run.result() == 2
    child = by_task(run, "dies_once")[0]
    assert (child.phase, child.attempt) == (ActionPhase.SUCCEEDED, 2)
    failed = [e.message or "" for e in run.events if "failed with" in (e.message or "")]
    assert failed
    assert "ray.exceptions" in failed[0]


def test_ray_options_are_checked_at_decoration() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        flowsdk.TaskEnvironment("bad_retries", executor="ray", ray_options={"max_retries": 3})
    with pytest.raises(ValueError, match="max_restarts"):
        env.task(ray_options={"max_restarts": 1})
    with pytest.raises(ValueError, match="executor='ray'"):
        flowsdk.TaskEnvironment("bad_local", ray_options={"num_cpus": 1})
    with pytest.raises(ValueError, match="manages its actors"):
        flowsdk.TaskEnvironment("bad_conc", executor="ray", ray_options={"max_concurrency": 2})
    placed = flowsdk.TaskEnvironment("placed", executor="ray", ray_options={"num_cpus": 0.5})
    assert placed.options.ray_options == {"num_cpus": 0.5}


def test_the_local_cluster_listens_on_loopback_only() -> None:
    listing = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=True).stdout
    ray_lines = [
        line
        for line in listing.splitlines()
        if any(name in line for name in ('"raylet"', '"gcs_server"', '"ray::', "ray::"))
    ]
    assert ray_lines, listing
    for line in ray_lines:
        local_address = line.split()[3]
        assert local_address.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")), line


def test_import_flowsdk_does_not_import_ray() -> None:
    probe = (
        "import sys, flowsdk\n"
        "env = flowsdk.TaskEnvironment('e', executor='ray')\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_body_that_cannot_be_sent_fails_with_serialization_error() -> None:
    import threading

    from flowsdk.errors import SerializationError

    lock = threading.Lock()  # a lock cannot be pickled

    @env.task
    async def holds_a_lock() -> bool:
        return lock.locked()

    @driver().task
    async def main() -> str:
        try:
            await holds_a_lock()
        except RuntimeUserError as exc:
            return f"{type(exc.__cause__).__name__}: {exc.__cause__}"
        return "sent"

    text = flowsdk.run(main).result()
    assert text.startswith(f"{SerializationError.__name__}: task 'onray.holds_a_lock' cannot be")
    assert "refers to the variable 'lock' (a _thread.lock)" in text


def test_a_keyboard_interrupt_in_a_remote_body_aborts_the_run_and_spares_the_actor() -> None:
    interrupt_env = flowsdk.TaskEnvironment("onray_interrupt", executor="ray")

    @interrupt_env.task
    async def interrupts() -> int:
        raise KeyboardInterrupt

    @interrupt_env.task
    async def pid() -> int:
        return os.getpid()

    pids: list[int] = []

    @driver().task
    async def first() -> None:
        pids.append(await pid())
        await interrupts()

    @driver().task
    async def second() -> int:
        return await pid()

    with pytest.raises(KeyboardInterrupt):
        flowsdk.run(first)
    # The actor's event loop survived: the next body runs on the same worker.
    after = flowsdk.run(second)
    assert after.phase is flowsdk.RunPhase.SUCCEEDED
    assert after.result() == pids[0] != os.getpid()
