"""In-process control of a live run through `RunHandle`: abort, stop, mark failed (SPEC §1, §3)."""

from __future__ import annotations

import asyncio
import contextlib
from asyncio import CancelledError

import pytest

import flowsdk
from flowsdk import ActionPhase, ControlResult, EventKind, RunPhase
from flowsdk.errors import (
    ActionAbortedError,
    ActionMarkedFailedError,
    ActionNotFoundError,
    RunStoppedError,
    RunStoppingError,
    RuntimeUserError,
    TaskTimeoutError,
)
from flowsdk.testing import Gate, start_and_control
from tests.support import assert_clean, by_task, causes, phases

# -- abort of one action ---------------------------------------------------------------


async def test_abort_of_awaited_child_gives_parent_action_aborted_error() -> None:
    """The named child is ABORTED (external) and its awaiting parent gets ActionAbortedError."""
    env = flowsdk.TaskEnvironment("x1")
    gate = Gate()
    seen: list[ActionAbortedError] = []

    @env.task
    async def child() -> int:
        await gate.enter()
        return 1

    @env.task
    async def root() -> str:
        try:
            await asyncio.create_task(child())
        except ActionAbortedError as exc:
            seen.append(exc)
        return "done"

    run, result = await start_and_control(
        root, when=gate, control=lambda h: h.abort("a1", reason="not needed")
    )
    assert result.outcome == "applied"
    assert run.result() == "done"
    [exc] = seen
    assert (exc.run, exc.action, exc.reason, exc.cause) == (
        run.name,
        "a1",
        "not needed",
        "external",
    )
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    abort = run.action("a1").abort
    assert abort is not None
    assert (abort.cause.value, abort.reason) == ("external", "not needed")
    assert abort.requested_by
    [request] = [e for e in run.events if e.kind is EventKind.REQUEST]
    assert (request.action, request.reason) == ("a1", "not needed")
    assert request.requested_by == abort.requested_by
    assert_clean(run)


async def test_abort_of_queued_action_never_runs_its_body() -> None:
    """An action aborted before its body's first step is ABORTED and its body never runs."""
    env = flowsdk.TaskEnvironment("x1q")
    ran: list[str] = []
    handles: list[flowsdk.RunHandle[str]] = []

    @env.task
    async def child() -> None:
        ran.append("child")

    @env.task
    async def root() -> str:
        pending = asyncio.create_task(child())  # a1, QUEUED: its body runs on the next step
        await handles[0].abort("a1")
        try:
            await pending
        except ActionAbortedError:
            return "aborted"
        return "ran"

    handle = await flowsdk.start(root)
    handles.append(handle)
    run = await handle.wait()
    assert run.result() == "aborted"
    assert ran == []
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "external"
    assert "RUNNING" not in [e.phase for e in run.events if e.action == "a1"]
    assert_clean(run)


async def test_abort_of_directly_awaited_child_leaves_parent_cancelling_count_alone() -> None:
    """After `await child()` raised ActionAbortedError, asyncio.timeout still times out."""
    env = flowsdk.TaskEnvironment("x9")
    gate = Gate()
    counts: list[int] = []

    @env.task
    async def child() -> int:
        await gate.enter()
        return 1

    @env.task
    async def root() -> str:
        me = asyncio.current_task()
        assert me is not None
        try:
            await child()
        except ActionAbortedError:
            counts.append(me.cancelling())
        try:
            async with asyncio.timeout(0.01):  # the timeout is the behaviour under test
                await asyncio.sleep(3600)
        except TimeoutError:
            return "timed out"
        return "not reached"

    run, _ = await start_and_control(root, when=gate, control=lambda h: h.abort("a1"))
    assert run.result() == "timed out"
    assert counts == [0]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert_clean(run)


