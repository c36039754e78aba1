"""Control of a run from another process: `flowsdk.Client` against a subprocess runner (SPEC §6).

Each runner is tests/runners/control.py running one workflow on a SQLite store
in tmp_path, or on a new database of the session's PostgreSQL server. The test
waits for the lines it prints (`STARTED a1 sleeper`), controls the run through
`flowsdk.Client`, then reads the run back from the store once the runner has
exited (or after `sync`, while it still runs).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

import flowsdk
from flowsdk import AbortCause, ActionPhase, EventKind, RunPhase
from flowsdk.errors import ActionNotFoundError, RunNotFoundError
from tests.runners.harness import Runner, sync
from tests.support import assert_clean, causes, phases


def requests_for(run: flowsdk.Run[object], action: str | None) -> list[flowsdk.Event]:
    """The control requests the runner recorded for `action` (None: the run or a group)."""
    return [e for e in run.events if e.kind is EventKind.REQUEST and e.action == action]


def me() -> str:
    """How `requested_by` names a request sent by this process."""
    return f"pid {os.getpid()}"


# -- abort ---------------------------------------------------------------------------


def test_abort_from_another_process_cancels_the_body_and_parent_gets_aborted_error(
    url: str,
) -> None:
    """The body's cleanup runs, its parent gets ActionAbortedError, the abort is 'applied'."""
    with Runner("control.py", url, "x1", "one_child") as runner, flowsdk.Client(url) as client:
        assert runner.started(2) == {"a0": "one_child", "a1": "sleeper"}
        result = client.abort("x1", "a1", reason="not-needed")
        assert (result.outcome, result.phase) == ("applied", "STOPPING")
        runner.expect("CANCELLED", "a1")
        runner.expect("CLEANUP", "a1")
        caught = runner.expect("CAUGHT")
        assert caught == ["CAUGHT", "ActionAbortedError", "a1", "external", "not-needed"]
        assert runner.finish() == 0
        run = client.get_run("x1")
    assert "RESULT SUCCEEDED" in runner.lines
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    abort = run.action("a1").abort
    assert abort is not None
    assert (abort.cause, abort.reason) == (AbortCause.EXTERNAL, "not-needed")
    assert abort.requested_by is not None
    assert me() in abort.requested_by
    assert_clean(run)


def test_abort_of_ended_actions_of_a_live_run_is_idempotent(url: str) -> None:
    """Aborting SUCCEEDED, FAILED and ABORTED actions answers already_ended, twice the same."""
    with Runner("control.py", url, "x4", "ended") as runner, flowsdk.Client(url) as client:
        runner.expect("READY")
        for action, phase in [("a1", "SUCCEEDED"), ("a2", "FAILED"), ("a3", "ABORTED")]:
            first = client.abort("x4", action, reason="late")
            second = client.abort("x4", action, reason="late")
            assert (first.outcome, first.phase) == ("already_ended", phase)
            assert second.as_dict() == first.as_dict()
            assert action in first.message
            assert phase in first.message
        client.abort("x4")
        assert runner.finish() == 0
        run = client.get_run("x4")
    assert phases(run) == {
        "a0": "ABORTED",
        "a1": "SUCCEEDED",
        "a2": "FAILED",
        "a3": "ABORTED",
        "a4": "ABORTED",
    }
    assert causes(run)["a3"] == "cancelled"
    assert all(not requests_for(run, a) for a in ("a1", "a2", "a3"))
    assert_clean(run)


def test_abort_of_actions_of_an_ended_run_is_idempotent(url: str) -> None:
    """Once the run has ended, abort, stop and mark-failed answer already_ended."""
    env = flowsdk.TaskEnvironment("x4ended")

    @env.task
    async def child() -> int:
        return 1

    @env.task
    async def root() -> int:
        return await child()

    flowsdk.run(root, name="x4e", store=url)
    with flowsdk.Client(url) as client:
        before = client.get_run("x4e")
        answers = [
            client.abort("x4e", "a1").as_dict(),
            client.abort("x4e", "a1").as_dict(),
            client.mark_failed("x4e", "a1").as_dict(),
        ]
        whole = [client.abort("x4e"), client.stop("x4e"), client.stop("x4e", abandon=True)]
        after = client.get_run("x4e")
    assert answers[0] == answers[1]
    assert {a["outcome"] for a in answers} == {"already_ended"}
    assert {a["phase"] for a in answers} == {"SUCCEEDED"}
    assert {(r.outcome, r.phase) for r in whole} == {("already_ended", "SUCCEEDED")}
    assert (after.actions, after.events) == (before.actions, before.events)


