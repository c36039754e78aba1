"""Retrying a run: replay what succeeded, run the rest again (SPEC §6).

The retried workflows live in tests/retry_workflows (a retry imports the root
task again by its recorded path). A first attempt that must die or be
controlled from outside runs in a subprocess (`tests.runners.harness.Runner`);
the retry runs here, through `flowsdk.Client.retry`. Bodies count their
executions in files under `workdir`, so a test can tell a replayed action
(body not run) from one that ran again.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from flowsdk import EventKind, RunPhase
from flowsdk.errors import InvalidStateError, NondeterminismError, RuntimeUserError
from flowsdk.store import MemoryStore
from tests.retry_workflows import count, pipeline
from tests.runners.harness import ROOT, Runner, sqlite_url, sync
from tests.support import assert_clean, phases

WORKFLOWS = Path(__file__).resolve().parent / "retry_workflows"
PIPELINE_DONE = ["a-done", "b-done", "c-done", "d-done", "e-done", "f-done"]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "s.db")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def by_key(run: flowsdk.Run[Any]) -> dict[str, tuple[str, bool]]:
    """Map each action's key to (phase, replayed)."""
    return {a.key: (a.phase.value, a.replayed) for a in run.actions}


def counts(workdir: Path, *names: str) -> dict[str, int]:
    return {name: count(workdir, name) for name in names}


# -- retry after a kill, an abort or a stop -----------------------------------------------


@pytest.mark.parametrize(
    ("how", "run_phase", "unfinished"),
    [
        ("kill", "CRASHED", "CRASHED"),
        ("abort", "ABORTED", "ABORTED"),
        ("stop-abandon", "STOPPED", "ABANDONED"),
    ],
)
def test_retry_replays_what_succeeded_and_runs_the_rest_again(
    how: str, run_phase: str, unfinished: str, url: str, workdir: Path
) -> None:
    """After it ended: a, b, c replayed (bodies not run); root, d, e rerun, f for the first time."""
    with (
        Runner(str(WORKFLOWS / "runner.py"), url, "p2", str(workdir)) as runner,
        flowsdk.Client(url) as client,
    ):
        assert {runner.expect("STARTED")[1] for _ in range(2)} == {"d", "e"}
        sync(client, "p2")  # a, b, c are recorded SUCCEEDED with their outputs
        if how == "kill":
            runner.proc.kill()
            runner.proc.wait(timeout=30)
        elif how == "abort":
            client.abort("p2", reason="operator")
            assert runner.finish() == 0
        else:
            client.stop("p2", abandon=True)
            assert runner.finish() == 0
        (workdir / "release").touch()
        run = client.retry("p2")
        first = client.get_run("p2", attempt=1)
        latest = client.get_run("p2")
        history = [(r.name, r.attempt, r.phase.value) for r in client.runs()]
    assert (run.name, run.phase, run.attempt) == ("p2", RunPhase.SUCCEEDED, 2)
    assert run.result() == PIPELINE_DONE
    assert by_key(run) == {
        "a0": ("SUCCEEDED", False),
        "a0/1": ("SUCCEEDED", True),
        "a0/2": ("SUCCEEDED", True),
        "a0/3": ("SUCCEEDED", True),
        "a0/4": ("SUCCEEDED", False),
        "a0/5": ("SUCCEEDED", False),
        "a0/6": ("SUCCEEDED", False),
    }
    assert counts(workdir, "root", "a", "b", "c", "d", "e", "f") == {
        "root": 2,
        "a": 1,
        "b": 1,
        "c": 1,
        "d": 2,  # at least once: its first execution never recorded an end
        "e": 2,
        "f": 1,
    }
    assert (first.attempt, first.phase.value) == (1, run_phase)
    assert {k: phase for k, (phase, _) in by_key(first).items()} == {
        "a0": unfinished,
        "a0/1": "SUCCEEDED",
        "a0/2": "SUCCEEDED",
        "a0/3": "SUCCEEDED",
        "a0/4": unfinished,
        "a0/5": unfinished,
    }
    assert (latest.attempt, latest.result()) == (2, PIPELINE_DONE)
    assert history == [("p2", 2, "SUCCEEDED")]
    assert_clean(run)