@pytest.mark.parametrize("yields", range(6))
async def test_abort_racing_completion_ends_in_one_phase_the_parent_sees(yields: int) -> None:
    """Abort racing the return: whichever wins, there is one terminal phase, the parent agrees."""
    env = flowsdk.TaskEnvironment("x3")
    gate = Gate()
    seen: list[object] = []

    @env.task
    async def child() -> int:
        await gate.enter()
        return 7

    @env.task
    async def root() -> None:
        try:
            seen.append(await child())
        except ActionAbortedError as exc:
            seen.append(exc)

    async def release_then_abort(handle: flowsdk.RunHandle[None]) -> ControlResult:
        gate.release()
        for _ in range(yields):
            await asyncio.sleep(0)
        return await handle.abort("a1")

    run, result = await start_and_control(root, when=gate, control=release_then_abort)
    record = run.action("a1")
    if record.phase is ActionPhase.SUCCEEDED:
        assert result.outcome == "already_ended"
        assert "already finished: SUCCEEDED" in result.message
        assert seen == [7]
    else:
        assert record.phase is ActionPhase.ABORTED
        assert causes(run)["a1"] == "external"
        assert result.outcome == "applied"
        assert len(seen) == 1
        assert isinstance(seen[0], ActionAbortedError)
    # Released and aborted in the same step: the body has not returned, so the abort wins.
    # Many steps later the body has long returned, so the return wins.
    if yields == 0:
        assert record.phase is ActionPhase.ABORTED
    if yields == 5:
        assert record.phase is ActionPhase.SUCCEEDED
    assert run.phase is RunPhase.SUCCEEDED
    assert_clean(run)


async def test_abort_of_ended_actions_changes_nothing_and_says_so_twice_alike() -> None:
    """Aborting a SUCCEEDED, FAILED or ABORTED action is idempotent and names its phase."""
    env = flowsdk.TaskEnvironment("x4")
    gate = Gate()

    @env.task
    async def ok() -> int:
        return 1

    @env.task
    async def bad() -> None:
        raise ValueError("bad")

    @env.task
    async def slow() -> None:
        await asyncio.sleep(3600)

    @env.task
    async def root() -> None:
        await ok()
        with contextlib.suppress(RuntimeUserError):
            await bad()
        pending = asyncio.create_task(slow())
        await asyncio.sleep(0)  # let the call start a3
        pending.cancel()
        with contextlib.suppress(CancelledError):
            await pending
        await gate.enter()

    handle = await flowsdk.start(root)
    await gate.wait_running()
    for name, phase in [("a1", "SUCCEEDED"), ("a2", "FAILED"), ("a3", "ABORTED")]:
        first = await handle.abort(name)
        second = await handle.abort(name)
        assert (first.outcome, first.phase) == ("already_ended", phase)
        assert f"action {name} of run" in first.message
        assert first.message.endswith(f"already finished: {phase}")
        assert second.as_dict() == first.as_dict()
    gate.release()
    run = await handle.wait()
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED", "a2": "FAILED", "a3": "ABORTED"}
    assert causes(run)["a3"] == "cancelled"
    after = await handle.abort()
    assert (after.outcome, after.phase) == ("already_ended", "SUCCEEDED")
    assert (await handle.abort("a0")).outcome == "already_ended"
    assert_clean(run)


async def test_double_abort_makes_one_transition_and_one_cancel() -> None:
    """A second abort reports the first; the body sees exactly one CancelledError."""
    env = flowsdk.TaskEnvironment("x6")
    running, cleanup = Gate("running"), Gate("cleanup")
    seen: list[str] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except CancelledError:
            seen.append("first")
            try:
                await cleanup.enter()
            except CancelledError:
                seen.append("second")
                raise
            raise

    @env.task
    async def root() -> None:
        with contextlib.suppress(ActionAbortedError):
            await child()

    async def abort_twice(handle: flowsdk.RunHandle[None]) -> tuple[ControlResult, ControlResult]:
        first = await handle.abort("a1", reason="first")
        await cleanup.wait_running()
        second = await handle.abort("a1", reason="second")
        for _ in range(3):
            await asyncio.sleep(0)
        cleanup.release()
        return first, second

    run, (first, second) = await start_and_control(root, when=running, control=abort_twice)
    assert first.outcome == "applied"
    assert second.outcome == "applied"
    assert "already requested" in second.message
    assert seen == ["first"]
    aborted = [e for e in run.events if e.action == "a1" and e.phase == "ABORTED"]
    assert len(aborted) == 1
    abort = run.action("a1").abort
    assert abort is not None
    assert abort.reason == "first"
    assert_clean(run)