def test_unknown_run_or_action_raises_lookup_errors_and_changes_nothing(url: str) -> None:
    """RunNotFoundError suggests close names; ActionNotFoundError lists what exists."""
    with Runner("control.py", url, "x5", "one_child") as runner, flowsdk.Client(url) as client:
        runner.started(2)
        sync(client, "x5")
        before = client.get_run("x5")
        with pytest.raises(RunNotFoundError, match="x5") as no_run:
            client.abort("x5x", "a1")
        with pytest.raises(ActionNotFoundError, match="a7") as no_action:
            client.abort("x5", "a7")
        with pytest.raises(ActionNotFoundError, match="stage9"):
            client.abort("x5", group="stage9")
        with pytest.raises(ActionNotFoundError, match="a7"):
            client.mark_failed("x5", "a7")
        after = client.get_run("x5")
        client.abort("x5")
        assert runner.finish() == 0
    assert isinstance(no_run.value, LookupError)
    assert isinstance(no_action.value, LookupError)
    assert "a0" in str(no_action.value)
    assert "a1" in str(no_action.value)
    assert (after.actions, after.events) == (before.actions, before.events)


def test_second_abort_while_the_first_is_under_way_says_already_requested(url: str) -> None:
    """Double abort: one CancelledError in the body, one ABORTED transition, the second says so."""
    with (
        Runner("control.py", url, "x6", "one_slow_cleanup") as runner,
        flowsdk.Client(url) as client,
    ):
        runner.started(2)
        first = client.abort("x6", "a1", reason="twice")
        runner.expect("CANCELLED", "a1")
        second = client.abort("x6", "a1", reason="twice")
        runner.send()  # the cleanup may end now
        runner.expect("CAUGHT", "ActionAbortedError", "a1")
        assert runner.finish() == 0
        run = client.get_run("x6")
    assert (first.outcome, second.outcome) == ("applied", "applied")
    assert "already requested" in second.message
    assert runner.lines.count("CANCELLED a1") == 1
    assert len(requests_for(run, "a1")) == 1
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert_clean(run)


def test_abort_of_a_mid_tree_action_leaves_its_siblings_and_ancestors_running(url: str) -> None:
    """Mid-tree P ABORTED, its subtree ancestor, its parent FAILED, the sibling still RUNNING."""
    with Runner("control.py", url, "x7", "tree") as runner, flowsdk.Client(url) as client:
        started = runner.started(6)
        by_function: dict[str, list[str]] = {}
        for action, function in sorted(started.items()):
            by_function.setdefault(function, []).append(action)
        [mid], [p], [sibling] = by_function["mid"], by_function["p"], by_function["sibling"]
        leaves = by_function["sleeper"]
        assert client.abort("x7", p, reason="prune").outcome == "applied"
        caught = runner.expect("CAUGHT")
        sync(client, "x7")
        live = client.get_run("x7")
        assert runner.finish() == 0
        run = client.get_run("x7")
    assert caught == ["CAUGHT", "RuntimeUserError", mid, "ActionAbortedError", p]
    assert phases(live) == {
        "a0": "RUNNING",
        mid: "FAILED",
        p: "ABORTED",
        sibling: "RUNNING",
        **dict.fromkeys(leaves, "ABORTED"),
    }
    assert causes(live) == {
        "a0": None,
        mid: None,
        p: "external",
        sibling: None,
        **dict.fromkeys(leaves, "ancestor"),
    }
    error = live.action(mid).error
    assert error is not None
    assert error.type.endswith("ActionAbortedError")
    assert causes(run)[sibling] == "root_exit"
    assert run.phase is RunPhase.SUCCEEDED
    assert_clean(run)


def test_group_abort_aborts_the_stage_and_later_stages_never_start(url: str) -> None:
    """Group abort: every stage1 action ABORTED (external), stage2 never starts, run ABORTED."""
    with Runner("control.py", url, "g1", "stages") as runner, flowsdk.Client(url) as client:
        runner.started(4)
        result = client.abort("g1", group="stage1", reason="bad-data")
        assert runner.finish() == 0
        run = client.get_run("g1")
    assert result.outcome == "applied"
    stage1 = [a for a in run.actions if a.group == "stage1"]
    assert [a.phase for a in stage1] == [ActionPhase.ABORTED] * 3
    assert {(a.abort.cause, a.abort.reason) for a in stage1 if a.abort} == {
        (AbortCause.EXTERNAL, "bad-data")
    }
    assert len(run.actions) == 4
    assert sum(line.startswith("STARTED") for line in runner.lines) == 4
    assert run.phase is RunPhase.ABORTED
    assert_clean(run)


