"""Root lifetime: every action is bound to its run's root."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import flowsdk
from flowsdk import ControlResult, EventKind, RunPhase
from flowsdk.errors import ActionAbortedError, RunClosedError, RuntimeUserError
from flowsdk.testing import Gate, start_and_control
from tests.support import assert_clean, by_task, causes, phases


def test_root_return_cancels_pending_child_and_waits_for_its_handler() -> None:
    """Root returns 42 with a pending child; the child's handler runs once, to its end."""
    env = flowsdk.TaskEnvironment("r1")
    running = Gate()
    handled: list[int] = []
    finished: list[bool] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            handled.append(task.cancelling())
            for _ in range(3):  # a cleanup that takes a few loop steps
                await asyncio.sleep(0)
            finished.append(True)
            raise

    @env.task
    async def root() -> int:
        asyncio.create_task(child())  # noqa: RUF006 -- dropped on purpose
        await running.wait_running()
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    assert run.phase is RunPhase.SUCCEEDED
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run) == {"a0": None, "a1": "root_exit"}
    assert handled == [1]
    assert finished == [True]
    assert_clean(run)


def test_root_raise_cancels_sleeping_busy_and_queued_children() -> None:
    """Root raises ValueError; sleeping, busy and still-QUEUED children all end ABORTED."""
    env = flowsdk.TaskEnvironment("r2")
    sleeping, busy = asyncio.Event(), asyncio.Event()
    handled: list[str] = []
    queued_ran: list[bool] = []
    error = ValueError("root failed")

    @env.task
    async def sleeper() -> None:
        sleeping.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            handled.append("sleeper")
            raise

    @env.task
    async def spinner() -> None:
        busy.set()
        try:
            while True:
                sum(range(1000))  # CPU work, yielding between rounds
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            handled.append("spinner")
            raise

    @env.task
    async def queued() -> None:
        queued_ran.append(True)

    @env.task
    async def root() -> None:
        asyncio.create_task(sleeper())  # noqa: RUF006 -- dropped on purpose
        asyncio.create_task(spinner())  # noqa: RUF006 -- dropped on purpose
        await sleeping.wait()
        await busy.wait()
        asyncio.create_task(queued())  # noqa: RUF006 -- dropped on purpose
        # The call's action (a3) is QUEUED from `create_task` on; its body would run
        # on the loop's next step, which never comes.
        raise error

    run = flowsdk.run(root)
    assert run.phase is RunPhase.FAILED
    assert phases(run) == {"a0": "FAILED", "a1": "ABORTED", "a2": "ABORTED", "a3": "ABORTED"}
    assert causes(run) == {"a0": None, "a1": "root_exit", "a2": "root_exit", "a3": "root_exit"}
    assert sorted(handled) == ["sleeper", "spinner"]
    assert queued_ran == []
    a3_phases = [e.phase for e in run.events if e.kind is EventKind.ACTION and e.action == "a3"]
    assert a3_phases == ["QUEUED", "ABORTED"]
    with pytest.raises(RuntimeUserError) as info:
        run.result()
    assert info.value.__cause__ is error
    assert_clean(run)


async def test_external_abort_of_root_aborts_all_descendants() -> None:
    """Aborting the root aborts five children and five grandchildren (cause ancestor)."""
    env = flowsdk.TaskEnvironment("r3")
    gate = Gate()
    started: list[str] = []
    handled: list[str] = []

    async def hold(who: str) -> None:
        started.append(who)
        try:
            await gate.enter()
        except asyncio.CancelledError:
            handled.append(who)
            raise

    @env.task
    async def grandchild(i: int) -> None:
        await hold(f"grandchild {i}")

    @env.task
    async def child(i: int) -> None:
        asyncio.create_task(grandchild(i))  # noqa: RUF006 -- dropped on purpose
        await hold(f"child {i}")

    @env.task
    async def root() -> None:
        await asyncio.gather(*(child(i) for i in range(5)))

    run, result = await start_and_control(
        root, when=lambda: gate.wait_running(10), control=lambda h: h.abort(reason="R3")
    )
    assert result.outcome == "applied"

    assert run.phase is RunPhase.ABORTED
    assert len(run.actions) == 11
    assert set(phases(run).values()) == {"ABORTED"}
    assert causes(run)["a0"] == "external"
    assert {causes(run)[a.name] for a in run.actions[1:]} == {"ancestor"}
    assert run.action("a0").abort is not None
    assert run.action("a0").abort.reason == "R3"  # type: ignore[union-attr]
    assert sorted(handled) == sorted(started)
    assert len(handled) == 10
    with pytest.raises(ActionAbortedError):
        run.result()
    assert_clean(run)


@pytest.mark.parametrize("request_", ["abort", "abort a1", "abort group", "mark_failed a1"])
async def test_abort_during_teardown_changes_nothing(request_: str) -> None:
    """A request arriving after the root returned (teardown under way) says 'finishing'.

    Whatever it names: the run, one action, a group, or a mark-failed. The
    child keeps its `root_exit` record (SCENARIOS R3).
    """
    env = flowsdk.TaskEnvironment("r3b")
    running, cleanup = Gate("running"), Gate("cleanup")

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except asyncio.CancelledError:
            await cleanup.enter()
            raise

    @env.task
    async def root() -> int:
        with flowsdk.group("late"):
            asyncio.create_task(child())  # noqa: RUF006 -- dropped on purpose
        await running.wait_running()
        return 42

    async def abort_too_late(handle: flowsdk.RunHandle[int]) -> ControlResult:
        if request_ == "abort":
            result = await handle.abort(reason="too late")
        elif request_ == "abort a1":
            result = await handle.abort("a1", reason="too late")
        elif request_ == "abort group":
            result = await handle.abort(group="late", reason="too late")
        else:
            result = await handle.mark_failed("a1", reason="too late")
        cleanup.release()
        return result

    run, result = await start_and_control(root, when=cleanup, control=abort_too_late)
    assert result.outcome == "already_ended"
    assert "finishing" in result.message

    assert run.result() == 42
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run) == {"a0": None, "a1": "root_exit"}
    assert not [e for e in run.events if e.kind is EventKind.REQUEST]
    assert_clean(run)