def test_retry_of_a_failed_run_replays_what_succeeded(url: str, workdir: Path) -> None:
    """After a fix, a FAILED run's retry replays a and b and runs check and c."""
    first = flowsdk.run(pipeline.failing, str(workdir), name="failed", store=url)
    assert first.phase is RunPhase.FAILED
    (workdir / "fixed").touch()
    with flowsdk.Client(url) as client:
        run = client.retry("failed")
        stored_first = client.get_run("failed", attempt=1)
    assert (run.phase, run.attempt) == (RunPhase.SUCCEEDED, 2)
    assert run.result() == ["a-done", "b-done", "c-done"]
    assert by_key(run) == {
        "a0": ("SUCCEEDED", False),
        "a0/1": ("SUCCEEDED", True),
        "a0/2": ("SUCCEEDED", True),
        "a0/3": ("SUCCEEDED", False),
        "a0/4": ("SUCCEEDED", False),
    }
    assert counts(workdir, "failing", "a", "b", "check", "c") == {
        "failing": 2,
        "a": 1,
        "b": 1,
        "check": 2,
        "c": 1,
    }
    assert stored_first.phase is RunPhase.FAILED
    assert phases(stored_first) == phases(first)
    replayed = [a.name for a in run.actions if a.replayed]
    for name in replayed:  # QUEUED -> SUCCEEDED: never RUNNING, no body
        assert [e.phase for e in run.events if e.action == name] == ["QUEUED", "SUCCEEDED"]
        assert all(e.kind is EventKind.ACTION for e in run.events if e.action == name)
    assert_clean(run)


def test_retry_replays_the_calls_a_gather_made(url: str, workdir: Path) -> None:
    """Calls given to `gather` are replayed too: their bodies do not run again."""
    first = flowsdk.run(pipeline.gathered, str(workdir), name="gathered", store=url)
    assert first.phase is RunPhase.FAILED
    (workdir / "fixed").touch()
    with flowsdk.Client(url) as client:
        run = client.retry("gathered")
    assert (run.phase, run.attempt) == (RunPhase.SUCCEEDED, 2)
    assert run.result() == ["a-done", "b-done", "c-done"]
    assert by_key(run) == {
        "a0": ("SUCCEEDED", False),
        "a0/1": ("SUCCEEDED", True),
        "a0/2": ("SUCCEEDED", True),
        "a0/3": ("SUCCEEDED", False),
        "a0/4": ("SUCCEEDED", False),
    }
    assert counts(workdir, "a", "b", "check", "c") == {"a": 1, "b": 1, "check": 2, "c": 1}
    assert_clean(run)


def test_a_second_retry_replays_what_the_first_retry_replayed(url: str, workdir: Path) -> None:
    """Replayed actions are recorded with their outputs, so attempt 3 replays them too."""
    flowsdk.run(pipeline.failing, str(workdir), name="thrice", store=url)
    with flowsdk.Client(url) as client:
        second = client.retry("thrice")  # not fixed yet: fails again at check
        (workdir / "fixed").touch()
        third = client.retry("thrice")
    assert [(r.attempt, r.phase.value) for r in (second, third)] == [
        (2, "FAILED"),
        (3, "SUCCEEDED"),
    ]
    assert by_key(third) == {
        "a0": ("SUCCEEDED", False),
        "a0/1": ("SUCCEEDED", True),
        "a0/2": ("SUCCEEDED", True),
        "a0/3": ("SUCCEEDED", False),
        "a0/4": ("SUCCEEDED", False),
    }
    assert counts(workdir, "a", "b", "check", "c") == {"a": 1, "b": 1, "check": 3, "c": 1}
    assert_clean(third)


def test_a_retried_runs_errors_keep_only_their_own_traceback(url: str, workdir: Path) -> None:
    """`Client.retry` runs the next attempt outside any handler of its own.

    Run inside one, every exception the run raised had that handled exception
    chained as its context, and every recorded traceback began with it.
    """
    flowsdk.run(pipeline.failing, str(workdir), name="chained", store=url)
    with flowsdk.Client(url) as client:
        second = client.retry("chained")  # not fixed: fails again at check
    assert second.phase is RunPhase.FAILED
    failed = [a for a in second.actions if a.error is not None]
    assert failed
    for action in failed:
        assert action.error is not None
        assert "get_running_loop" not in action.error.traceback
        assert "During handling of the above exception" not in action.error.traceback


def test_retry_replays_what_succeeded_in_an_attempt_before_the_last(
    url: str, workdir: Path
) -> None:
    """Attempt 2 failed before calling anything; attempt 3 still replays attempt 1's a, b."""
    flowsdk.run(pipeline.failing, str(workdir), name="early", store=url)
    (workdir / "fail-early").touch()
    with flowsdk.Client(url) as client:
        second = client.retry("early")
        (workdir / "fail-early").unlink()
        (workdir / "fixed").touch()
        third = client.retry("early")
    assert by_key(second) == {"a0": ("FAILED", False)}
    assert (third.attempt, third.phase) == (3, RunPhase.SUCCEEDED)
    assert counts(workdir, "a", "b", "check", "c") == {"a": 1, "b": 1, "check": 2, "c": 1}
    assert by_key(third) == {
        "a0": ("SUCCEEDED", False),
        "a0/1": ("SUCCEEDED", True),
        "a0/2": ("SUCCEEDED", True),
        "a0/3": ("SUCCEEDED", False),
        "a0/4": ("SUCCEEDED", False),
    }
    assert_clean(third)