def test_abort_of_the_whole_run_aborts_the_root_and_its_descendants(url: str) -> None:
    """The root ABORTED (external), its children ABORTED (ancestor), the run ABORTED."""
    with Runner("control.py", url, "r3", "fan_out") as runner, flowsdk.Client(url) as client:
        runner.started(3)
        result = client.abort("r3", reason="shutdown")
        assert runner.finish() == 0
        run = client.get_run("r3")
    assert result.outcome == "applied"
    assert "RESULT ABORTED" in runner.lines
    assert {line for line in runner.lines if line.startswith("CLEANUP")} == {
        "CLEANUP a1",
        "CLEANUP a2",
    }
    assert phases(run) == dict.fromkeys(["a0", "a1", "a2"], "ABORTED")
    assert causes(run) == {"a0": "external", "a1": "ancestor", "a2": "ancestor"}
    assert run.phase is RunPhase.ABORTED
    assert_clean(run)


def test_abort_of_an_action_not_created_yet_is_refused_never_lost(url: str) -> None:
    """Abort names an action the runner has not created: ActionNotFoundError, never applied."""
    with (
        Runner("control.py", url, "x2", "gated_create") as runner,
        flowsdk.Client(url) as client,
    ):
        runner.started(1)
        with pytest.raises(ActionNotFoundError, match="a1") as exc:
            client.abort("x2", "a1", reason="too-early")
        runner.send()
        runner.expect("STARTED", "a1", "ok")
        assert runner.finish() == 0
        run = client.get_run("x2")
    assert "a0" in str(exc.value)
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED"}
    assert not [e for e in run.events if e.kind is EventKind.REQUEST]


@pytest.mark.slow
def test_abort_while_the_body_blocks_the_loop_is_recorded_then_delivered(url: str) -> None:
    """An abort is recorded while the body blocks the loop, delivered after; the block is logged."""
    with Runner("control.py", url, "x12", "one_blocker") as runner, flowsdk.Client(url) as client:
        runner.started(2)
        result = client.abort("x12", "a1", reason="blocked")
        state = runner.expect("SAW-REQUEST")[1]
        runner.expect("CANCELLED", "a1")
        runner.expect("CAUGHT", "ActionAbortedError", "a1")
        assert runner.finish() == 0
        run = client.get_run("x12")
    assert result.outcome == "applied"
    assert state in ("pending", "delivered")
    assert any("event loop was blocked for" in line for line in runner.lines), runner.output
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert causes(run)["a1"] == "external"
    assert_clean(run)


# -- mark failed ---------------------------------------------------------------------


def test_mark_failed_from_another_process_fails_the_action(url: str) -> None:
    """Mark-failed: the action FAILED; its parent gets RuntimeUserError(ActionMarkedFailedError)."""
    with Runner("control.py", url, "m1", "one_child") as runner, flowsdk.Client(url) as client:
        runner.started(2)
        result = client.mark_failed("m1", "a1", reason="wrong-output")
        runner.expect("CANCELLED", "a1")
        caught = runner.expect("CAUGHT")
        assert runner.finish() == 0
        run = client.get_run("m1")
    assert result.outcome == "applied"
    assert caught == ["CAUGHT", "RuntimeUserError", "a1", "ActionMarkedFailedError", "a1"]
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "FAILED"}
    error = run.action("a1").error
    assert error is not None
    assert error.type.endswith("ActionMarkedFailedError")
    assert "wrong-output" in error.message
    assert_clean(run)


# -- stop ----------------------------------------------------------------------------


def test_stop_and_wait_refuses_new_tasks_and_lets_actions_finish(url: str) -> None:
    """Stop and wait: new task calls raise RunStoppingError, in-progress actions finish, STOPPED."""
    with Runner("control.py", url, "s1", "stop_wait") as runner, flowsdk.Client(url) as client:
        runner.started(3)
        result = client.stop("s1", reason="maintenance")
        stopping = client.get_run("s1").phase
        listed = [r.name for r in client.runs(phase=RunPhase.STOPPING)]
        runner.send()
        runner.expect("REFUSED", "RunStoppingError")
        assert runner.finish() == 0
        run = client.get_run("s1")
    assert (result.outcome, result.phase) == ("applied", "STOPPING")
    assert (stopping, listed) == (RunPhase.STOPPING, ["s1"])
    assert sorted(line for line in runner.lines if line.startswith("FINISHED")) == [
        "FINISHED a1",
        "FINISHED a2",
    ]
    assert phases(run) == dict.fromkeys(["a0", "a1", "a2"], "SUCCEEDED")
    assert run.phase is RunPhase.STOPPED
    stop = run.record.stop
    assert stop is not None
    assert (stop.mode.value, stop.reason) == ("wait", "maintenance")
    assert stop.requested_by is not None
    assert me() in stop.requested_by
    assert_clean(run)


