"""Cancellation inside children: swallowed, slow, interrupted or replaced cancels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

import flowsdk
from flowsdk import EventKind, RunHandle, RunPhase
from flowsdk.errors import ActionAbortedError, RuntimeUserError
from flowsdk.testing import Gate, start_and_control
from tests.support import assert_clean, causes, phases


def _warnings(run: flowsdk.Run[Any], action: str) -> list[str]:
    return [
        e.message or "" for e in run.events if e.kind is EventKind.WARNING and e.action == action
    ]


def _cancelling() -> int:
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling()


def test_child_swallowing_cancellation_is_abandoned_after_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A child that swallows every CancelledError is given up on; run() returns."""
    env = flowsdk.TaskEnvironment("c1")
    running = Gate()
    swallowed: list[int] = []

    @env.task(grace_period=0.05)
    async def zombie() -> None:
        while True:
            try:
                await running.enter()
            except asyncio.CancelledError:
                swallowed.append(1)

    @env.task
    async def root() -> int:
        asyncio.create_task(zombie())  # noqa: RUF006 -- dropped on purpose
        await running.wait_running()
        return 42

    with caplog.at_level(logging.WARNING, logger="flowsdk"):
        run: flowsdk.Run[Any] = flowsdk.run(root)
    assert run.result() == 42
    record = run.action("a1")
    assert record.phase.value == "ABORTED"
    assert causes(run)["a1"] == "root_exit"
    assert record.cleanup_incomplete is True
    assert not run.action("a0").cleanup_incomplete
    warnings = _warnings(run, "a1")
    assert len(warnings) == 2  # the second cancel (with the stack), then the abandon
    assert "cancelling it again" in warnings[0]
    assert "in zombie" in warnings[0]  # the stack shows where the body is stuck
    assert "cleanup_incomplete" in warnings[1]
    assert len(swallowed) == 2  # at most two cancel deliveries (bounded teardown)
    assert any(r.name == "flowsdk" and "a1" in r.getMessage() for r in caplog.records)
    assert_clean(run)


async def test_aborted_child_swallowing_cancellation_is_abandoned() -> None:
    """The abort target that swallows cancellation ends ABORTED(external), incomplete."""
    env = flowsdk.TaskEnvironment("c1b")
    running = Gate()
    zombie_tasks: list[asyncio.Task[Any]] = []
    keep_going = [True]

    @env.task(grace_period=0.05)
    async def zombie() -> None:
        task = asyncio.current_task()
        assert task is not None
        zombie_tasks.append(task)
        while keep_going[0]:
            with contextlib.suppress(asyncio.CancelledError):
                await running.enter()

    @env.task
    async def root() -> str:
        try:
            await zombie()
        except ActionAbortedError as exc:
            return exc.action
        return "not aborted"

    run, _ = await start_and_control(
        root, when=running, control=lambda h: h.abort("a1", reason="C1")
    )
    try:
        assert run.result() == "a1"
        assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
        assert causes(run)["a1"] == "external"
        assert run.action("a1").cleanup_incomplete is True
        assert len(_warnings(run, "a1")) == 2
        assert_clean(run)
    finally:
        # The zombie is still running on this loop: end it so no task is left pending.
        keep_going[0] = False
        [task] = zombie_tasks
        task.cancel()
        await asyncio.wait([task])


async def test_slow_honest_cleanup_is_not_cancelled_again_within_grace() -> None:
    """A cleanup awaiting an event set later finishes; only one cancel is delivered."""
    env = flowsdk.TaskEnvironment("c2")
    running, cleanup = Gate("running"), Gate("cleanup")
    cleanups: list[int] = []
    finished: list[bool] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except asyncio.CancelledError:
            cleanups.append(_cancelling())
            await cleanup.enter()
            finished.append(True)
            raise

    @env.task
    async def root() -> int:
        asyncio.create_task(child())  # noqa: RUF006 -- dropped on purpose
        await running.wait_running()
        return 42

    handle = await flowsdk.start(root)
    await cleanup.wait_running()
    for _ in range(5):
        await asyncio.sleep(0)
    assert handle.phase is RunPhase.RUNNING  # teardown waits for the cleanup
    cleanup.release()
    run = await handle.wait()

    assert run.result() == 42
    assert cleanups == [1]
    assert finished == [True]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "root_exit"
    assert run.action("a1").cleanup_incomplete is False
    assert _warnings(run, "a1") == []
    assert_clean(run)


