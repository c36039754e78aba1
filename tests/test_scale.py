"""Deep chains, wide fan-outs, recursion and dropped references (S)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import flowsdk
from flowsdk import EventKind, RunPhase
from flowsdk._action import ActionState
from flowsdk.errors import ActionAbortedError, RuntimeUserError
from tests.support import assert_clean, by_task, causes, phases

FAN_OUT = 10_000


def _chain_of_tasks(env: flowsdk.TaskEnvironment, leaf_started: asyncio.Event) -> flowsdk.Task:  # type: ignore[type-arg]
    """A task whose call with `n` starts a chain of `n` more actions, each in its own task."""

    @env.task
    async def level(n: int) -> int:
        if n == 0:
            leaf_started.set()
            await asyncio.sleep(3600)
            return 0
        return await asyncio.create_task(level(n - 1))

    return level


async def test_depth_50_abort_of_root_aborts_every_level() -> None:
    """The root is ABORTED(external), the 50 levels below it ABORTED(ancestor)."""
    leaf_started = asyncio.Event()
    level = _chain_of_tasks(flowsdk.TaskEnvironment("s1a"), leaf_started)
    handle = await flowsdk.start(level, 50)
    await leaf_started.wait()
    await handle.abort()
    run = await handle.wait()
    assert len(run.actions) == 51
    assert set(phases(run).values()) == {"ABORTED"}
    assert causes(run) == {"a0": "external"} | {f"a{i}": "ancestor" for i in range(1, 51)}
    assert [e for e in run.events if e.kind is EventKind.WARNING] == []  # grace never used
    assert run.phase is RunPhase.ABORTED
    assert_clean(run)


async def test_depth_50_abort_of_leaf_reaches_each_ancestor_once() -> None:
    """The leaf is ABORTED; each ancestor sees one SDK exception, never wrapped twice."""
    env = flowsdk.TaskEnvironment("s1b")
    leaf_started = asyncio.Event()
    leaf: list[str] = []
    seen: list[tuple[int, Exception]] = []

    @env.task
    async def level(n: int) -> int:
        if n == 0:
            leaf.append(flowsdk.current_action().name)
            leaf_started.set()
            await asyncio.sleep(3600)
            return 0
        try:
            return await asyncio.create_task(level(n - 1))
        except Exception as exc:
            seen.append((n, exc))
            raise

    handle = await flowsdk.start(level, 50)
    await leaf_started.wait()
    await handle.abort(leaf[0])
    run = await handle.wait()
    assert [n for n, _ in seen] == list(range(1, 51))
    aborted = seen[0][1]
    assert isinstance(aborted, ActionAbortedError)
    assert aborted.action == leaf[0]
    wrapped = seen[1][1]
    assert type(wrapped) is RuntimeUserError
    assert wrapped.__cause__ is aborted
    assert all(exc is wrapped for _, exc in seen[1:])
    assert causes(run)[leaf[0]] == "external"
    assert Counter(phases(run).values()) == {"FAILED": 50, "ABORTED": 1}
    assert run.phase is RunPhase.ABORTED
    with pytest.raises(RuntimeUserError) as info:
        run.result()
    assert info.value.__cause__ is aborted
    assert "ActionAbortedError" in "".join(traceback.format_exception(info.value))
    assert_clean(run)


async def test_depth_2000_chain_of_tasks_is_created_aborted_and_torn_down() -> None:
    """2,001 actions, each awaiting create_task(next level), abort at the root."""
    leaf_started = asyncio.Event()
    level = _chain_of_tasks(flowsdk.TaskEnvironment("s2tasks"), leaf_started)
    handle = await flowsdk.start(level, 2000)
    await leaf_started.wait()
    await handle.abort()
    run = await handle.wait()
    assert len(run.actions) == 2001
    assert Counter(causes(run).values()) == {"external": 1, "ancestor": 2000}
    assert run.phase is RunPhase.ABORTED
    assert_clean(run)


async def test_depth_2000_chain_of_tasks_cancelled_by_workflow_code_unwinds_flat() -> None:
    """`t.cancel()` of a task awaiting a chain of 2,000 tasks: no recursion, every level ABORTED.

    Each level's cancel reaches its action at once through the future its task
    waits on; one caused while delivering another waits for the loop's next
    step, so the chain is not cancelled by recursion (plain asyncio recurses
    through `Task.cancel` and raises RecursionError here).
    """
    env = flowsdk.TaskEnvironment("s2cancel")
    leaf_started = asyncio.Event()
    level = _chain_of_tasks(env, leaf_started)

    @env.task
    async def root() -> str:
        t = asyncio.create_task(level(2000))
        await leaf_started.wait()
        t.cancel("enough")
        try:
            await t
        except asyncio.CancelledError:
            return "cancelled"
        return "not cancelled"

    run = await flowsdk.run_async(root)
    assert run.result() == "cancelled"
    assert len(run.actions) == 2002
    assert Counter(phases(run).values()) == {"SUCCEEDED": 1, "ABORTED": 2001}
    assert Counter(causes(run).values()) == {None: 1, "cancelled": 1, "ancestor": 2000}
    [top] = [a for a in run.actions if a.name == "a1"]
    assert top.abort is not None
    assert top.abort.reason == "enough"
    assert_clean(run)


async def test_depth_2000_chain_of_direct_awaits_is_created_aborted_and_torn_down() -> None:
    """2,001 actions, each a plain `await next()`, beyond the recursion limit of one stack."""
    env = flowsdk.TaskEnvironment("s2awaits")
    leaf_started = asyncio.Event()

    @env.task
    async def level(n: int) -> int:
        if n == 0:
            leaf_started.set()
            await asyncio.sleep(3600)
            return 0
        return await level(n - 1)

    handle = await flowsdk.start(level, 2000)
    await leaf_started.wait()
    await handle.abort()
    run = await handle.wait()
    assert len(run.actions) == 2001
    assert Counter(causes(run).values()) == {"external": 1, "ancestor": 2000}
    assert run.phase is RunPhase.ABORTED
    assert_clean(run)


async def test_depth_2000_chain_wraps_the_leaf_error_once() -> None:
    """A leaf failure at depth 2,000 reaches the root as one RuntimeUserError, unwrapped."""
    env = flowsdk.TaskEnvironment("s2error")
    boom = ValueError("leaf")

    @env.task
    async def level(n: int) -> int:
        if n == 0:
            raise boom
        return await asyncio.create_task(level(n - 1))

    # A watchdog under pytest-timeout's 60 s: its SIGALRM can land inside the
    # runtime's own bookkeeping and leave the run hanging instead of failing.
    async with asyncio.timeout(20):
        run = await flowsdk.run_async(level, 2000)
    assert run.phase is RunPhase.FAILED
    assert set(phases(run).values()) == {"FAILED"}
    with pytest.raises(RuntimeUserError) as info:
        run.result()
    assert info.value.__cause__ is boom
    assert info.value.action == "a2000"
    assert "ValueError: leaf" in "".join(traceback.format_exception(info.value))
    assert_clean(run)


async def test_fan_out_10000_then_abort_of_root() -> None:
    """10,000 gathered children ABORTED(ancestor), the root ABORTED(external)."""
    env = flowsdk.TaskEnvironment("s3")
    started: list[int] = []
    all_started = asyncio.Event()

    @env.task
    async def child(i: int) -> None:
        started.append(i)
        if len(started) == FAN_OUT:
            all_started.set()
        await asyncio.sleep(3600)

    @env.task
    async def root() -> None:
        await asyncio.gather(*(child(i) for i in range(FAN_OUT)))

    handle = await flowsdk.start(root)
    await all_started.wait()
    await handle.abort()
    run = await handle.wait()
    assert len(run.actions) == FAN_OUT + 1
    assert set(phases(run).values()) == {"ABORTED"}
    assert Counter(causes(run).values()) == {"external": 1, "ancestor": FAN_OUT}
    assert run.phase is RunPhase.ABORTED
    assert_clean(run)


def test_fan_out_10000_where_every_child_fails() -> None:
    """`gather` raises the first RuntimeUserError; the rest are recorded, stragglers root_exit."""
    env = flowsdk.TaskEnvironment("s3fail")

    @env.task
    async def child(i: int) -> None:
        if i % 2:
            await asyncio.sleep(3600)  # a straggler: it would fail later
        raise ValueError(i)

    @env.task
    async def root() -> None:
        await asyncio.gather(*(child(i) for i in range(FAN_OUT)))

    run = flowsdk.run(root)
    assert run.phase is RunPhase.FAILED
    with pytest.raises(RuntimeUserError) as info:
        run.result()
    assert isinstance(info.value.__cause__, ValueError)
    children = by_task(run, ".child")
    assert len(children) == FAN_OUT
    cause = causes(run)
    assert Counter((a.phase.value, cause[a.name]) for a in children) == {
        ("FAILED", None): FAN_OUT // 2,
        ("ABORTED", "root_exit"): FAN_OUT // 2,
    }
    assert_clean(run)


def test_one_task_called_1000_times_concurrently() -> None:
    """1,000 distinct actions, result[i] == 2*i, each body sees its own current action."""
    env = flowsdk.TaskEnvironment("s4")
    seen: dict[int, str] = {}
    mixed_up: list[int] = []

    @env.task
    async def double(x: int) -> int:
        me = flowsdk.current_action().name
        seen[x] = me
        await asyncio.sleep(0)
        if flowsdk.current_action().name != me:
            mixed_up.append(x)
        return 2 * x

    @env.task
    async def root() -> list[int]:
        return await asyncio.gather(*(double(x) for x in range(1000)))

    run = flowsdk.run(root)
    assert run.result() == [2 * x for x in range(1000)]
    assert seen == {x: f"a{x + 1}" for x in range(1000)}
    assert {a.name for a in by_task(run, ".double")} == set(seen.values())
    assert len({a.key for a in run.actions}) == 1001
    assert mixed_up == []
    assert_clean(run)


def test_recursive_fib_15_gives_610_with_1973_actions() -> None:
    """`fib(15)`, each call gathering fib(n-1) and fib(n-2) as actions."""
    env = flowsdk.TaskEnvironment("s5")

    @env.task
    async def fib(n: int) -> int:
        if n < 2:
            return n
        a, b = await asyncio.gather(fib(n - 1), fib(n - 2))
        return a + b

    run = flowsdk.run(fib, 15)
    assert run.result() == 610
    assert len(run.actions) == 1973
    assert set(phases(run).values()) == {"SUCCEEDED"}
    assert_clean(run)


def test_spawned_children_outlive_the_parent_that_returned() -> None:
    """A parent that spawns and returns SUCCEEDS at once; a late failure is recorded, not fatal.

    The children still running at root exit end ABORTED(root_exit).
    """
    env = flowsdk.TaskEnvironment("s6")
    fail_now = asyncio.Event()
    failing = asyncio.Event()
    spawned: list[asyncio.Task[None]] = []
    running_after_return: list[bool] = []

    @env.task
    async def doomed() -> None:
        await fail_now.wait()
        failing.set()
        raise ValueError("later")

    @env.task
    async def lingering() -> None:
        await asyncio.sleep(3600)

    @env.task
    async def spawner() -> str:
        spawned.append(asyncio.create_task(doomed()))
        spawned.append(asyncio.create_task(lingering()))
        await asyncio.sleep(0)  # let both calls start their actions
        return "spawned"

    @env.task
    async def root() -> str:
        value = await spawner()
        running_after_return.extend(not t.done() for t in spawned)
        fail_now.set()
        await failing.wait()
        return value

    run = flowsdk.run(root)
    assert run.result() == "spawned"
    assert running_after_return == [True, True]
    assert [a.phase.value for a in by_task(run, ".spawner")] == ["SUCCEEDED"]
    assert [a.phase.value for a in by_task(run, ".doomed")] == ["FAILED"]
    [lingering_record] = by_task(run, ".lingering")
    assert causes(run)[lingering_record.name] == "root_exit"
    warnings = [e.message or "" for e in run.events if e.kind is EventKind.WARNING]
    assert any("unobserved" in w and "later" in w for w in warnings), warnings
    assert run.phase is RunPhase.SUCCEEDED
    assert_clean(run)


def test_dropped_task_reference_is_not_collected_mid_flight() -> None:
    """A child whose task reference was dropped survives gc.collect() and SUCCEEDS."""
    env = flowsdk.TaskEnvironment("s7")
    go = asyncio.Event()
    finished = asyncio.Event()

    @env.task
    async def child() -> int:
        await go.wait()
        finished.set()
        return 1

    @env.task
    async def root() -> str:
        asyncio.create_task(child())  # noqa: RUF006 -- dropping the reference is the scenario
        await asyncio.sleep(0)
        gc.collect()
        go.set()
        await finished.wait()
        return "ok"

    run = flowsdk.run(root)
    assert run.result() == "ok"
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED"}
    assert_clean(run)


def _action_states() -> int:
    """How many live actions exist in the process (they are tracked by the collector)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, ActionState))


