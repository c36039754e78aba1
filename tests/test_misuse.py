"""Call-shape misuse: forgotten awaits, calls outside a run, bad declarations and names."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

import flowsdk
from flowsdk import ActionInfo
from flowsdk.errors import FlowError, NotInRunError
from flowsdk.store import SQLiteStore
from tests.support import assert_clean, open_files, phases

BAD_NAMES = [
    "",
    "   ",
    "x" * 10_000,
    "a/b",
    "..",
    "a\x00b",
    "a\nb",
    "a\u202eb",  # right-to-left override
]


def _run_then_collect(task: flowsdk.Task[[], str]) -> flowsdk.Run[str]:
    run = flowsdk.run(task)
    gc.collect()
    return run


@pytest.mark.parametrize("shape", ["deleted", "bare statement"])
def test_task_call_never_awaited_warns_once_naming_the_users_function(shape: str) -> None:
    """A call never awaited: no action; exactly one RuntimeWarning, naming the user's function."""
    env = flowsdk.TaskEnvironment("m1")

    @env.task
    async def forgotten(x: int) -> int:
        return x

    @env.task
    async def root() -> str:
        if shape == "deleted":
            call = forgotten(1)
            del call
        else:
            forgotten(1)  # type: ignore[unused-coroutine]  # the misuse under test
        gc.collect()
        return "ok"

    with pytest.warns(RuntimeWarning) as caught:
        run = _run_then_collect(root)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "forgotten" in messages[0]
    assert "was never awaited" in messages[0]
    assert "action_handle" not in messages[0]
    assert run.result() == "ok"
    assert phases(run) == {"a0": "SUCCEEDED"}
    assert_clean(run)


def test_task_called_outside_a_run_is_a_plain_coroutine() -> None:
    """`asyncio.run(task(x))` runs the body as it is, with no run and no action."""
    env = flowsdk.TaskEnvironment("m2")
    in_run: list[bool] = []

    @env.task
    async def double(x: int) -> int:
        try:
            flowsdk.current_action()
        except NotInRunError:
            in_run.append(False)
        else:
            in_run.append(True)
        return 2 * x

    assert asyncio.run(double(21)) == 42
    assert in_run == [False]


def test_task_called_outside_a_run_from_a_worker_thread_is_a_plain_coroutine() -> None:
    """A worker thread's asyncio.run(task(x)) also runs the plain body."""
    env = flowsdk.TaskEnvironment("m2thread")
    results: list[int] = []

    @env.task
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    worker = threading.Thread(target=lambda: results.append(asyncio.run(double(4))))
    worker.start()
    worker.join()
    assert results == [8]


def test_task_called_by_an_executor_worker_inside_a_run_creates_no_action() -> None:
    """A run_in_executor worker (no run context) runs the plain body: no run, no action."""
    env = flowsdk.TaskEnvironment("m2executor")

    @env.task
    async def double(x: int) -> int:
        return 2 * x

    def in_worker() -> int:
        return asyncio.run(double(5))

    @env.task
    async def root() -> int:
        return await asyncio.get_running_loop().run_in_executor(None, in_worker)

    run = flowsdk.run(root)
    assert run.result() == 10
    assert phases(run) == {"a0": "SUCCEEDED"}
    assert_clean(run)


def test_a_call_made_in_the_run_and_awaited_on_another_loop_is_refused_and_starts_nothing() -> None:
    """`asyncio.run(call)` in a worker thread, for a call made in the run: NotInRunError.

    The action would start from that thread, on the run's state, and its body run
    to its end on the run's loop while its awaiter got asyncio's own error.
    """
    env = flowsdk.TaskEnvironment("m2elsewhere")
    charged: list[int] = []

    @env.task
    async def charge(amount: int) -> int:
        charged.append(amount)
        return amount

    @env.task
    async def root() -> str:
        call = charge(100)
        try:
            await asyncio.to_thread(asyncio.run, call)
        except NotInRunError as exc:
            return str(exc)
        return "awaited"

    run = flowsdk.run(root)
    message = run.result()
    assert "m2elsewhere.charge" in message
    assert "another event loop" in message
    assert charged == []
    assert phases(run) == {"a0": "SUCCEEDED"}
    assert_clean(run)


def test_task_called_by_a_to_thread_worker_inside_a_run_leaves_the_run_alone() -> None:
    """A worker that inherited the run context gets the plain body or a FlowError, no action."""
    env = flowsdk.TaskEnvironment("m2tothread")
    refused: list[str] = []

    @env.task
    async def double(x: int) -> int:
        return 2 * x

    def in_worker() -> int:
        try:
            return asyncio.run(double(5))
        except FlowError as exc:
            refused.append(str(exc))
            return -1

    @env.task
    async def root() -> int:
        # asyncio.to_thread copies the caller's context into the worker thread.
        return await asyncio.to_thread(in_worker)

    run = flowsdk.run(root)
    assert run.result() in (10, -1)
    if refused:
        assert "m2tothread.double" in refused[0]
    assert phases(run) == {"a0": "SUCCEEDED"}
    assert_clean(run)


def _generator() -> Iterator[int]:
    yield 1


async def _async_generator() -> AsyncIterator[int]:
    yield 1


class _NotAFunction:
    pass


