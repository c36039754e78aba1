"""What a Flyte 2 workflow needs to port by changing its imports.

Strict `cache=` values, plain `def` tasks in worker threads,
`NonRecoverableError`, `deadline=`, keyword arguments to `flowsdk.run`, and
`RuntimeUserError.code`.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

import flowsdk
from flowsdk import ActionPhase
from flowsdk.errors import NonRecoverableError, RuntimeUserError, TaskTimeoutError
from tests.support import assert_clean

# -- cache= ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["yes", "Auto", "", 1, 0, None, 2.5])
def test_cache_refuses_anything_but_the_documented_values(bad: Any) -> None:
    env = flowsdk.TaskEnvironment("cache_bad")
    with pytest.raises(ValueError, match="cache must be True, False, 'auto', 'disable'"):

        @env.task(cache=bad)
        async def work() -> int:
            return 1

    with pytest.raises(ValueError, match="cache must be"):
        flowsdk.TaskEnvironment("cache_bad_env", cache=bad)


def _cached_twice(tmp_path: Path, cache: Any) -> tuple[list[int], list[bool]]:
    """Run a cached task in two runs on one SQLite store; return the bodies' calls and replays."""
    store = f"sqlite:///{tmp_path / 'flowsdk.db'}"
    env = flowsdk.TaskEnvironment("cache_mode")
    calls: list[int] = []

    @env.task(cache=cache, cache_version="1")
    async def square(x: int) -> int:
        calls.append(x)
        return x * x + len(calls)

    @env.task
    async def main() -> int:
        return await square(3)

    values = [flowsdk.run(main, store=store).result() for _ in range(2)]
    run = flowsdk.run(main, store=store)
    replayed = [a.replayed for a in run.actions if a.task.endswith("square")]
    calls.append(run.result())
    calls.extend(values)
    return calls, replayed


@pytest.mark.parametrize("cache", [True, "auto"])
def test_cache_true_and_auto_reuse_the_cached_value(tmp_path: Path, cache: Any) -> None:
    calls, replayed = _cached_twice(tmp_path, cache)
    # One body call; every run gets its value.
    assert calls == [3, 10, 10, 10]
    assert replayed == [True]


@pytest.mark.parametrize("cache", [False, "disable"])
def test_cache_false_and_disable_run_the_body_every_time(tmp_path: Path, cache: Any) -> None:
    calls, replayed = _cached_twice(tmp_path, cache)
    assert calls == [3, 3, 3, 12, 10, 11]
    assert replayed == [False]


def test_cache_override_runs_again_and_replaces_the_cached_value(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'flowsdk.db'}"
    env = flowsdk.TaskEnvironment("cache_override")
    calls: list[int] = []

    def declare(cache: Any) -> flowsdk.Task[[int], int]:
        @env.task(cache=cache, cache_version="1")
        async def square(x: int) -> int:
            calls.append(x)
            return x * x + len(calls)

        env._tasks.clear()  # the same task name, declared again with another cache mode
        return square

    def run_with(cache: Any) -> int:
        square = declare(cache)

        @env.task
        async def main() -> int:
            return await square(3)

        env._tasks.pop(main.name, None)
        return flowsdk.run(main, store=store).result()

    assert run_with(True) == 10  # computed and cached
    assert run_with("override") == 11  # run again, and the cache now holds 11
    assert run_with(True) == 11  # read from the cache
    assert calls == [3, 3]


# -- plain def tasks ------------------------------------------------------------------


def test_plain_def_task_runs_in_a_worker_thread() -> None:
    env = flowsdk.TaskEnvironment("sync_ok")
    threads: list[int] = []

    @env.task
    def add(a: int, b: int) -> int:
        threads.append(threading.get_ident())
        return a + b

    @env.task
    def whoami() -> str:
        return flowsdk.current_action().task

    @env.task
    async def main() -> list[Any]:
        threads.append(threading.get_ident())
        return [await add(1, 2), await asyncio.create_task(add(2, 3)), await whoami()]

    run = flowsdk.run(main)
    assert run.result() == [3, 5, "sync_ok.whoami"]
    loop_thread, *workers = threads
    assert workers
    assert loop_thread not in workers
    # Outside a run: the plain function (type checkers see the in-run awaitable).
    assert add(1, 1) == 2  # type: ignore[comparison-overlap]
    assert add.__name__ == "add"
    assert_clean(run)


def test_plain_def_task_errors_are_wrapped_and_retried() -> None:
    env = flowsdk.TaskEnvironment("sync_err")
    attempts: list[int] = []

    @env.task(retries=1, backoff=0)
    def flaky() -> int:
        attempts.append(flowsdk.current_action().attempt)
        raise KeyError("missing")

    @env.task
    async def main() -> str:
        try:
            await flaky()
        except RuntimeUserError as exc:
            return f"{type(exc.__cause__).__name__} {exc.code}"
        return "no error"

    run = flowsdk.run(main)
    assert run.result() == "KeyError KeyError"
    assert attempts == [1, 2]


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # the worker thread ends before the leak check