def test_cleanup_longer_than_grace_is_interrupted_by_second_cancel() -> None:
    """Past grace_period the second cancel interrupts the cleanup (cleanup incomplete)."""
    env = flowsdk.TaskEnvironment("c2b")
    running, never = Gate(), asyncio.Event()
    interrupted: list[int] = []
    finished: list[bool] = []

    @env.task(grace_period=0.05)
    async def child() -> None:
        try:
            await running.enter()
        except asyncio.CancelledError:
            try:
                await never.wait()
            except asyncio.CancelledError:
                interrupted.append(_cancelling())
                raise
            finished.append(True)
            raise

    @env.task
    async def root() -> int:
        asyncio.create_task(child())  # noqa: RUF006 -- dropped on purpose
        await running.wait_running()
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    assert interrupted == [2]
    assert finished == []
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "root_exit"
    assert run.action("a1").cleanup_incomplete is True
    [warning] = _warnings(run, "a1")
    assert "cancelling it again" in warning
    assert_clean(run)


async def test_root_finally_slow_cleanup_finishes_within_grace() -> None:
    """An aborted root's own `finally` awaiting an event set later runs to its end."""
    env = flowsdk.TaskEnvironment("c2c")
    running, cleanup = Gate("running"), Gate("cleanup")
    finished: list[bool] = []

    @env.task
    async def root() -> None:
        try:
            await running.enter()
        finally:
            await cleanup.enter()
            finished.append(True)

    handle = await flowsdk.start(root)
    await running.wait_running()
    await handle.abort(reason="C2 root")
    await cleanup.wait_running()
    for _ in range(5):
        await asyncio.sleep(0)
    assert handle.phase is RunPhase.RUNNING
    cleanup.release()
    run = await handle.wait()

    assert finished == [True]
    assert run.phase is RunPhase.ABORTED
    assert phases(run) == {"a0": "ABORTED"}
    assert causes(run)["a0"] == "external"
    assert run.action("a0").cleanup_incomplete is False
    assert _warnings(run, "a0") == []
    assert_clean(run)


def test_root_exit_interrupts_finally_of_child_cancelled_by_parent() -> None:
    """A parent's t.cancel() starts a child's finally; the root's exit interrupts that finally."""
    env = flowsdk.TaskEnvironment("c3")
    running, in_finally, never = Gate(), asyncio.Event(), asyncio.Event()
    interrupted: list[int] = []
    finished: list[bool] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        finally:
            in_finally.set()
            try:
                await never.wait()
            except asyncio.CancelledError:
                interrupted.append(_cancelling())
                raise
            finished.append(True)

    @env.task
    async def root() -> int:
        t = asyncio.create_task(child())
        await running.wait_running()
        t.cancel()
        await in_finally.wait()
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    assert interrupted == [2]
    assert finished == []
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "cancelled"
    # The root's exit interrupted the finally, not the grace period's second cancel.
    assert _warnings(run, "a1") == []
    assert_clean(run)


def test_root_returning_right_after_cancelling_a_child_lets_its_cleanup_run() -> None:
    """`t.cancel(); return`: the child gets one cancel, its cleanup runs whole.

    The root's exit comes before the body has woken from the cancel: it is
    not a cleanup to interrupt (no second cancel, no `cleanup_incomplete`).
    """
    env = flowsdk.TaskEnvironment("c3b")
    running = Gate()
    cleanup: list[str] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except asyncio.CancelledError as exc:
            cleanup.append(str(exc))
            await asyncio.sleep(0)  # a cleanup that awaits
            cleanup.append("done")
            raise

    @env.task
    async def root() -> int:
        t = asyncio.create_task(child())
        await running.wait_running()
        t.cancel("enough")
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    assert cleanup == ["flowsdk: cancelled by workflow code (cancelled): enough", "done"]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "cancelled"
    assert run.action("a1").cleanup_incomplete is False
    assert _warnings(run, "a1") == []
    assert_clean(run)