def test_grandchild_called_in_the_step_before_the_root_exits_never_runs() -> None:
    """R4: a grandchild's task is made in the loop step before the root's exit.

    Its action exists from `create_task` on, QUEUED; the root's exit comes before
    the body's first step, so it ends ABORTED (`root_exit`) unrun, no warning.
    """
    env = flowsdk.TaskEnvironment("r4")
    gate = asyncio.Event()
    child_waiting = asyncio.Event()
    body_ran: list[bool] = []

    @env.task
    async def grandchild() -> None:
        body_ran.append(True)

    @env.task
    async def child() -> None:
        child_waiting.set()
        await gate.wait()
        # Same tick as the root's exit: the root's wake-up is queued before
        # this call's body's first step.
        asyncio.create_task(grandchild())  # noqa: RUF006 -- dropped on purpose
        await asyncio.sleep(3600)

    @env.task
    async def root() -> int:
        asyncio.create_task(child())  # noqa: RUF006 -- dropped on purpose
        await child_waiting.wait()
        # The child and then the root wait on the gate; one set wakes both, in that order.
        asyncio.get_running_loop().call_soon(gate.set)
        await gate.wait()
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    assert body_ran == []
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED", "a2": "ABORTED"}
    assert causes(run) == {"a0": None, "a1": "root_exit", "a2": "root_exit"}
    assert [e.phase for e in run.events if e.action == "a2"] == ["QUEUED", "ABORTED"]
    assert_clean(run)


def test_grandchild_queued_at_root_exit_never_runs() -> None:
    """A grandchild whose action exists but whose body has not started is ABORTED unrun."""
    env = flowsdk.TaskEnvironment("r4b")
    gate, root_gate = asyncio.Event(), asyncio.Event()
    child_waiting = asyncio.Event()
    body_ran: list[bool] = []

    @env.task
    async def grandchild() -> None:
        body_ran.append(True)

    @env.task
    async def child() -> None:
        child_waiting.set()
        await gate.wait()
        # The root wakes (its wake-up queued first) after the grandchild's call
        # starts its action and before the grandchild's body gets its first step.
        root_gate.set()
        asyncio.create_task(grandchild())  # noqa: RUF006 -- dropped on purpose
        await asyncio.sleep(3600)

    @env.task
    async def root() -> int:
        asyncio.create_task(child())  # noqa: RUF006 -- dropped on purpose
        await child_waiting.wait()
        gate.set()
        await root_gate.wait()
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    assert body_ran == []
    [record] = by_task(run, ".grandchild")
    assert record.phase.value == "ABORTED"
    assert record.abort is not None
    assert record.abort.cause.value == "root_exit"
    events = [e.phase for e in run.events if e.kind is EventKind.ACTION and e.action == record.name]
    assert events == ["QUEUED", "ABORTED"]
    assert_clean(run)


def test_task_call_in_root_exit_cleanup_raises_run_closed() -> None:
    """Calling a task in a handler after the root exited raises RunClosedError at once."""
    env = flowsdk.TaskEnvironment("r5")
    running = Gate()
    refused: list[RunClosedError] = []

    @env.task
    async def notify() -> None:
        pass

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except asyncio.CancelledError:
            try:
                await notify()
            except RunClosedError as exc:
                refused.append(exc)
            raise

    @env.task
    async def root() -> int:
        asyncio.create_task(child())  # noqa: RUF006 -- dropped on purpose
        await running.wait_running()
        return 42

    run = flowsdk.run(root)
    assert run.result() == 42
    [exc] = refused
    assert isinstance(exc, RuntimeError)
    assert run.name in str(exc)
    assert "r5.notify" in str(exc)
    assert by_task(run, ".notify") == []
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "root_exit"
    assert_clean(run)


def test_root_exit_cleanup_raising_oserror_fails_child_not_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A child's root-exit cleanup raises OSError: child FAILED, run SUCCEEDED, warned."""
    env = flowsdk.TaskEnvironment("r6")
    running = Gate()
    cleanups: list[int] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except asyncio.CancelledError:
            cleanups.append(1)
            raise OSError("disk gone during cleanup") from None

    @env.task
    async def root() -> int:
        asyncio.create_task(child())  # noqa: RUF006 -- dropped on purpose
        await running.wait_running()
        return 42

    with caplog.at_level(logging.WARNING, logger="flowsdk"):
        run: flowsdk.Run[Any] = flowsdk.run(root)
    assert run.result() == 42
    assert run.phase is RunPhase.SUCCEEDED
    assert cleanups == [1]
    record = run.action("a1")
    assert record.phase.value == "FAILED"
    assert record.error is not None
    assert record.error.type == "OSError"
    assert "disk gone" in record.error.message
    # The record says the failure happened while it was being cancelled.
    assert record.abort is not None
    assert record.abort.cause.value == "root_exit"
    warnings = [e for e in run.events if e.kind is EventKind.WARNING and e.action == "a1"]
    assert len(warnings) == 1
    assert "OSError" in (warnings[0].message or "")
    assert any("OSError" in r.getMessage() and "a1" in r.getMessage() for r in caplog.records)
    assert_clean(run)