@pytest.mark.parametrize("caught", [True, False])
async def test_abort_mid_tree_affects_exactly_that_subtree(caught: bool) -> None:
    """Mid-tree P is ABORTED, its descendants ABORTED(ancestor); sibling and ancestors go on."""
    env = flowsdk.TaskEnvironment("x7")
    leaf_gate, sibling_gate = Gate("leaf"), Gate("sibling")
    names: dict[str, str] = {}
    seen: list[BaseException] = []

    @env.task
    async def leaf() -> None:
        await leaf_gate.enter()

    @env.task
    async def lower() -> None:
        await leaf()

    @env.task
    async def middle() -> None:
        names["P"] = flowsdk.current_action().name
        await lower()

    @env.task
    async def sibling() -> str:
        await sibling_gate.enter()
        return "sibling"

    @env.task
    async def upper() -> str:
        other = asyncio.create_task(sibling())
        try:
            await middle()
        except ActionAbortedError as exc:
            seen.append(exc)
            if not caught:
                other.cancel()
                raise
        return await other

    @env.task
    async def root() -> str:
        try:
            return await upper()
        except RuntimeUserError as exc:
            seen.append(exc)
            return "upper failed"

    async def abort_p(handle: flowsdk.RunHandle[str]) -> None:
        await handle.abort(names["P"], reason="mid")
        sibling_gate.release()

    run, _ = await start_and_control(root, when=leaf_gate, control=abort_p)
    p = names["P"]
    [lower_rec] = by_task(run, ".lower")
    [leaf_rec] = by_task(run, ".leaf")
    [upper_rec] = by_task(run, ".upper")
    assert run.action(p).phase is ActionPhase.ABORTED
    assert causes(run)[p] == "external"
    assert {causes(run)[lower_rec.name], causes(run)[leaf_rec.name]} == {"ancestor"}
    assert isinstance(seen[0], ActionAbortedError)
    assert seen[0].action == p
    if caught:
        assert len(seen) == 1
        assert run.result() == "sibling"
        assert upper_rec.phase is ActionPhase.SUCCEEDED
        assert by_task(run, ".sibling")[0].phase is ActionPhase.SUCCEEDED
    else:
        assert run.result() == "upper failed"
        assert upper_rec.phase is ActionPhase.FAILED
        [_, wrapped] = seen
        assert type(wrapped) is RuntimeUserError
        assert wrapped.__cause__ is seen[0]
    assert run.action("a0").phase is ActionPhase.SUCCEEDED
    assert_clean(run)


@pytest.mark.parametrize("order", ["parent first", "child first"])
async def test_abort_of_parent_and_child_in_one_instant(order: str) -> None:
    """Parent P and its child both ABORTED(external), once each; grandparent gets it for P."""
    env = flowsdk.TaskEnvironment("x8")
    gate = Gate()
    seen: list[ActionAbortedError] = []

    @env.task
    async def child() -> None:
        await gate.enter()

    @env.task
    async def parent() -> None:
        await child()

    @env.task
    async def root() -> None:
        try:
            await parent()
        except ActionAbortedError as exc:
            seen.append(exc)

    async def abort_both(handle: flowsdk.RunHandle[None]) -> list[ControlResult]:
        names = ["a1", "a2"] if order == "parent first" else ["a2", "a1"]
        return [await handle.abort(name) for name in names]

    run, results = await start_and_control(root, when=gate, control=abort_both)
    assert [r.outcome for r in results] == ["applied", "applied"]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED", "a2": "ABORTED"}
    assert causes(run) == {"a0": None, "a1": "external", "a2": "external"}
    assert [e.action for e in seen] == ["a1"]
    assert_clean(run)


async def test_abort_inside_timeout_expiring_in_same_tick_wins() -> None:
    """The body sees CancelledError, not TimeoutError; the parent gets ActionAbortedError."""
    env = flowsdk.TaskEnvironment("x10")
    gate = Gate()
    body_saw: list[str] = []
    seen: list[BaseException] = []

    @env.task
    async def child() -> None:
        try:
            # timeout(0) expires on the next loop step, the same one in which the
            # abort below is applied: both cancels land before the body resumes.
            async with asyncio.timeout(0):
                await gate.enter()
        except TimeoutError:
            body_saw.append("timeout")
        except CancelledError:
            body_saw.append("cancelled")
            raise

    @env.task
    async def root() -> None:
        try:
            await child()
        except (ActionAbortedError, RuntimeUserError) as exc:
            seen.append(exc)

    run, _ = await start_and_control(root, when=gate, control=lambda h: h.abort("a1"))
    assert body_saw == ["cancelled"]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "external"
    assert [type(e) for e in seen] == [ActionAbortedError]
    assert_clean(run)


