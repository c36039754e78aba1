"""Exceptions: wrapping, BaseException passthrough, Ctrl-C."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import signal
import weakref
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

import flowsdk
from flowsdk import RunPhase
from flowsdk.errors import ActionAbortedError, RuntimeUserError
from flowsdk.store import MemoryStore
from tests.support import assert_clean, causes, phases


def _recorded(store: MemoryStore) -> flowsdk.Run[Any]:
    """The one run recorded in `store` (a run that raised out of flowsdk.run is recorded too)."""
    [record] = store.list_runs()
    with flowsdk.Client(store) as client:
        run = client.get_run(record.name)
    gc.collect()  # the run's tasks go now, so an asyncio complaint lands on this test
    return run


def _cancelling() -> int:
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling()


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class UnpicklableError(Exception):
    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("UnpicklableError cannot be pickled")


@pytest.mark.parametrize("shape", ["direct", "gather", "taskgroup"])
@pytest.mark.parametrize(
    "make",
    [KeyboardInterrupt, lambda: SystemExit(3)],
    ids=["KeyboardInterrupt", "SystemExit3"],
)
def test_base_exception_in_child_aborts_run_then_leaves_run(
    shape: str, make: Callable[[], BaseException]
) -> None:
    """KeyboardInterrupt/SystemExit(3) in a child: recorded, run aborted, then re-raised."""
    env = flowsdk.TaskEnvironment("e1")
    raised = make()
    store = MemoryStore()
    sibling_started = asyncio.Event()
    cleanups: list[int] = []
    root_saw: list[type[BaseException]] = []
    gathered: list[list[Any]] = []

    @env.task
    async def sibling() -> None:
        sibling_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cleanups.append(1)
            raise

    @env.task
    async def kid() -> None:
        await sibling_started.wait()
        raise raised

    @env.task
    async def root() -> None:
        try:
            if shape == "direct":
                sib = asyncio.create_task(sibling())
                await sibling_started.wait()  # so the sibling is a1, the kid a2
                await kid()
                await sib
            elif shape == "gather":
                gathered.append(await asyncio.gather(sibling(), kid(), return_exceptions=True))
            else:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(sibling())
                    tg.create_task(kid())
        except BaseException as exc:  # record what the root sees, then let it go
            root_saw.append(type(exc))
            raise

    with pytest.raises(type(raised)) as info:
        flowsdk.run(root, store=store)
    assert info.value is raised
    if isinstance(raised, SystemExit):
        assert info.value.code == 3  # type: ignore[attr-defined]
    assert gathered == []
    assert root_saw == [asyncio.CancelledError]  # not RuntimeUserError, not a group
    assert cleanups == [1]
    run = _recorded(store)
    assert run.phase is RunPhase.ABORTED
    assert phases(run) == {"a0": "ABORTED", "a1": "ABORTED", "a2": "FAILED"}
    assert causes(run) == {"a0": "sigint", "a1": "ancestor", "a2": None}
    error = run.action("a2").error
    assert error is not None
    assert error.type == type(raised).__name__
    assert_clean(run)


def test_sigint_aborts_run_then_raises_keyboard_interrupt() -> None:
    """A real SIGINT aborts the root (sigint), descendants (ancestor); then Ctrl-C leaves."""
    env = flowsdk.TaskEnvironment("e2")
    store = MemoryStore()
    running: list[str] = []
    all_running = asyncio.Event()
    cleanups: list[str] = []

    async def hold(who: str) -> None:
        running.append(who)
        if len(running) == 3:
            all_running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cleanups.append(who)
            raise

    @env.task
    async def grandchild() -> None:
        await hold("grandchild")

    @env.task
    async def child(i: int) -> None:
        if i == 0:
            asyncio.create_task(grandchild())  # noqa: RUF006 -- dropped on purpose
        await hold(f"child {i}")

    @env.task
    async def root() -> None:
        tasks = [asyncio.create_task(child(i)) for i in range(2)]
        await all_running.wait()
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.gather(*tasks)

    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        flowsdk.run(root, store=store)
    assert signal.getsignal(signal.SIGINT) is handler_before
    run = _recorded(store)
    assert run.phase is RunPhase.ABORTED
    assert set(phases(run).values()) == {"ABORTED"}
    assert len(run.actions) == 4
    assert causes(run)["a0"] == "sigint"
    assert {causes(run)[a.name] for a in run.actions[1:]} == {"ancestor"}
    assert sorted(cleanups) == sorted(running)
    assert_clean(run)


def test_second_sigint_during_cleanup_abandons_unfinished_actions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A second SIGINT during cleanup stops waiting: unfinished actions are ABANDONED."""
    env = flowsdk.TaskEnvironment("e2b")
    store = MemoryStore()
    running: list[str] = []
    both_running = asyncio.Event()
    slow_finished: list[bool] = []
    quick_cleanups: list[int] = []

    @env.task
    async def slow() -> None:
        running.append("slow")
        if len(running) == 2:
            both_running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again while cleaning up
            await asyncio.sleep(3600)
            slow_finished.append(True)
            raise

    @env.task
    async def quick() -> None:
        running.append("quick")
        if len(running) == 2:
            both_running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            quick_cleanups.append(1)
            raise

    @env.task
    async def root() -> None:
        s = asyncio.create_task(slow())
        q = asyncio.create_task(quick())
        await both_running.wait()
        os.kill(os.getpid(), signal.SIGINT)
        await s  # the root waits for the slow child's cleanup: it is unfinished too
        await q

    with caplog.at_level(logging.WARNING, logger="flowsdk"), pytest.raises(KeyboardInterrupt):
        flowsdk.run(root, store=store)
    run = _recorded(store)
    assert slow_finished == []
    # The body left running is named as the user knows it, not by an SDK frame.
    messages = [r.getMessage() for r in caplog.records if r.name == "flowsdk"]
    assert any("slow" in m for m in messages), messages
    assert quick_cleanups == [1]
    assert phases(run) == {"a0": "ABANDONED", "a1": "ABANDONED", "a2": "ABORTED"}
    assert causes(run) == {"a0": "sigint", "a1": "ancestor", "a2": "ancestor"}
    assert run.phase.terminal
    assert_clean(run)