# -- a retry that diverges from its history --------------------------------------------------


def test_retry_replays_a_call_made_with_the_same_values_by_keyword_or_default(
    url: str, workdir: Path
) -> None:
    """`step("b", w)`, then `step(workdir=w, name="b", suffix="-done")`: the same call."""
    first = flowsdk.run(pipeline.diverging, str(workdir), name="p4", store=url)
    assert first.phase is RunPhase.FAILED  # check failed: a0/3
    (workdir / "by-keyword").touch()
    (workdir / "fixed").touch()
    with flowsdk.Client(url) as client:
        run = client.retry("p4")
    assert run.phase is RunPhase.SUCCEEDED, run.result
    assert run.result() == ["a-done", "b-done"]
    assert by_key(run)["a0/2"] == ("SUCCEEDED", True)
    assert counts(workdir, "a", "b", "check") == {"a": 1, "b": 1, "check": 2}
    assert_clean(run)


@pytest.mark.parametrize(("flag", "called"), [("other-input", "B"), ("other-task", "other-b")])
def test_retry_that_calls_differently_raises_nondeterminism_error(
    flag: str, called: str, url: str, workdir: Path
) -> None:
    """The call at a recorded key with other inputs or another task raises, naming the key."""
    first = flowsdk.run(pipeline.diverging, str(workdir), name="p3", store=url)
    assert first.phase is RunPhase.FAILED  # check failed: a0/3
    (workdir / flag).touch()
    (workdir / "fixed").touch()
    with flowsdk.Client(url) as client:
        run = client.retry("p3")
    assert run.phase is RunPhase.FAILED
    with pytest.raises(RuntimeUserError) as info:
        run.result()
    error = info.value.__cause__
    assert isinstance(error, NondeterminismError)
    assert "a0/2" in str(error)
    assert "pipeline.step" in str(error)
    if flag == "other-task":
        assert "pipeline.other" in str(error)
    assert count(workdir, "raised-by-call") == 1  # from task(...), not from the await
    # No recorded result was handed to the diverging call, and its body never ran.
    assert by_key(run) == {"a0": ("FAILED", False), "a0/1": ("SUCCEEDED", True)}
    assert counts(workdir, "a", "b", called, "check") == {"a": 1, "b": 1, called: 0, "check": 1}
    assert_clean(run)


def test_nondeterminism_in_a_child_is_not_retried_away(url: str, workdir: Path) -> None:
    """A NondeterminismError is not a user error: the child's retries=1 must not rerun it.

    Its second attempt's calls have keys of their own (a0/1@2/...), which the
    history does not hold: retrying would execute the diverging call after all.
    """
    first = flowsdk.run(pipeline.staged, str(workdir), name="staged", store=url)
    assert by_key(first)["a0/1/1"] == ("SUCCEEDED", False)
    (workdir / "other-input").touch()
    (workdir / "fixed").touch()
    with flowsdk.Client(url) as client:
        run = client.retry("staged")
    assert run.phase is RunPhase.FAILED
    stage = run.actions[1]
    assert (stage.key, stage.phase.value, stage.attempt) == ("a0/1", "FAILED", 1)
    assert stage.error is not None
    assert stage.error.type.endswith("NondeterminismError")
    assert "a0/1/1" in stage.error.message
    assert count(workdir, "B") == 0
    assert by_key(run) == {"a0": ("FAILED", False), "a0/1": ("FAILED", False)}
    assert_clean(run)


# -- refused retries ----------------------------------------------------------------------------


def test_retry_of_a_succeeded_run_is_refused(url: str, workdir: Path) -> None:
    """SPEC §6: retrying a SUCCEEDED run raises InvalidStateError and records no attempt."""
    (workdir / "release").touch()
    flowsdk.run(pipeline.root, str(workdir), name="done", store=url)
    with flowsdk.Client(url) as client:
        with pytest.raises(InvalidStateError, match="SUCCEEDED"):
            client.retry("done")
        assert client.get_run("done").attempt == 1
    assert count(workdir, "root") == 1