# -- retries and abort ----------------------------------------------------------------


async def test_abort_during_retry_backoff_starts_no_further_attempt() -> None:
    """An abort in the backoff after attempt 2 ends the child ABORTED at attempt 2."""
    env = flowsdk.TaskEnvironment("x11b")
    second_failing = asyncio.Event()
    attempts: list[int] = []
    seen: list[BaseException] = []

    @env.task(retries=5, backoff=0)
    async def flaky() -> None:
        attempt = flowsdk.current_action().attempt
        attempts.append(attempt)
        if attempt == 2:
            second_failing.set()
        raise ValueError(f"attempt {attempt}")

    @env.task
    async def root() -> None:
        try:
            await flaky()
        except (ActionAbortedError, RuntimeUserError) as exc:
            seen.append(exc)

    # Attempt 2 sets the event and raises in one step, so the runtime is in its
    # backoff (a zero-second sleep) when the abort is made.
    run, _ = await start_and_control(root, when=second_failing, control=lambda h: h.abort("a1"))
    assert attempts == [1, 2]
    messages = [e.message or "" for e in run.events if e.action == "a1"]
    retrying = next(i for i, m in enumerate(messages) if m.startswith("attempt 2 failed"))
    request = next(i for i, m in enumerate(messages) if m.startswith("abort"))
    assert retrying < request
    record = run.action("a1")
    assert (record.phase, record.attempt) == (ActionPhase.ABORTED, 2)
    assert causes(run)["a1"] == "external"
    assert [type(e) for e in seen] == [ActionAbortedError]
    assert_clean(run)


async def test_abort_during_an_attempt_starts_no_further_attempt() -> None:
    """An abort during attempt 3 cancels it and no fourth attempt starts."""
    env = flowsdk.TaskEnvironment("x11a")
    third = Gate()
    attempts: list[int] = []
    seen: list[BaseException] = []

    @env.task(retries=5, backoff=0)
    async def flaky() -> None:
        attempt = flowsdk.current_action().attempt
        attempts.append(attempt)
        if attempt == 3:
            await third.enter()
        raise ValueError(f"attempt {attempt}")

    @env.task
    async def root() -> None:
        try:
            await flaky()
        except (ActionAbortedError, RuntimeUserError) as exc:
            seen.append(exc)

    run, _ = await start_and_control(root, when=third, control=lambda h: h.abort("a1"))
    assert attempts == [1, 2, 3]
    record = run.action("a1")
    assert (record.phase, record.attempt) == (ActionPhase.ABORTED, 3)
    assert [type(e) for e in seen] == [ActionAbortedError]
    assert_clean(run)


async def test_cleanup_raising_after_abort_is_not_retried() -> None:
    """An exception raised by an aborted attempt's cleanup makes it FAILED, not retried."""
    env = flowsdk.TaskEnvironment("x11c")
    gate = Gate()
    attempts: list[int] = []

    @env.task(retries=5, backoff=0)
    async def flaky() -> None:
        attempts.append(flowsdk.current_action().attempt)
        try:
            await gate.enter()
        except CancelledError:
            raise ValueError("cleanup broke") from None

    @env.task
    async def root() -> str:
        try:
            await flaky()
        except RuntimeUserError as exc:
            return type(exc.__cause__).__name__
        return "no error"

    run, _ = await start_and_control(root, when=gate, control=lambda h: h.abort("a1"))
    assert attempts == [1]
    assert run.result() == "ValueError"
    assert run.action("a1").phase is ActionPhase.FAILED
    assert_clean(run)


async def test_root_exit_during_retry_backoff_starts_no_further_attempt() -> None:
    """A root exit during backoff leaves the child ABORTED(root_exit), no further attempt."""
    env = flowsdk.TaskEnvironment("x11r")
    failed = asyncio.Event()
    attempts: list[int] = []

    @env.task(retries=5, backoff=60)
    async def flaky() -> None:
        attempts.append(flowsdk.current_action().attempt)
        failed.set()
        raise ValueError("always")

    @env.task
    async def root() -> int:
        pending = asyncio.create_task(flaky())
        await failed.wait()  # set in the step that fails attempt 1 and enters the backoff
        del pending
        return 1

    run = await flowsdk.run_async(root)
    assert attempts == [1]
    record = run.action("a1")
    assert (record.phase, record.attempt) == (ActionPhase.ABORTED, 1)
    assert causes(run)["a1"] == "root_exit"
    assert_clean(run)