@pytest.mark.parametrize("shape", ["direct", "task"])
def test_child_raising_cancelled_error_itself_is_not_an_abort(shape: str) -> None:
    """A child raising CancelledError uncancelled: parent gets CancelledError, continues."""
    env = flowsdk.TaskEnvironment("e3")
    seen: list[str] = []

    @env.task
    async def child() -> None:
        raise asyncio.CancelledError()

    @env.task
    async def root() -> str:
        try:
            if shape == "direct":
                await child()
            else:
                await asyncio.create_task(child())
        except asyncio.CancelledError:
            seen.append("cancelled")
        except ActionAbortedError:
            seen.append("aborted")
        assert _cancelling() == 0
        async with asyncio.timeout(3600):  # timeouts still behave after the catch
            await asyncio.sleep(0)
        return "continued"

    run = flowsdk.run(root)
    assert run.result() == "continued"
    assert seen == ["cancelled"]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "cancelled"
    assert_clean(run)


def _group_raising_run(
    name: str, parent_body: Callable[[Callable[[], Any]], Any]
) -> tuple[flowsdk.Run[Any], ExceptionGroup[Exception]]:
    env = flowsdk.TaskEnvironment(name)
    group = ExceptionGroup("two problems", [ValueError("v"), KeyError("k")])

    @env.task
    async def child() -> None:
        raise group

    @env.task
    async def root() -> None:
        await parent_body(child)

    return flowsdk.run(root), group


def test_child_exception_group_is_wrapped_once() -> None:
    """A child's ExceptionGroup reaches the parent as RuntimeUserError.__cause__."""
    caught: list[RuntimeUserError] = []

    async def parent(child: Callable[[], Any]) -> None:
        try:
            await child()
        except RuntimeUserError as exc:
            caught.append(exc)

    run, group = _group_raising_run("e4", parent)
    [exc] = caught
    assert exc.__cause__ is group
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "FAILED"}
    assert run.action("a1").error is not None
    assert run.action("a1").error.type == "ExceptionGroup"  # type: ignore[union-attr]
    assert_clean(run)


def test_child_exception_group_is_caught_by_except_star() -> None:
    """`except* RuntimeUserError` catches the wrapped group, awaited or in a TaskGroup."""
    caught: list[BaseExceptionGroup[RuntimeUserError]] = []

    async def parent(child: Callable[[], Any]) -> None:
        try:
            await child()
        except* RuntimeUserError as eg:
            caught.append(eg)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(child())
        except* RuntimeUserError as eg:
            caught.append(eg)

    run, group = _group_raising_run("e4b", parent)
    assert len(caught) == 2
    for eg in caught:
        [exc] = eg.exceptions
        assert exc.__cause__ is group
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "FAILED", "a2": "FAILED"}
    assert_clean(run)