async def test_retry_of_a_live_run_is_refused(url: str, workdir: Path) -> None:
    """SPEC §6: retrying a RUNNING run raises InvalidStateError; the run goes on."""
    handle = await flowsdk.start(pipeline.hold, "live", str(workdir), name="live", store=url)
    with flowsdk.Client(url) as client, pytest.raises(InvalidStateError, match="RUNNING"):
        client.retry("live")
    assert handle.phase is RunPhase.RUNNING
    await handle.abort(reason="done testing")
    run = await handle.wait()
    assert (run.phase, run.attempt) == (RunPhase.ABORTED, 1)
    assert_clean(run)


# -- a script run as __main__ --------------------------------------------------------------------


def test_retry_of_a_script_run_as_main_does_not_run_its_main_block_again(
    url: str, workdir: Path
) -> None:
    """SPEC §6: the run records the script's path; the retry imports it under another name."""
    script = WORKFLOWS / "script.py"
    with Runner(str(script), url, "script", str(workdir)) as runner:
        runner.expect("RESULT", "FAILED")
        assert runner.finish() == 0
    (workdir / "fixed").touch()
    with flowsdk.Client(url) as client:
        assert client.get_run("script").record.task == f"{script}:main"
        run = client.retry("script")
    assert (run.phase, run.attempt) == (RunPhase.SUCCEEDED, 2)
    assert run.result() == "worked"
    assert (workdir / "main.marker").read_text().splitlines() == ["main block ran"]
    assert count(workdir, "work") == 2
    assert_clean(run)