def test_stop_and_abandon_abandons_every_action_in_progress(url: str) -> None:
    """Stop and abandon: the root and its children ABANDONED (cause stop), the run STOPPED."""
    with Runner("control.py", url, "s2", "fan_out") as runner, flowsdk.Client(url) as client:
        runner.started(3)
        result = client.stop("s2", abandon=True, reason="give-up")
        assert runner.finish() == 0
        run = client.get_run("s2")
    assert result.outcome == "applied"
    assert "RESULT STOPPED" in runner.lines
    assert phases(run) == dict.fromkeys(["a0", "a1", "a2"], "ABANDONED")
    assert set(causes(run).values()) == {"stop"}
    assert run.phase is RunPhase.STOPPED
    assert run.record.stop is not None
    assert run.record.stop.mode.value == "abandon"
    assert_clean(run)


def test_stop_and_abandon_escalates_a_stop_and_wait(url: str) -> None:
    """Escalation: a run STOPPING (wait) is abandoned by a stop with abandon=True."""
    with Runner("control.py", url, "s3", "stop_wait") as runner, flowsdk.Client(url) as client:
        runner.started(3)
        client.stop("s3", reason="first")
        escalated = client.stop("s3", abandon=True, reason="second")
        assert runner.finish() == 0
        run = client.get_run("s3")
    assert escalated.outcome == "applied"
    assert phases(run) == dict.fromkeys(["a0", "a1", "a2"], "ABANDONED")
    assert run.phase is RunPhase.STOPPED
    assert run.record.stop is not None
    assert (run.record.stop.mode.value, run.record.stop.reason) == ("abandon", "second")
    assert len(requests_for(run, None)) == 2
    assert_clean(run)


def test_second_stop_and_wait_is_a_refused_outcome(url: str) -> None:
    """A second stop-and-wait on a STOPPING run is a `refused` outcome; the first stands."""
    with Runner("control.py", url, "s4", "stop_wait") as runner, flowsdk.Client(url) as client:
        runner.started(3)
        client.stop("s4")
        again = client.stop("s4")
        assert again.outcome is flowsdk.Outcome.REFUSED
        assert again.phase == "STOPPING"
        assert "already stopping" in again.message
        runner.send()
        assert runner.finish() == 0
        run = client.get_run("s4")
    assert run.phase is RunPhase.STOPPED
    assert run.record.stop is not None
    assert run.record.stop.mode.value == "wait"
    assert len(requests_for(run, None)) == 1
    assert_clean(run)


# -- a runner that dies ----------------------------------------------------------------


def kill_without_reaping(runner: Runner) -> None:
    """SIGKILL the runner and wait until it is dead, leaving it a zombie (not reaped)."""
    runner.proc.kill()
    os.waitid(os.P_PID, runner.proc.pid, os.WEXITED | os.WNOWAIT)


@pytest.mark.parametrize("reaped", [False, True], ids=["zombie", "reaped"])
def test_sigkilled_runner_shows_the_run_and_unfinished_actions_crashed(
    url: str, reaped: bool
) -> None:
    """SIGKILL with 3 SUCCEEDED, 2 RUNNING and 1 QUEUED: run and unfinished actions CRASHED."""
    with Runner("control.py", url, "p1", "crash") as runner, flowsdk.Client(url) as client:
        queued = runner.expect("READY")[1]
        before = client.get_run("p1")
        kill_without_reaping(runner)
        if reaped:
            runner.proc.wait(timeout=30)
        else:
            with open(f"/proc/{runner.proc.pid}/stat") as stat:
                assert stat.read().rsplit(")", 1)[1].split()[0] == "Z"
        listed = client.runs()
        run = client.get_run("p1")
    assert [(r.name, r.phase) for r in listed] == [("p1", RunPhase.CRASHED)]
    assert Counter(phases(before).values()) == {"SUCCEEDED": 3, "RUNNING": 3, "QUEUED": 1}
    assert before.action(queued).phase is ActionPhase.QUEUED
    assert run.phase is RunPhase.CRASHED
    assert phases(run) == {
        a.name: "SUCCEEDED" if a.phase is ActionPhase.SUCCEEDED else "CRASHED"
        for a in before.actions
    }
    assert_clean(run)


def test_control_request_to_a_killed_runner_answers_crashed_at_once(url: str) -> None:
    """Abort, stop, mark-failed of a SIGKILLed runner's run answer already_ended, CRASHED."""
    with Runner("control.py", url, "p1c", "crash") as runner, flowsdk.Client(url) as client:
        runner.expect("READY")
        kill_without_reaping(runner)
        answers = [
            client.abort("p1c", reason="too-late"),
            client.abort("p1c", "a4"),
            client.mark_failed("p1c", "a5"),
            client.stop("p1c", abandon=True),
        ]
    assert [(a.outcome, a.phase) for a in answers] == [("already_ended", "CRASHED")] * 4