# -- abort of the run, of a group, of nothing --------------------------------------------


async def test_abort_of_the_root_aborts_the_run() -> None:
    """An abort naming no action aborts the root (external) and its descendants (ancestor)."""
    env = flowsdk.TaskEnvironment("rootabort")
    gate = Gate()

    @env.task
    async def child() -> None:
        await gate.enter()

    @env.task
    async def root() -> None:
        await asyncio.gather(child(), child())

    run, result = await start_and_control(
        root, when=gate, control=lambda h: h.abort(reason="operator said so")
    )
    assert result.outcome == "applied"
    assert run.phase is RunPhase.ABORTED
    assert phases(run) == {"a0": "ABORTED", "a1": "ABORTED", "a2": "ABORTED"}
    assert causes(run) == {"a0": "external", "a1": "ancestor", "a2": "ancestor"}
    with pytest.raises(ActionAbortedError, match="operator said so") as info:
        run.result()
    assert (info.value.action, info.value.reason) == ("a0", "operator said so")
    assert_clean(run)


async def test_abort_of_a_group_aborts_its_actions_and_later_stages_never_start() -> None:
    """Aborting a stage aborts its actions; the root lets the error through: the run is ABORTED."""
    env = flowsdk.TaskEnvironment("stages")
    gate = Gate()

    @env.task
    async def build(part: str) -> str:
        await gate.enter()
        return part

    @env.task
    async def check() -> None:
        pass

    @env.task
    async def pipeline() -> None:
        with flowsdk.group("build"):
            await asyncio.gather(build("x"), build("y"))
        with flowsdk.group("test"):
            await check()

    run, result = await start_and_control(
        pipeline,
        when=lambda: gate.wait_running(2),
        control=lambda h: h.abort(group="build", reason="bad commit"),
    )
    assert result.outcome == "applied"
    assert run.phase is RunPhase.ABORTED
    builds = by_task(run, ".build")
    assert [(b.phase.value, b.group) for b in builds] == [("ABORTED", "build")] * 2
    assert {causes(run)[b.name] for b in builds} == {"external"}
    assert by_task(run, ".check") == []
    with pytest.raises(ActionAbortedError):
        run.result()
    assert_clean(run)


async def test_abort_of_unknown_action_or_group_lists_what_exists() -> None:
    """An unknown action or group raises ActionNotFoundError (a LookupError) listing them."""
    env = flowsdk.TaskEnvironment("x5")
    gate = Gate()

    @env.task
    async def child() -> None:
        await gate.enter()

    @env.task
    async def root() -> None:
        with flowsdk.group("stage"):
            await child()

    async def look_up_unknowns(handle: flowsdk.RunHandle[None]) -> None:
        with pytest.raises(ActionNotFoundError, match="a7") as info:
            await handle.abort("a7")
        assert isinstance(info.value, LookupError)
        assert "a0" in str(info.value)
        assert "a1" in str(info.value)
        with pytest.raises(ActionNotFoundError, match="stage"):
            await handle.abort(group="nope")
        with pytest.raises(ActionNotFoundError, match="a9"):
            await handle.mark_failed("a9")
        # Names are `a<seq>` exactly: no leading zero, no other digits, no other letter.
        for spelling in ("a01", "a\u0661", "b1", "a", "a-1"):
            with pytest.raises(ActionNotFoundError):
                await handle.abort(spelling)
        gate.release()

    run, _ = await start_and_control(root, when=gate, control=look_up_unknowns)
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED"}
    assert [e for e in run.events if e.kind is EventKind.REQUEST] == []
    assert_clean(run)


# -- stop ----------------------------------------------------------------------------