def test_cancelled_plain_def_task_is_recorded_at_once(gate: threading.Event) -> None:
    env = flowsdk.TaskEnvironment("sync_cancel")
    entered = threading.Event()
    finished = threading.Event()

    @env.task
    def blocking() -> int:
        entered.set()
        gate.wait(30)
        finished.set()
        return 1

    @env.task
    async def main() -> list[Any]:
        t = asyncio.create_task(blocking())
        await asyncio.to_thread(entered.wait, 30)
        t.cancel("no longer needed")
        try:
            await t
        except asyncio.CancelledError:
            outcome = "cancelled"
        else:
            outcome = "value"
        return [outcome, finished.is_set()]

    run = flowsdk.run(main)
    gate.set()
    # The parent got the outcome while the thread was still blocked.
    assert run.result() == ["cancelled", False]
    [record] = [a for a in run.actions if a.task.endswith("blocking")]
    assert record.phase is ActionPhase.ABORTED
    assert record.abort is not None
    assert record.abort.cause.value == "cancelled"
    assert record.abort.reason == "no longer needed"
    assert record.cleanup_incomplete
    assert finished.wait(30)


def test_only_functions_can_be_tasks() -> None:
    env = flowsdk.TaskEnvironment("sync_bad")

    class Model:
        pass

    def numbers() -> Iterator[int]:
        yield 1

    async def agen() -> Any:
        yield 1

    for bad, kind in [
        (Model, "class"),
        (numbers, "generator function"),
        (agen, "async generator function"),
        (42, "int"),
    ]:
        with pytest.raises(TypeError, match=f"is a {kind}"):
            env.task(cast(Any, bad))


# -- NonRecoverableError ---------------------------------------------------------------


class BadInput(NonRecoverableError):
    """A user's own permanent error."""


@pytest.mark.parametrize("error", [NonRecoverableError, BadInput])
def test_non_recoverable_error_is_never_retried(error: type[NonRecoverableError]) -> None:
    env = flowsdk.TaskEnvironment("nonrec")
    attempts: list[int] = []

    @env.task(retries=3, backoff=0)
    async def load() -> int:
        attempts.append(flowsdk.current_action().attempt)
        raise error("the file is not there")

    @env.task
    async def main() -> str:
        try:
            await load()
        except RuntimeUserError as exc:
            return f"{type(exc.__cause__).__name__} {exc.code}"
        return "no error"

    run = flowsdk.run(main)
    assert attempts == [1]
    cause, code = run.result().split()
    assert cause == error.__name__
    assert code.endswith(error.__name__)
    [record] = [a for a in run.actions if a.task.endswith("load")]
    assert record.phase is ActionPhase.FAILED
    assert record.attempt == 1


# -- deadline= -------------------------------------------------------------------------


def test_deadline_stops_the_action_across_its_attempts() -> None:
    env = flowsdk.TaskEnvironment("deadline")
    attempts: list[int] = []

    # Each attempt times out and is retried; the deadline ends them all.
    @env.task(timeout=0.05, deadline=0.5, retries=1000, backoff=0)
    async def slow() -> int:
        attempts.append(flowsdk.current_action().attempt)
        await asyncio.sleep(3600)
        return 0

    @env.task
    async def main() -> str:
        try:
            await slow()
        except TaskTimeoutError as exc:
            return f"{type(exc.__cause__).__name__}: {exc}"
        return "no timeout"

    run = flowsdk.run(main)
    assert run.result().startswith("TimeoutError: ")
    assert "exceeded its deadline of 0.5 s" in run.result()
    [record] = [a for a in run.actions if a.task.endswith("slow")]
    assert record.phase is ActionPhase.FAILED
    assert record.abort is not None
    assert record.abort.cause.value == "timeout"
    assert record.attempt == len(attempts) < 1000


def test_deadline_stops_the_retries_of_a_failing_body() -> None:
    env = flowsdk.TaskEnvironment("deadline_retries")
    attempts: list[int] = []

    @env.task(deadline=0.3, retries=10_000, backoff=0.01)
    async def failing() -> int:
        attempts.append(flowsdk.current_action().attempt)
        raise ValueError("again")

    @env.task
    async def main() -> str:
        try:
            await failing()
        except RuntimeUserError as exc:
            return exc.code
        return "no error"

    run = flowsdk.run(main)
    assert run.result() in ("ValueError", "")  # the last attempt's error, or the deadline's
    assert len(attempts) < 10_000


@pytest.mark.parametrize("bad", [0, -1, "10", float("nan")])
def test_deadline_must_be_positive_seconds(bad: Any) -> None:
    env = flowsdk.TaskEnvironment("deadline_bad")
    with pytest.raises(ValueError, match="deadline must be"):
        env.task(deadline=bad)


# -- flowsdk.run keywords, RuntimeUserError.code ---------------------------------------


def test_run_with_task_keywords_says_to_use_functools_partial() -> None:
    env = flowsdk.TaskEnvironment("kw")

    @env.task
    async def main(lr: float = 0.1) -> float:
        return lr

    with pytest.raises(TypeError, match=r"functools\.partial\(main, lr=\.\.\.\)"):
        flowsdk.run(main, lr=0.5)
    assert flowsdk.run(functools.partial(main, lr=0.5)).result() == 0.5


def test_runtime_user_error_code_is_the_error_type() -> None:
    err = RuntimeUserError("m", run="r", action="a1", error_type="ValueError")
    assert err.code == err.error_type == "ValueError"
