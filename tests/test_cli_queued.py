"""A control request the runner has not answered (`queued`, exit 7) is shown until it is applied.

The runner is a subprocess (tests/runners/control.py) whose event loop is
blocked by its body, as sync code in an `async def` blocks it, or whose whole
process is paused (SIGSTOP). `flowsdk abort` then answers `queued` (exit 7);
`flowsdk show`, `show --json` and `watch --json` say the request waits, whether
the runner has taken it, who asked and why; once the runner applies it (or is
gone) they no longer list it. Each CLI call is a process of its own, on a
SQLite store and on a PostgreSQL database.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from flowsdk import ActionPhase, RunPhase
from flowsdk.cli._detail import concerning
from tests.runners.harness import Runner, sync
from tests.support import pause
from tests.test_cli import REPO, TIMEOUT, Result, assert_iso, child_env, cli, cli_process

# The requester's wait for the runner's answer (10 s for a person) made short, as the
# in-process tests do with `monkeypatch.setattr("flowsdk._service.ANSWER_TIMEOUT", ...)`:
# the same setting, in the CLI's own process, before it runs.
ANSWER_WITHIN = 0.5
_SHORT_WAIT_CLI = (
    "import sys, flowsdk._service as service; "
    f"service.ANSWER_TIMEOUT = {ANSWER_WITHIN}; "
    "from flowsdk.cli import entry_point; entry_point()"
)


def ask(store: str, *args: str) -> Result:
    """Run a control verb of the CLI (`abort ...`) that waits `ANSWER_WITHIN` s for an answer."""
    done = subprocess.run(
        [sys.executable, "-c", _SHORT_WAIT_CLI, *args, "--store", store],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(store),
        timeout=TIMEOUT,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Result(done.returncode, done.stdout, done.stderr)


def queued_json(store: str, run: str) -> list[dict[str, Any]]:
    """The `queued_requests` of `flowsdk show RUN --json`."""
    shown = cli(store, "show", run, "--json")
    assert shown.code == 0, shown.stderr
    found: list[dict[str, Any]] = shown.json()["queued_requests"]
    return found


def queued_lines(store: str, run: str) -> list[str]:
    """The lines of `flowsdk show RUN` that say a request is queued."""
    shown = cli(store, "show", run)
    assert shown.code == 0, shown.stderr
    return [line for line in shown.stdout.splitlines() if line.startswith("  queued  ")]


def wait_until_taken(store: str, run: str) -> dict[str, Any]:
    """Wait until the runner's store thread has taken the one queued request; return it.

    It takes a request within a round (10 ms) even while its event loop is blocked.
    """
    deadline = time.monotonic() + TIMEOUT
    while not (queued := queued_json(store, run))[0]["taken"]:
        assert time.monotonic() < deadline, queued
        time.sleep(0.05)
    [entry] = queued
    return entry


@pytest.fixture
def released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file whose creation unblocks `stuck` (named to the runners by the environment)."""
    path = tmp_path / "released"
    monkeypatch.setenv("FLOWSDK_TEST_RELEASE", str(path))
    return path