async def test_stop_and_wait_lets_actions_finish_and_refuses_new_ones() -> None:
    """Stop-and-wait: STOPPING, new calls raise RunStoppingError, actions finish, run STOPPED."""
    env = flowsdk.TaskEnvironment("stopwait")
    gate = Gate()
    refusals: list[RunStoppingError] = []

    @env.task
    async def child() -> int:
        await gate.enter()
        return 1

    @env.task
    async def other() -> int:
        return 2

    @env.task
    async def root() -> int:
        pending = asyncio.create_task(child())
        await gate.enter()
        try:
            other().close()
        except RunStoppingError as exc:
            refusals.append(exc)
        return await pending

    handle = await flowsdk.start(root)
    await gate.wait_running(2)  # the root and its child
    result = await handle.stop(reason="maintenance")
    assert (result.outcome, handle.phase) == ("applied", RunPhase.STOPPING)
    gate.release_all()
    run = await handle.wait()
    assert run.phase is RunPhase.STOPPED
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED"}
    assert len(refusals) == 1
    assert [e.phase for e in run.events if e.kind is EventKind.RUN] == [
        "RUNNING",
        "STOPPING",
        "STOPPED",
    ]
    with pytest.raises(RunStoppedError, match="maintenance"):
        run.result()
    after = await handle.stop()
    assert (after.outcome, after.phase) == ("already_ended", "STOPPED")
    assert_clean(run)


async def test_root_exit_during_stop_and_wait_still_cancels_the_rest() -> None:
    """SPEC §4: the lifetime rule wins during a stop-and-wait; the run ends STOPPED."""
    env = flowsdk.TaskEnvironment("stopexit")
    child_gate, root_gate = Gate("child"), Gate("root")

    @env.task
    async def child() -> None:
        await child_gate.enter()

    @env.task
    async def root() -> int:
        pending = asyncio.create_task(child())
        await root_gate.enter()
        del pending
        return 1

    async def stop_then_let_root_return(handle: flowsdk.RunHandle[int]) -> None:
        await handle.stop()
        root_gate.release()

    run, _ = await start_and_control(root, when=child_gate, control=stop_then_let_root_return)
    assert run.phase is RunPhase.STOPPED
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "root_exit"
    assert_clean(run)


async def test_stop_and_abandon_abandons_every_action_in_progress() -> None:
    """Stop-and-abandon: each in-progress action ABANDONED (cause stop), run STOPPED."""
    env = flowsdk.TaskEnvironment("stopabandon")
    gate = Gate()
    ended: list[str] = []
    all_ended = asyncio.Event()

    async def hold(who: str) -> None:
        try:
            await gate.enter()
        finally:
            ended.append(who)
            if len(ended) == 2:
                all_ended.set()

    @env.task
    async def child() -> None:
        await hold("child")

    @env.task
    async def root() -> None:
        pending = asyncio.create_task(child())
        await hold("root")
        await pending

    handle = await flowsdk.start(root)
    await gate.wait_running(2)  # the root and its child
    result = await handle.stop(abandon=True, reason="shutting down")
    run = await handle.wait()
    await all_ended.wait()  # the abandoned bodies got their cancel and ended
    assert result.outcome == "applied"
    assert run.phase is RunPhase.STOPPED
    assert phases(run) == {"a0": "ABANDONED", "a1": "ABANDONED"}
    assert causes(run) == {"a0": "stop", "a1": "stop"}
    abort = run.action("a1").abort
    assert abort is not None
    assert abort.reason == "shutting down"
    later = await handle.abort("a1")
    assert (later.outcome, later.phase) == ("already_ended", "ABANDONED")
    with pytest.raises(RunStoppedError):
        run.result()
    assert_clean(run)


async def test_stop_and_wait_escalates_to_abandon() -> None:
    """A stop-and-abandon during a stop-and-wait abandons what the wait was waiting for."""
    env = flowsdk.TaskEnvironment("escalate")
    gate = Gate()
    ended = asyncio.Event()

    @env.task
    async def child() -> None:
        try:
            await gate.enter()
        finally:
            ended.set()

    @env.task
    async def root() -> None:
        await child()

    async def stop_twice_then_abandon(handle: flowsdk.RunHandle[None]) -> ControlResult:
        await handle.stop()
        again = await handle.stop()
        assert again.outcome is flowsdk.Outcome.REFUSED  # a value, not an exception
        assert "already stopping" in again.message
        return await handle.stop(abandon=True)

    run, escalated = await start_and_control(root, when=gate, control=stop_twice_then_abandon)
    await ended.wait()
    assert escalated.outcome == "applied"
    assert run.phase is RunPhase.STOPPED
    assert run.record.stop is not None
    assert run.record.stop.mode.value == "abandon"
    assert phases(run) == {"a0": "ABANDONED", "a1": "ABANDONED"}
    assert causes(run) == {"a0": "stop", "a1": "stop"}
    assert_clean(run)


# -- mark failed ---------------------------------------------------------------------