def test_cleanup_raising_after_parent_cancel_fails_child() -> None:
    """A cleanup doing `except CancelledError: raise ValueError` fails the child; parent sees it."""
    env = flowsdk.TaskEnvironment("c4")
    running = Gate()
    error = ValueError("cleanup failed")
    seen: list[BaseException] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except asyncio.CancelledError:
            raise error from None

    @env.task
    async def root() -> int:
        t = asyncio.create_task(child())
        await running.wait_running()
        t.cancel()
        try:
            await t
        except BaseException as exc:  # record exactly what the parent gets
            seen.append(exc)
        assert _cancelling() == 0
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    [exc] = seen
    assert isinstance(exc, RuntimeUserError)
    assert exc.__cause__ is error
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "FAILED"}
    assert run.action("a1").error is not None
    assert run.action("a1").error.type == "ValueError"  # type: ignore[union-attr]
    assert_clean(run)


def test_cleanup_raising_at_root_exit_fails_child_and_warns() -> None:
    """The same cleanup during root teardown: child FAILED, run SUCCEEDED, warning."""
    env = flowsdk.TaskEnvironment("c4b")
    running = Gate()

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except asyncio.CancelledError:
            raise ValueError("cleanup failed") from None

    @env.task
    async def root() -> int:
        asyncio.create_task(child())  # noqa: RUF006 -- dropped on purpose
        await running.wait_running()
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    assert run.phase is RunPhase.SUCCEEDED
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "FAILED"}
    [warning] = _warnings(run, "a1")
    assert "ValueError" in warning
    assert_clean(run)


def test_parent_cancelling_one_child_sees_cancelled_error_and_continues() -> None:
    """A parent's `t.cancel(); await t` gives CancelledError; sibling untouched; cancelling() 0."""
    env = flowsdk.TaskEnvironment("c5")
    running, sibling_go = Gate(), asyncio.Event()
    cleanups: list[int] = []
    seen: list[str] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except asyncio.CancelledError:
            cleanups.append(1)
            raise

    @env.task
    async def sibling() -> str:
        await sibling_go.wait()
        return "sibling done"

    @env.task
    async def root() -> str:
        s = asyncio.create_task(sibling())
        t = asyncio.create_task(child())
        await running.wait_running()
        t.cancel()
        try:
            await t
        except asyncio.CancelledError:
            seen.append("cancelled")
        except ActionAbortedError:
            seen.append("aborted")
        assert _cancelling() == 0
        sibling_go.set()
        return await s

    run = flowsdk.run(root)
    assert run.result() == "sibling done"
    assert seen == ["cancelled"]
    assert cleanups == [1]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED", "a2": "ABORTED"}
    assert causes(run) == {"a0": None, "a1": None, "a2": "cancelled"}
    assert_clean(run)


def test_second_cancel_of_the_awaiter_stops_its_wait_for_the_cleanup() -> None:
    """Once the body is in its cleanup, a second `t.cancel()` ends `t`; the cleanup runs on.

    The first cancel reaches the body at once; `t` waits for the action to end.
    The second stops that wait (asyncio would interrupt the cleanup instead:
    flowsdk leaves a cleanup its grace period). The action is recorded when
    its cleanup ends.
    """
    env = flowsdk.TaskEnvironment("c5b")
    running, in_cleanup, finish_cleanup = Gate(), asyncio.Event(), asyncio.Event()
    seen: list[Any] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        finally:
            in_cleanup.set()
            await finish_cleanup.wait()

    @env.task
    async def root() -> str:
        t = asyncio.create_task(child())
        await running.wait_running()
        t.cancel()
        await in_cleanup.wait()
        t.cancel()
        try:
            await t
        except asyncio.CancelledError:
            seen.append(("cancelled", in_cleanup.is_set(), finish_cleanup.is_set()))
        finish_cleanup.set()
        return "done"

    run = flowsdk.run(root)
    assert run.result() == "done"
    assert seen == [("cancelled", True, False)]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run) == {"a0": None, "a1": "cancelled"}
    assert_clean(run)