def test_show_and_watch_list_an_abort_until_the_blocked_runner_applies_it(
    url: str, released: Path
) -> None:
    """Exit 7, then `show` says who asked, why, and that the runner took it; gone once applied."""
    reason = 'disk "full"\x1b]0;owned\x07'  # what an operator typed, control characters included
    with Runner("control.py", url, "stuck", "one_stuck") as runner:
        runner.started(2)  # a1's body now blocks the runner's event loop
        before = datetime.now(UTC)
        asked = ask(url, "abort", "stuck", "a1", "--reason", reason)
        after = datetime.now(UTC)
        assert asked.code == 7, (asked.stdout, asked.stderr)
        number = re.search(r"recorded \(#(\d+)\)", asked.stderr)
        assert number is not None, asked.stderr
        entry = wait_until_taken(url, "stuck")
        assert entry["id"] == int(number.group(1))
        assert_iso(entry["at"])
        request = entry["request"]
        assert {k: v for k, v in request.items() if k not in ("requested_by", "requested_at")} == {
            "type": "abort",
            "run": "stuck",
            "action": "a1",
            "group": None,
            "reason": reason,  # exact in JSON
        }
        assert " pid " in request["requested_by"]
        assert_iso(request["requested_at"])

        shown = cli(url, "show", "stuck").stdout
        assert not {"\x1b", "\x07"} & set(shown)  # shown as escapes, never raw
        lines = shown.splitlines()
        [line] = [n for n, text in enumerate(lines) if text.startswith("  queued  ")]
        said, _, when = lines[line].partition(" at ")
        assert said == f"  queued    #{entry['id']} abort of action a1 by {request['requested_by']}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", when[:19]), when
        assert when[19:] == (
            r' (reason: "disk "full"\x1b]0;owned\x07"), taken by the runner, not yet applied'
        )
        # Under the run's header, above the tree.
        assert lines[0].split()[:3] == ["run", "stuck", "RUNNING"]
        assert line < next(n for n, text in enumerate(lines) if text.startswith("ACTION"))
        # One action in full lists the requests that reach it: a1's abort, not for a0.
        detail = cli(url, "show", "stuck", "a1").stdout.splitlines()
        assert [text for text in detail if text.startswith("  queued  ")] == [lines[line]]
        assert detail.index(lines[line]) < detail.index("inputs: (none)")
        for action, ids in (("a1", [entry["id"]]), ("a0", [])):
            one = cli(url, "show", "stuck", action, "--json")
            assert one.code == 0, one.stderr
            assert [q["id"] for q in one.json()["queued_requests"]] == ids

        with cli_process(url, "watch", "stuck", "--json") as watch:
            try:
                assert watch.stdout is not None
                first = json.loads(watch.stdout.readline())
                assert [q["id"] for q in first["queued_requests"]] == [entry["id"]]

                released.touch()
                runner.expect("UNBLOCKED", "a1")
                runner.expect("CANCELLED", "a1")
                assert runner.expect("CAUGHT")[:4] == [
                    "CAUGHT",
                    "ActionAbortedError",
                    "a1",
                    "external",
                ]
                # A frame once the runner has answered it: the list is empty again.
                while (frame := json.loads(watch.stdout.readline()))["queued_requests"]:
                    assert frame["run"]["phase"] == "RUNNING"

                with flowsdk.Client(url) as client:
                    sync(client, "stuck")  # answered after the abort: it is answered too
                    assert client.queued_requests("stuck") == []
                    assert client.get_record("stuck").phase is RunPhase.RUNNING
                assert queued_lines(url, "stuck") == []
                assert queued_json(url, "stuck") == []

                assert runner.finish() == 0  # the root's gate opens: the run ends
                out, err = watch.communicate(timeout=TIMEOUT)
            finally:
                if watch.poll() is None:
                    watch.kill()
        assert watch.returncode == 0, err
        # Answered, it is never listed again (a frame may show `sync`'s own request,
        # which waits for its answer a moment).
        later = [json.loads(last)["queued_requests"] for last in out.splitlines()]
        assert all(q["id"] != entry["id"] for queued in later for q in queued)

    with flowsdk.Client(url) as client:
        run = client.get_run("stuck")
    assert run.phase is RunPhase.SUCCEEDED
    assert run.action("a1").phase is ActionPhase.ABORTED
    abort = run.action("a1").abort
    assert abort is not None
    assert (abort.reason, abort.requested_by) == (reason, request["requested_by"])
    # When the operator asked, not when the runner's loop got to it (after the release).
    assert abort.requested_at is not None
    assert before <= abort.requested_at <= after