async def test_mark_failed_fails_the_action_and_aborts_its_descendants() -> None:
    """Mark failed: target FAILED, body saw CancelledError, parent gets RuntimeUserError."""
    env = flowsdk.TaskEnvironment("markfailed")
    gate = Gate()
    body_saw: list[str] = []
    seen: list[RuntimeUserError] = []

    @env.task
    async def grandchild() -> None:
        await gate.enter()

    @env.task
    async def child() -> None:
        try:
            await grandchild()
        except CancelledError:
            body_saw.append("cancelled")
            raise

    @env.task
    async def root() -> str:
        try:
            await child()
        except RuntimeUserError as exc:
            seen.append(exc)
        return "ok"

    run, result = await start_and_control(
        root, when=gate, control=lambda h: h.mark_failed("a1", reason="bad data")
    )
    assert result.outcome == "applied"
    assert run.result() == "ok"
    assert body_saw == ["cancelled"]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "FAILED", "a2": "ABORTED"}
    assert causes(run)["a2"] == "ancestor"
    [exc] = seen
    assert type(exc) is RuntimeUserError
    assert exc.action == "a1"
    assert isinstance(exc.__cause__, ActionMarkedFailedError)
    assert exc.__cause__.reason == "bad data"
    error = run.action("a1").error
    assert error is not None
    assert error.type.endswith("ActionMarkedFailedError")
    assert_clean(run)