# Ids by name, not repr: a repr holds an address, which differs between pytest-xdist workers.
@pytest.mark.parametrize(
    "fn", [_generator, _async_generator, _NotAFunction, print], ids=lambda f: f.__qualname__
)
def test_decorating_anything_but_a_function_raises_type_error(
    fn: Callable[..., Any],
) -> None:
    """Decorating anything but an `async def` or a plain `def` fails at decoration time."""
    env = flowsdk.TaskEnvironment("notafunction")
    with pytest.raises(TypeError, match="'async def' or a plain 'def'"):
        cast(Any, env.task)(fn)
    with pytest.raises(TypeError, match="'async def' or a plain 'def'"):
        cast(Any, env.task(retries=1))(fn)


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_bad_environment_name_raises_value_error_showing_its_repr(name: str) -> None:
    """A bad environment name is refused with ValueError showing the name's repr."""
    with pytest.raises(ValueError, match="name") as info:
        flowsdk.TaskEnvironment(name)
    assert repr(name[:40])[:-1] in str(info.value)


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_bad_task_function_name_raises_value_error(name: str) -> None:
    """A function whose name is bad is refused at decoration time."""
    env = flowsdk.TaskEnvironment("names")

    async def job() -> None:
        pass

    job.__name__ = name
    with pytest.raises(ValueError, match="name"):
        env.task(job)


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_bad_group_and_run_names_raise_value_error(name: str) -> None:
    """A group or run with a bad name is refused before anything runs."""
    env = flowsdk.TaskEnvironment("names")
    with pytest.raises(ValueError, match="name"):
        flowsdk.group(name)

    async def ok() -> None:
        pass

    task = env.task(ok)
    with pytest.raises(ValueError, match="name"):
        flowsdk.run(task, name=name)


def test_two_tasks_with_one_name_in_one_environment_raise_value_error() -> None:
    """An environment refuses a second task with the same function name."""
    env = flowsdk.TaskEnvironment("dups")

    def declare() -> flowsdk.Task[[], None]:
        async def job() -> None:
            pass

        return env.task(job)

    first = declare()
    with pytest.raises(ValueError, match=r"'dups\.job'"):
        declare()
    assert first.name == "dups.job"


async def test_run_inside_a_running_loop_names_run_async() -> None:
    """flowsdk.run from inside a running event loop raises RuntimeError naming run_async."""
    env = flowsdk.TaskEnvironment("nested")

    @env.task
    async def noop() -> None:
        pass

    with pytest.raises(RuntimeError, match=r"flowsdk\.run_async"):
        flowsdk.run(noop)


def test_current_action_outside_a_run_raises_not_in_run_error() -> None:
    """current_action() outside any run raises NotInRunError."""
    with pytest.raises(NotInRunError):
        flowsdk.current_action()


def test_current_action_inside_a_run_describes_the_calling_action() -> None:
    """current_action() gives the run, action name, task name, attempt and group."""
    env = flowsdk.TaskEnvironment("info")
    seen: list[ActionInfo] = []

    @env.task
    async def child() -> None:
        seen.append(flowsdk.current_action())

    @env.task
    async def root() -> None:
        seen.append(flowsdk.current_action())
        with flowsdk.group("stage"):
            await child()

    run = flowsdk.run(root, name="info-run")
    assert seen == [
        ActionInfo(run="info-run", name="a0", task="info.root", attempt=1, group=None),
        ActionInfo(run="info-run", name="a1", task="info.child", attempt=1, group="stage"),
    ]
    assert_clean(run)


def test_a_closed_client_refuses_use_and_reopens_nothing(tmp_path: Path) -> None:
    """After `close()`, a Client says it is closed instead of opening a connection nobody closes."""
    env = flowsdk.TaskEnvironment("m_closed")

    @env.task
    async def main() -> int:
        return 1

    url = f"sqlite:///{tmp_path / 's.db'}"
    flowsdk.run(main, name="r", store=url)
    client = flowsdk.Client(url)
    assert [r.name for r in client.runs()] == ["r"]
    client.close()
    assert open_files(tmp_path / "s.db") == []
    for use in (client.runs, lambda: client.get_run("r"), lambda: client.abort("r")):
        with pytest.raises(RuntimeError, match=r"was closed; create a new flowsdk\.Client"):
            use()
    with pytest.raises(RuntimeError, match="was closed"), client:
        pass
    assert open_files(tmp_path / "s.db") == []
    client.close()  # closing twice is fine
    assert "closed" in repr(client)


def test_closing_a_client_leaves_open_the_store_object_it_was_given(tmp_path: Path) -> None:
    """A store object passed to a Client is the caller's: the client does not close it."""
    env = flowsdk.TaskEnvironment("m_lent")

    @env.task
    async def main() -> int:
        return 1

    path = tmp_path / "s.db"
    store = SQLiteStore(f"sqlite:///{path}")
    flowsdk.run(main, name="r", store=store)
    try:
        with flowsdk.Client(store) as client:
            assert [r.name for r in client.runs()] == ["r"]
        held = open_files(path)
        assert held  # the store's own reading connection, still open
        assert [r.name for r in store.list_runs()] == ["r"]
        assert open_files(path) == held  # used again as it was, not reopened
    finally:
        store.close()
    assert open_files(path) == []