def test_a_request_to_a_paused_runner_is_listed_untaken_and_none_once_the_run_crashed(
    url: str,
) -> None:
    """SIGSTOP: `queued`, not yet taken; the runner killed: CRASHED, and no request waits."""
    with Runner("control.py", url, "paused", "one_child") as runner:
        runner.started(2)
        pause(runner.proc)  # alive, but reads no request
        try:
            asked = ask(url, "stop", "paused", "--abandon", "--reason", "maintenance")
            assert asked.code == 7, (asked.stdout, asked.stderr)
            [entry] = queued_json(url, "paused")
            assert entry["taken"] is False
            assert entry["request"]["type"] == "stop"
            assert (entry["request"]["abandon"], entry["request"]["reason"]) == (
                True,
                "maintenance",
            )
            [line] = queued_lines(url, "paused")
            assert line.startswith(f"  queued    #{entry['id']} stop and abandon by ")
            assert line.endswith('(reason: "maintenance"), not yet taken by the runner')
        finally:
            runner.proc.kill()  # a stopped process dies of SIGKILL too
        runner.proc.wait(timeout=TIMEOUT)

    # The request stays unanswered in the store, but nothing will ever apply it.
    shown = cli(url, "show", "paused")
    assert shown.stdout.splitlines()[0].split()[:3] == ["run", "paused", "CRASHED"]
    assert queued_lines(url, "paused") == []
    assert queued_json(url, "paused") == []
    with flowsdk.Client(url) as client:
        assert client.queued_requests("paused") == []


def test_a_request_taken_by_a_runner_that_died_is_listed_neither_then_nor_for_the_retry(
    url: str, released: Path
) -> None:
    """Taken, never answered, the runner killed: none listed; the retry's attempt lists none.

    The next attempt's row drops what the ended one's runner took and never answered
    (as it drops what that runner never took): a request is for one attempt.
    """
    with Runner("control.py", url, "taken", "one_stuck") as runner:
        runner.started(2)
        assert ask(url, "abort", "taken", "a1", "--reason", "for attempt 1").code == 7
        wait_until_taken(url, "taken")
        runner.proc.kill()
        runner.proc.wait(timeout=TIMEOUT)
    assert queued_json(url, "taken") == []  # CRASHED: its runner is gone
    released.touch()  # the retry's `stuck` does not block
    with cli_process(url, "retry", "taken", stdin=True) as retry:
        try:
            assert retry.stdout is not None
            while not retry.stdout.readline().startswith("STARTED a1"):
                assert retry.poll() is None
            with flowsdk.Client(url) as client:
                sync(client, "taken")  # the new runner answers requests: it read the store
                assert client.get_record("taken").attempt == 2
                assert client.queued_requests("taken") == []
                assert queued_json(url, "taken") == []
                ended = client.abort("taken", "a1", reason="for attempt 2")
                assert ended.outcome is flowsdk.Outcome.APPLIED
            _, err = retry.communicate("", timeout=TIMEOUT)  # the root's gate opens
        finally:
            if retry.poll() is None:
                retry.kill()
    assert retry.returncode == 0, err
    with flowsdk.Client(url) as client:
        run = client.get_run("taken")
    abort = run.action("a1").abort
    assert abort is not None
    assert (run.record.attempt, abort.reason) == (2, "for attempt 2")


def test_one_action_in_full_lists_the_queued_requests_that_reach_it() -> None:
    """By name, by its group, on the whole run; not another action's, group's or mark."""
    action = flowsdk.ActionRecord(
        run="r",
        name="a3",
        parent="a1",
        task="t.train",
        group="trials",
        phase=ActionPhase.RUNNING,
        attempt=1,
        started_at=None,
        ended_at=None,
        error=None,
        abort=None,
    )
    at = datetime.now(UTC)
    requests: list[flowsdk.AbortRequest | flowsdk.StopRequest | flowsdk.MarkFailedRequest] = [
        flowsdk.AbortRequest(run="r", action="a3"),
        flowsdk.AbortRequest(run="r", action="a4"),
        flowsdk.AbortRequest(run="r", group="trials"),
        flowsdk.AbortRequest(run="r", group="other"),
        flowsdk.AbortRequest(run="r"),
        flowsdk.StopRequest(run="r", abandon=True),
        flowsdk.MarkFailedRequest(run="r", action="a3"),
        flowsdk.MarkFailedRequest(run="r", action="a1"),
    ]
    queued = [
        flowsdk.QueuedRequest(id=n, at=at, taken=False, request=r)
        for n, r in enumerate(requests, 1)
    ]
    assert [q.id for q in concerning(queued, action)] == [1, 3, 5, 6, 7]