async def test_mark_failed_of_the_root_fails_the_run() -> None:
    """Mark failed on a0: the run is FAILED, result() raises RuntimeUserError from the marker."""
    env = flowsdk.TaskEnvironment("markroot")
    gate = Gate()

    @env.task
    async def child() -> None:
        await gate.enter()

    @env.task
    async def root() -> None:
        await child()

    async def mark_twice(handle: flowsdk.RunHandle[None]) -> tuple[ControlResult, ControlResult]:
        return await handle.mark_failed("a0", reason="wrong input"), await handle.mark_failed("a0")

    run, (first, second) = await start_and_control(root, when=gate, control=mark_twice)
    assert (first.outcome, second.outcome) == ("applied", "applied")
    assert "already" in second.message
    assert run.phase is RunPhase.FAILED
    assert phases(run) == {"a0": "FAILED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "ancestor"
    with pytest.raises(RuntimeUserError) as info:
        run.result()
    assert isinstance(info.value.__cause__, ActionMarkedFailedError)
    assert info.value.__cause__.reason == "wrong input"
    assert_clean(run)


# -- root exit: wait for cleanup, or abandon it -------------------------------------------


async def test_root_exit_waits_for_a_child_cleanup() -> None:
    """At root exit the run waits for the child's cleanup, which completes."""
    env = flowsdk.TaskEnvironment("j1wait")
    running, cleanup = Gate("running"), Gate("cleanup")
    cleaned: list[str] = []

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except CancelledError:
            await cleanup.enter()
            cleaned.append("done")
            raise

    @env.task
    async def root() -> int:
        pending = asyncio.create_task(child())
        await running.wait_running()
        del pending
        return 1

    handle = await flowsdk.start(root)
    waiter = asyncio.create_task(handle.wait())
    await cleanup.wait_running()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    assert handle.phase is RunPhase.RUNNING
    cleanup.release()
    run = await waiter
    assert cleaned == ["done"]
    assert run.result() == 1
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "root_exit"
    assert run.action("a1").cleanup_incomplete is False
    assert_clean(run)


async def test_stop_and_abandon_during_root_exit_cleanup_returns_at_once() -> None:
    """Abandoning a cleanup at root exit ends the run at once, cleanup_incomplete recorded."""
    env = flowsdk.TaskEnvironment("j1abandon")
    running, cleanup = Gate("running"), Gate("cleanup")
    cleaned = asyncio.Event()

    @env.task
    async def child() -> None:
        try:
            await running.enter()
        except CancelledError:
            await cleanup.enter()
            cleaned.set()
            raise

    @env.task
    async def root() -> int:
        pending = asyncio.create_task(child())
        await running.wait_running()
        del pending
        return 1

    run, _ = await start_and_control(root, when=cleanup, control=lambda h: h.stop(abandon=True))
    ended_before_cleanup = not cleaned.is_set()
    cleanup.release()
    await cleaned.wait()  # the loop lives on: let the abandoned cleanup end
    assert ended_before_cleanup
    record = run.action("a1")
    assert record.phase is ActionPhase.ABANDONED
    assert record.cleanup_incomplete is True
    assert run.phase is RunPhase.STOPPED
    assert_clean(run)


# -- the timeout= option -------------------------------------------------------------


async def test_timeout_option_fails_the_action_with_task_timeout_error() -> None:
    """An attempt that overruns `timeout=` is FAILED with TaskTimeoutError, a RuntimeUserError."""
    env = flowsdk.TaskEnvironment("timeouts")
    seen: list[TaskTimeoutError] = []

    @env.task(timeout=0.01)  # the timeout is the behaviour under test
    async def slow() -> None:
        await asyncio.sleep(3600)

    @env.task
    async def root() -> str:
        try:
            await slow()
        except TaskTimeoutError as exc:
            seen.append(exc)
        return "ok"

    run = await flowsdk.run_async(root)
    assert run.result() == "ok"
    [exc] = seen
    assert isinstance(exc, RuntimeUserError)
    assert exc.action == "a1"
    record = run.action("a1")
    assert record.phase is ActionPhase.FAILED
    assert record.error is not None
    assert record.error.type.endswith("TaskTimeoutError")
    assert_clean(run)


async def test_abort_during_a_timed_out_attempts_cleanup_wins_and_is_not_retried() -> None:
    """An abort wins ties: an abort landing while a timed-out attempt cleans up makes it ABORTED."""
    env = flowsdk.TaskEnvironment("timeoutabort")
    cleanup = Gate()
    attempts: list[int] = []
    seen: list[BaseException] = []

    @env.task(timeout=0.01, retries=3, backoff=0)  # the timeout is the behaviour under test
    async def slow() -> None:
        attempts.append(flowsdk.current_action().attempt)
        try:
            await asyncio.sleep(3600)
        except CancelledError:
            await cleanup.enter()
            raise

    @env.task
    async def root() -> None:
        try:
            await slow()
        except (ActionAbortedError, RuntimeUserError) as exc:
            seen.append(exc)

    async def abort_then_release(handle: flowsdk.RunHandle[None]) -> None:
        await handle.abort("a1")
        cleanup.release()

    run, _ = await start_and_control(root, when=cleanup, control=abort_then_release)
    assert attempts == [1]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "external"
    assert [type(e) for e in seen] == [ActionAbortedError]
    assert_clean(run)


async def test_timeout_option_is_retried_like_a_user_error() -> None:
    """A timed-out attempt is retried when `retries` allows; the third attempt succeeds."""
    env = flowsdk.TaskEnvironment("timeoutretry")

    @env.task(timeout=0.01, retries=2, backoff=0)
    async def slow_then_fast() -> int:
        attempt = flowsdk.current_action().attempt
        if attempt < 3:
            await asyncio.sleep(3600)
        return attempt

    @env.task
    async def root() -> int:
        return await slow_then_fast()

    run = await flowsdk.run_async(root)
    assert run.result() == 3
    record = run.action("a1")
    assert (record.phase, record.attempt) == (ActionPhase.SUCCEEDED, 3)
    assert_clean(run)


# -- labels ------------------------------------------------------------------------------


async def test_group_labels_actions_started_inside_it() -> None:
    """flowsdk.group labels actions (innermost wins) and follows into their own children."""
    env = flowsdk.TaskEnvironment("labels")

    @env.task
    async def leaf() -> str | None:
        return flowsdk.current_action().group

    @env.task
    async def step() -> tuple[str | None, str | None]:
        return flowsdk.current_action().group, await leaf()

    @env.task
    async def root() -> list[tuple[str | None, str | None]]:
        outside = await step()
        with flowsdk.group("stage-1"):
            inside = await step()
            async with flowsdk.group("inner"):
                nested = await step()
            after = await step()
        return [outside, inside, nested, after]

    run = await flowsdk.run_async(root)
    assert run.result() == [
        (None, None),
        ("stage-1", "stage-1"),
        ("inner", "inner"),
        ("stage-1", "stage-1"),
    ]
    groups = [(a.task.rsplit(".", 1)[1], a.group) for a in run.actions]
    assert groups == [
        ("root", None),
        ("step", None),
        ("leaf", None),
        ("step", "stage-1"),
        ("leaf", "stage-1"),
        ("step", "inner"),
        ("leaf", "inner"),
        ("step", "stage-1"),
        ("leaf", "stage-1"),
    ]
    assert_clean(run)