def test_child_cancelled_before_first_step_never_runs() -> None:
    """`t = create_task(child()); t.cancel()` in one tick: no body, as in asyncio, no warning.

    The call's action exists from `create_task` on (its body would start on the
    loop's next step, as the coroutine would): it ends ABORTED, cause `cancelled`,
    its body never run.
    """
    env = flowsdk.TaskEnvironment("c6")
    body_ran: list[bool] = []
    seen: list[str] = []

    @env.task
    async def child() -> None:
        body_ran.append(True)

    @env.task
    async def root() -> int:
        t = asyncio.create_task(child())
        t.cancel()
        try:
            await t
        except asyncio.CancelledError:
            seen.append("cancelled")
        assert _cancelling() == 0
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    assert body_ran == []
    assert seen == ["cancelled"]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run) == {"a0": None, "a1": "cancelled"}
    assert [e.phase for e in run.events if e.action == "a1"] == ["QUEUED", "ABORTED"]
    assert_clean(run)


def test_shielded_child_outlives_cancelled_parent_until_root_exit() -> None:
    """A child behind asyncio.shield keeps running after its parent is cancelled."""
    env = flowsdk.TaskEnvironment("c7")
    child_started, proceed, child_alive = asyncio.Event(), asyncio.Event(), asyncio.Event()
    parent_saw: list[str] = []
    cleanups: list[int] = []

    @env.task
    async def child() -> None:
        child_started.set()
        await proceed.wait()
        child_alive.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cleanups.append(1)
            raise

    @env.task
    async def parent() -> None:
        try:
            await asyncio.shield(child())
        except asyncio.CancelledError:
            parent_saw.append("cancelled")
            raise

    @env.task
    async def root() -> int:
        p = asyncio.create_task(parent())
        await child_started.wait()
        p.cancel()
        with pytest.raises(asyncio.CancelledError):
            await p
        proceed.set()
        await child_alive.wait()  # the child still runs after its parent ended
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    assert parent_saw == ["cancelled"]
    assert cleanups == [1]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED", "a2": "ABORTED"}
    assert causes(run) == {"a0": None, "a1": "cancelled", "a2": "root_exit"}
    assert run.action("a2").parent == "a1"
    assert_clean(run)


def test_raw_task_outliving_its_action_is_cancelled_at_run_end() -> None:
    """A plain asyncio task started by a child and dropped is cancelled; no record."""
    env = flowsdk.TaskEnvironment("c8")
    raw_started = asyncio.Event()
    cleanups: list[int] = []

    async def raw() -> None:
        raw_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cleanups.append(1)
            raise

    @env.task
    async def child() -> None:
        asyncio.create_task(raw())  # noqa: RUF006 -- dropped on purpose
        await raw_started.wait()

    @env.task
    async def root() -> int:
        await child()
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    assert cleanups == [1]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED"}
    assert_clean(run)