def test_wrapped_exception_keeps_identity_and_context_across_boundaries() -> None:
    """`__cause__ is` the very ValueError, `__context__` kept, wrapped once per boundary."""
    env = flowsdk.TaskEnvironment("e5")
    caught: list[RuntimeUserError] = []

    @env.task
    async def leaf() -> None:
        try:
            raise KeyError("missing")
        except KeyError:
            raise ValueError("bad value")  # noqa: B904 -- the implicit __context__ is the point

    @env.task
    async def middle() -> None:
        await leaf()  # does not catch: the wrapper passes through unchanged

    @env.task
    async def root() -> None:
        try:
            await middle()
        except RuntimeUserError as exc:
            caught.append(exc)

    run = flowsdk.run(root)
    [exc] = caught
    original = exc.__cause__
    assert type(original) is ValueError
    assert isinstance(original.__context__, KeyError)
    assert exc.action == "a2"
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "FAILED", "a2": "FAILED"}
    leaf_error = run.action("a2").error
    assert leaf_error is not None
    assert leaf_error.type == "ValueError"
    assert leaf_error.message == "bad value"
    assert "KeyError" in leaf_error.traceback
    assert_clean(run)


def test_wrapper_creates_no_reference_cycle() -> None:
    """The RuntimeUserError wrapper is freed by refcount alone; nothing cyclic holds it."""
    env = flowsdk.TaskEnvironment("e5b")
    wrappers: list[weakref.ref[RuntimeUserError]] = []
    originals: list[BaseException | None] = []
    wrapper_alive: list[bool] = []

    @env.task
    async def leaf() -> None:
        raise ValueError("bad value")

    @env.task
    async def root() -> None:
        try:
            await leaf()
        except RuntimeUserError as exc:
            wrappers.append(weakref.ref(exc))
            originals.append(exc.__cause__)
        wrapper_alive.append(wrappers[0]() is not None)

    gc.collect()
    gc.disable()
    try:
        run = flowsdk.run(root)
        assert wrapper_alive == [False]
        original = originals.pop()
        holders = [r for r in gc.get_referrers(original) if isinstance(r, BaseException)]
        assert holders == []
    finally:
        gc.enable()
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "FAILED"}
    assert_clean(run)


def hostile_run(
    name: str, exc: BaseException, *, store: str | None = None, reraise: bool = False
) -> tuple[flowsdk.Run[Any], list[RuntimeUserError]]:
    """Run a root whose child raises `exc`; return the run and what the root caught.

    With `reraise`, the root raises what it caught again (the run is FAILED).
    """
    env = flowsdk.TaskEnvironment(name)
    caught: list[RuntimeUserError] = []

    @env.task
    async def child() -> None:
        raise exc

    @env.task
    async def root() -> None:
        try:
            await child()
        except RuntimeUserError as err:
            caught.append(err)
            if reraise:
                raise

    return flowsdk.run(root, name=name if store else None, store=store), caught


def test_exception_whose_str_raises_is_recorded_with_fallback() -> None:
    """An exception whose `__str__` raises is recorded as `<unprintable ...>`."""
    hostile = UnprintableError()
    run, caught = hostile_run("e6", hostile)
    [err] = caught
    assert err.__cause__ is hostile
    record = run.action("a1")
    assert record.phase.value == "FAILED"
    assert record.error is not None
    assert record.error.type.endswith("UnprintableError")
    assert record.error.message == "<unprintable UnprintableError>"
    assert msgspec.json.encode(run.actions)
    assert_clean(run)


def test_unpicklable_exception_is_recorded_and_wrapper_pickles() -> None:
    """An unpicklable exception is recorded; the parent's wrapper still pickles."""
    hostile = UnpicklableError("cannot travel")
    run, caught = hostile_run("e6b", hostile)
    [err] = caught
    assert err.__cause__ is hostile
    copy = pickle.loads(pickle.dumps(err))
    assert copy.error_type.endswith("UnpicklableError")
    assert copy.error_message == "cannot travel"
    assert run.action("a1").phase.value == "FAILED"
    assert msgspec.json.encode(run.actions)
    assert_clean(run)


@pytest.mark.slow  # formatting a 100 MB traceback takes most of a second
def test_huge_exception_message_is_truncated_in_record() -> None:
    """A 100 MB exception message is recorded truncated; the parent still gets it."""
    hostile = ValueError("x" * 100_000_000)
    run, caught = hostile_run("e6c", hostile)
    [err] = caught
    assert err.__cause__ is hostile
    assert len(str(err)) < 10_000
    error = run.action("a1").error
    assert error is not None
    assert error.type == "ValueError"
    assert len(error.message) < 10_000
    assert len(error.traceback) < 100_000
    assert len(msgspec.json.encode(run.actions)) < 200_000
    assert_clean(run)