def test_retry_of_a_module_run_with_dash_m_imports_it_as_that_module(
    url: str, workdir: Path
) -> None:
    """SPEC §6: `python -m pkg.mod` (with relative imports) is retried without its main block."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.retry_workflows.module_main", url, "dash-m", str(workdir)],
        cwd=ROOT,
        env={**os.environ, "FLOWSDK_STORE": url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.stdout.splitlines() == ["RESULT FAILED"], proc.stdout + proc.stderr
    (workdir / "fixed").touch()
    with flowsdk.Client(url) as client:
        run = client.retry("dash-m")
    assert (run.phase, run.attempt) == (RunPhase.SUCCEEDED, 2)
    assert run.result() == "worked"
    assert counts(workdir, "main-block", "work") == {"main-block": 1, "work": 2}
    assert_clean(run)


# -- keys, cache, stored results ----------------------------------------------------------------


def test_children_of_a_later_attempt_of_an_action_get_keys_of_their_own() -> None:
    """SPEC §6 keys: the children of attempt 2 of a0/1 are a0/1@2/1 and a0/1@2/2."""
    env = flowsdk.TaskEnvironment("keys")

    @env.task
    async def leaf(i: int) -> int:
        return i

    @env.task(retries=1, backoff=0)
    async def flaky() -> int:
        total = await leaf(1) + await leaf(2)
        if flowsdk.current_action().attempt == 1:
            raise ValueError("first attempt fails")
        return total

    @env.task
    async def root() -> int:
        return await flaky()

    run = flowsdk.run(root)
    assert run.result() == 3
    assert [(a.name, a.key) for a in run.actions] == [
        ("a0", "a0"),
        ("a1", "a0/1"),
        ("a2", "a0/1/1"),
        ("a3", "a0/1/2"),
        ("a4", "a0/1@2/1"),
        ("a5", "a0/1@2/2"),
    ]
    assert run.action("a1").attempt == 2
    assert_clean(run)


def cached_square(version: str | None, bodies: list[int]) -> flowsdk.Task[[], int]:
    """A root calling `cache.square(4)` with cache=True at `version` (None: the source hash)."""
    env = flowsdk.TaskEnvironment("cache", cache=True, cache_version=version)

    @env.task
    async def square(x: int) -> int:
        bodies.append(x)
        return x * x

    @env.task(cache=False)
    async def root() -> int:
        return await square(4)

    return root


def test_cache_reuses_an_output_for_the_same_values_however_they_are_passed(url: str) -> None:
    """`scale(4)`, `scale(x=4)`, `scale(4, by=2)`: one call; `scale(4, by=3)` another."""
    env = flowsdk.TaskEnvironment("cache-bound", cache=True, cache_version="1")
    bodies: list[tuple[int, int]] = []

    @env.task
    async def scale(x: int, by: int = 2) -> int:
        bodies.append((x, by))
        return x * by

    @env.task(cache=False)
    async def root() -> list[int]:
        return [await scale(4), await scale(x=4), await scale(4, by=2), await scale(4, by=3)]

    runs = [flowsdk.run(root, store=url) for _ in range(2)]
    assert [r.result() for r in runs] == [[8, 8, 8, 12]] * 2
    assert bodies == [(4, 2), (4, 3)]
    assert [a.replayed for a in runs[0].actions[1:]] == [False, True, True, False]
    assert [a.replayed for a in runs[1].actions[1:]] == [True] * 4


def test_cache_reuses_an_output_across_runs_of_the_same_store(url: str) -> None:
    """SPEC §6 cache=True: same task version and inputs -> replayed; another version runs."""
    bodies: list[int] = []
    runs = [
        flowsdk.run(cached_square(version, bodies), store=url) for version in (None, None, "2", "2")
    ]
    assert [r.result() for r in runs] == [16, 16, 16, 16]
    assert [r.action("a1").replayed for r in runs] == [False, True, False, True]
    assert bodies == [4, 4]
    for r in runs:
        assert phases(r) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED"}
        assert_clean(r)


def test_a_value_returned_under_a_cancel_is_not_cached(url: str) -> None:
    """A body that absorbs a cancel (a pruned trial returning its loss so far) is SUCCEEDED.

    Its value answers that run's cancel, not those inputs: a later run computes
    the output in full instead of reusing it.
    """
    env = flowsdk.TaskEnvironment("absorbed", cache=True)
    bodies: list[str] = []
    started: list[asyncio.Event] = []

    @env.task
    async def train(epochs: int) -> float:
        loss = 1.0
        if started:
            started[0].set()
        try:
            for _ in range(epochs):
                loss /= 2
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            bodies.append("partial")
            return loss
        bodies.append("full")
        return loss

    @env.task(cache=False)
    async def stops_it() -> float:
        started.append(asyncio.Event())
        t = asyncio.create_task(train(10))
        await started[0].wait()  # its body runs (a cache lookup came first)
        t.cancel("early stop")
        return await t

    @env.task(cache=False)
    async def lets_it_run() -> float:
        return await train(10)

    first = flowsdk.run(stops_it, store=url)
    started.clear()
    second = flowsdk.run(lets_it_run, store=url)
    assert first.result() > 2**-10
    assert second.result() == 2**-10
    assert bodies == ["partial", "full"]
    assert second.action("a1").replayed is False


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_cache_reuses_an_output_within_one_run(kind: str, tmp_path: Path) -> None:
    """SPEC §6 cache=True: a second identical call in the same run is replayed, on any store."""
    env = flowsdk.TaskEnvironment("samerun")
    bodies: list[int] = []

    @env.task(cache=True)
    async def square(x: int) -> int:
        bodies.append(x)
        return x * x

    @env.task
    async def root() -> list[int]:
        first = [await square(4), await square(4)]
        return first + list(await asyncio.gather(square(4), square(5)))  # gathered calls too

    store = MemoryStore() if kind == "memory" else sqlite_url(tmp_path / "s.db")
    run = flowsdk.run(root, store=store)
    assert run.result() == [16, 16, 16, 25]
    assert bodies == [4, 5]
    assert [(a.key, a.replayed) for a in run.actions] == [
        ("a0", False),
        ("a0/1", False),
        ("a0/2", True),
        ("a0/3", True),
        ("a0/4", False),
    ]
    assert_clean(run)


def test_result_of_a_stored_succeeded_run_is_the_decoded_output(url: str) -> None:
    """SPEC §6: Client.get_run(...).result() decodes the recorded output of the root."""
    env = flowsdk.TaskEnvironment("stored")
    value = {"score": 0.5, "tags": ["a", "b"], "nested": {"n": [1, None, True]}}

    @env.task
    async def root() -> dict[str, Any]:
        return value

    flowsdk.run(root, name="stored", store=url)
    with flowsdk.Client(url) as client:
        assert client.get_run("stored").result() == value


race_env = flowsdk.TaskEnvironment("race")


@race_env.task
async def fails() -> int:
    raise ValueError("every attempt")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_retry_that_loses_the_race_for_its_attempt_says_another_retry_started_it(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two retries read attempt 1, both make attempt 2: the loser's error names the race."""
    from flowsdk import _runner  # the attempt number a retry computes, forced

    url = sqlite_url(tmp_path / "s.db") if kind == "sqlite" else request.getfixturevalue("pg_url")
    flowsdk.run(fails, name="raced", store=url)
    with flowsdk.Client(url) as client:
        assert client.retry("raced").record.attempt == 2  # the winner
        late = _runner.Runner(fails, (), {}, "raced", client.store, owns_loop=True, attempt=2)
        with pytest.raises(flowsdk.errors.RunExistsError) as lost:
            _runner.run_sync(late)
    assert "attempt 2 of run 'raced'" in str(lost.value)
    assert "started meanwhile, by another retry" in str(lost.value)
    assert "choose another name" not in str(lost.value)