async def test_raw_task_outliving_its_action_is_cancelled_or_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With run_async: the survivor is cancelled at root exit, or at least named in a warning."""
    env = flowsdk.TaskEnvironment("c8b")
    raw_started = asyncio.Event()
    raw_tasks: list[asyncio.Task[Any]] = []
    cleanups: list[int] = []

    async def raw_survivor() -> None:
        raw_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cleanups.append(1)
            raise

    @env.task
    async def child() -> None:
        raw_tasks.append(asyncio.create_task(raw_survivor()))
        await raw_started.wait()

    @env.task
    async def root() -> int:
        await child()
        return 42

    with caplog.at_level(logging.WARNING, logger="flowsdk"):
        run = await flowsdk.run_async(root)
    [task] = raw_tasks
    for _ in range(3):
        await asyncio.sleep(0)
    cancelled = task.done()
    named = any("raw_survivor" in r.getMessage() for r in caplog.records if r.name == "flowsdk")
    task.cancel()  # whatever the SDK did, leave no task pending
    await asyncio.wait([task])
    assert cancelled or named, "the raw task was neither cancelled nor named in a warning"
    if cancelled:
        assert cleanups == [1]
    assert run.result() == 42
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED"}
    assert_clean(run)


async def test_abort_of_lock_waiter_in_release_tick_passes_lock_on() -> None:
    """A lock waiter B is aborted in the tick holder A releases it; waiter C gets it, B ABORTED."""
    env = flowsdk.TaskEnvironment("c9")
    lock = asyncio.Lock()
    holding, b_queued, c_queued = asyncio.Event(), asyncio.Event(), asyncio.Event()
    acquired: list[str] = []
    handles: list[RunHandle[Any]] = []
    abort_results: list[str] = []

    @env.task
    async def holder() -> None:
        await lock.acquire()
        holding.set()
        await c_queued.wait()
        lock.release()
        # Same tick as the release: B's acquire has been granted but B has not run.
        result = await handles[0].abort("a2", reason="C9")
        abort_results.append(result.outcome)

    @env.task
    async def waiter_b() -> None:
        b_queued.set()
        async with lock:
            acquired.append("b")

    @env.task
    async def waiter_c() -> str:
        c_queued.set()
        async with lock:
            acquired.append("c")
        return "c has the lock"

    @env.task
    async def root() -> str:
        a = asyncio.create_task(holder())
        await holding.wait()
        b = asyncio.create_task(waiter_b())
        await b_queued.wait()
        c = asyncio.create_task(waiter_c())
        await a
        with pytest.raises(ActionAbortedError):
            await b
        return await c

    handles.append(await flowsdk.start(root))
    run = await handles[0].wait()

    assert run.result() == "c has the lock"
    assert abort_results == ["applied"]
    assert acquired == ["c"]
    assert not lock.locked()
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED", "a2": "ABORTED", "a3": "SUCCEEDED"}
    assert causes(run)["a2"] == "external"
    assert_clean(run)


def test_a_caller_cancelled_again_waits_no_longer_than_the_abandon_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cleanup that swallows the second cancel too is waited for `ABANDON_AFTER`, no longer.

    The caller's second cancel interrupts the cleanup its first began (as in
    asyncio) and arms the same bounded wait as a grace period's second cancel:
    the body is then recorded, incomplete, and the caller gets `CancelledError`.
    """
    from flowsdk import _delivery

    monkeypatch.setattr(_delivery, "ABANDON_AFTER", 0.05)
    env = flowsdk.TaskEnvironment("c10")
    running, in_cleanup = Gate(), asyncio.Event()
    swallowed: list[int] = []
    keep_going = [True]

    @env.task(grace_period=3600)  # only the caller's second cancel may end the wait
    async def stubborn() -> None:
        try:
            await running.enter()
        finally:
            in_cleanup.set()
            while keep_going[0]:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    swallowed.append(1)

    @env.task
    async def root() -> list[Any]:
        t = asyncio.create_task(stubborn())
        await running.wait_running()
        t.cancel()
        await in_cleanup.wait()
        t.cancel()
        [outcome] = await asyncio.gather(t, return_exceptions=True)
        keep_going[0] = False  # the abandoned body may end now (the root's exit cancels it)
        return [type(outcome).__name__, list(swallowed)]

    run = flowsdk.run(root)
    assert run.result() == ["CancelledError", [1]]  # one cancel passed on, then abandoned
    record = run.action("a1")
    assert record.phase.value == "ABORTED"
    assert causes(run)["a1"] == "cancelled"
    assert record.cleanup_incomplete is True
    assert any("no longer waited for" in w for w in _warnings(run, "a1"))


async def test_under_an_operators_abort_the_callers_second_cancel_stops_its_wait() -> None:
    """An abort's cleanup keeps its grace period: the caller cancelled twice waits no more.

    The cleanup is not interrupted by the caller (it was not the caller's
    cancel that began it) and finishes whole, recorded complete.
    """
    env = flowsdk.TaskEnvironment("c11")
    running, cleanup = Gate("running"), Gate("cleanup")
    finished: list[bool] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        finally:
            await cleanup.enter()
            finished.append(True)

    @env.task
    async def root() -> list[Any]:
        t = asyncio.create_task(child())
        await cleanup.wait_running()  # aborted by the operator: its cleanup runs
        t.cancel()
        t.cancel()
        [outcome] = await asyncio.gather(t, return_exceptions=True)
        ended_before = list(finished)
        cleanup.release()
        return [type(outcome).__name__, ended_before]

    run, _ = await start_and_control(
        root, when=running, control=lambda h: h.abort("a1", reason="operator")
    )
    assert run.result() == ["CancelledError", []]
    assert finished == [True]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "external"
    assert run.action("a1").cleanup_incomplete is False
    assert_clean(run)