@contextlib.contextmanager
def collector_off() -> Iterator[Callable[[], int]]:
    """Turn the garbage collector off; yield a count of the actions made since."""
    gc.collect()
    before = _action_states()
    gc.disable()
    try:
        yield lambda: _action_states() - before
    finally:
        gc.enable()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "run_async"])
def test_an_ended_run_is_freed_with_its_run_without_the_garbage_collector(
    kind: str, tmp_path: Path
) -> None:
    """Dropping an ended `Run` frees its actions at once, by reference counting.

    The runtime is in reference cycles (its root, delivery and channel refer to
    it): were it still holding the actions, they would wait for a collection
    that walks every one of them. With the collector off, none may be left.
    """
    env = flowsdk.TaskEnvironment("s8")

    @env.task
    async def child(i: int) -> int:
        await asyncio.sleep(0)
        return i

    @env.task
    async def root(n: int) -> int:
        return sum([await child(i) for i in range(n)])

    store = f"sqlite:///{tmp_path / 'flowsdk.db'}" if kind == "sqlite" else "memory://"
    with collector_off() as new_actions:
        if kind == "run_async":
            run = asyncio.run(flowsdk.run_async(root, 50, store=store))
        else:
            run = flowsdk.run(root, 50, store=store)
        assert run.result() == sum(range(50))
        assert new_actions() == 51  # the ended run's records are built from them
        assert [a.phase.value for a in run.actions].count("SUCCEEDED") == 51
        del run
        assert new_actions() == 0


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_cancelled_children_are_freed_with_their_run_without_the_garbage_collector(
    kind: str, tmp_path: Path
) -> None:
    """Children cancelled by workflow code leave no reference cycle behind.

    What leaves a cancelled awaiter keeps its frame in a traceback, and the
    awaiting task keeps what left it; a grace timer keeps the actions it was
    set for. None of that may lead back to the action once the run is over:
    with the collector off, dropping the `Run` frees every action. Cancelled
    in tasks of their own, by `gather`'s caller, and awaited directly under
    an `asyncio.timeout`.
    """
    env = flowsdk.TaskEnvironment("s9")
    started: list[int] = []
    all_started = asyncio.Event()

    @env.task
    async def sleeper(n: int) -> None:
        started.append(n)
        if len(started) == n:
            all_started.set()
        await asyncio.sleep(3600)

    @env.task
    async def root(n: int) -> int:
        tasks = [asyncio.create_task(sleeper(n)) for _ in range(n)]
        await all_started.wait()
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0):
                await sleeper(0)  # this body's own task is cancelled: the action awaited directly
        return sum(isinstance(r, asyncio.CancelledError) for r in results)

    store = f"sqlite:///{tmp_path / 'flowsdk.db'}" if kind == "sqlite" else "memory://"
    with collector_off() as new_actions:
        run = flowsdk.run(root, 20, store=store)
        assert run.result() == 20
        assert Counter(phases(run).values()) == {"SUCCEEDED": 1, "ABORTED": 21}
        assert new_actions() == 22
        del run
        assert new_actions() == 0


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_gathered_children_are_freed_with_their_run_without_the_garbage_collector(
    kind: str, tmp_path: Path
) -> None:
    """The calls `gather` wraps (the action's own future stands for their task) leave no cycle.

    Their futures end with the value, with the error the parent sees, or
    cancelled by gather's cancel: with the collector off, dropping the `Run`
    frees every action.
    """
    env = flowsdk.TaskEnvironment("s10")
    started: list[int] = []
    all_started = asyncio.Event()

    @env.task
    async def child(i: int) -> int:
        await asyncio.sleep(0)
        if i % 2:
            raise ValueError(f"odd {i}")
        return i

    @env.task
    async def sleeper(n: int) -> None:
        started.append(n)
        if len(started) == n:
            all_started.set()
        await asyncio.sleep(3600)

    @env.task
    async def root(n: int) -> list[int]:
        results = await asyncio.gather(*(child(i) for i in range(n)), return_exceptions=True)
        errors = sum(isinstance(r, RuntimeUserError) for r in results)
        del results
        g = asyncio.gather(*(sleeper(n) for _ in range(n)))
        await all_started.wait()
        g.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await g
        del g
        return [errors, len(started)]

    store = f"sqlite:///{tmp_path / 'flowsdk.db'}" if kind == "sqlite" else "memory://"
    with collector_off() as new_actions:
        run = flowsdk.run(root, 10, store=store)
        assert run.result() == [5, 10]
        assert Counter(phases(run).values()) == {"SUCCEEDED": 6, "FAILED": 5, "ABORTED": 10}
        assert new_actions() == 21
        del run
        assert new_actions() == 0


def test_the_futures_gather_holds_for_calls_carry_no_instance_dictionary() -> None:
    """Each child of a fan-out adds no dictionary for the garbage collector to count and walk.

    `gather` marks every future it made from a coroutine (`_log_destroy_pending`);
    on a plain asyncio future that attribute makes a dictionary per child.
    """
    env = flowsdk.TaskEnvironment("s11")
    held: list[list[object]] = []

    @env.task
    async def child(i: int) -> int:
        await asyncio.sleep(0)
        return i

    @env.task
    async def root(n: int) -> list[int]:
        g = asyncio.gather(*(child(i) for i in range(n)))
        held.append([type(r) for f in g._children for r in gc.get_referents(f)])  # type: ignore[attr-defined]
        return list(await g)

    run = flowsdk.run(root, 5, store="memory://")
    assert run.result() == [0, 1, 2, 3, 4]
    assert held[0]  # the futures were looked into (their loop, at least)
    assert dict not in held[0]
