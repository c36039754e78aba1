"""Races of SCENARIOS.md: runners contending for one SQLite file (P14), abort racing a return (X3).

Also the leak bundle's own promise (tests/conftest.py): an async test that
leaves its task's `cancelling()` above 0 fails. The long campaigns of the same
scenarios are soak/races.py (`make soak`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
import types
from collections import Counter
from pathlib import Path

import msgspec
import pytest

import flowsdk
from flowsdk import AbortCause, ActionPhase, EventKind, RunPhase
from flowsdk.errors import ActionAbortedError
from flowsdk.testing import Gate
from tests.runners.harness import ROOT, WAIT, sqlite_url
from tests.support import TERMINAL, assert_clean

# -- P14: runners fanning out on one SQLite file --------------------------------------------

RUNNERS, LEAVES = 4, 1_000

# A runner: says it is ready (a file), waits for the test's go (a file), then runs one
# fan-out of N leaves on the shared store and prints its phase and result.
FAN_OUT_RUNNER = textwrap.dedent(
    """
    import asyncio
    import sys
    import time
    from pathlib import Path

    import flowsdk

    env = flowsdk.TaskEnvironment("p14")


    @env.task
    async def leaf(i: int) -> int:
        return 2 * i


    @env.task
    async def fan_out(n: int) -> int:
        return sum(await asyncio.gather(*(leaf(i) for i in range(n))))


    if __name__ == "__main__":
        store, name, n, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
        (folder / f"ready-{name}").touch()
        deadline = time.monotonic() + 60
        while not (folder / "go").exists():
            if time.monotonic() > deadline:
                sys.exit("the test never said go")
            time.sleep(0.001)  # polling the test's go file, bounded by the deadline
        run = flowsdk.run(fan_out, n, name=name, store=store)
        print("RESULT", run.phase.value, run.result(), flush=True)
    """
)


def _wait_for_files(
    folder: Path, pattern: str, count: int, procs: list[subprocess.Popen[str]]
) -> None:
    """Poll until `count` files match `pattern`; fail at once if a runner exits first."""
    deadline = time.monotonic() + WAIT
    while len(list(folder.glob(pattern))) < count:
        early = [p for p in procs if p.poll() is not None]
        if early:
            out, _ = early[0].communicate()
            pytest.fail(f"a runner exited ({early[0].returncode}) before its barrier: {out}")
        if time.monotonic() > deadline:
            pytest.fail(f"{len(list(folder.glob(pattern)))} of {count} runners ready in {WAIT} s")
        time.sleep(0.01)  # polling the runners' ready files, bounded by the deadline


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_runners_fanning_out_together_on_one_sqlite_file_all_succeed_and_end_recorded(
    tmp_path: Path,
) -> None:
    """P14, 4 runners of 1,000 leaves (soak/races.py: 20 of 5,000): contention fails no run.

    The runners start their runs in the same instant (a barrier file), so their first
    writes (the run's row) contend, and so do their last ones (the run's end).
    """
    script = tmp_path / "fan_out_runner.py"
    script.write_text(FAN_OUT_RUNNER)
    url = sqlite_url(tmp_path / "shared.db")
    names = [f"p14-{i}" for i in range(RUNNERS)]
    procs: list[subprocess.Popen[str]] = []
    try:
        for name in names:  # one by one: those started are reaped below if one fails to start
            procs.append(  # noqa: PERF401
                subprocess.Popen(
                    [sys.executable, str(script), url, name, str(LEAVES), str(tmp_path)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    cwd=tmp_path,
                )
            )
        _wait_for_files(tmp_path, "ready-*", RUNNERS, procs)
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    expected = sum(2 * i for i in range(LEAVES))
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
        assert out.splitlines()[-1] == f"RESULT SUCCEEDED {expected}", out
    with flowsdk.Client(url) as client:
        records = client.runs(limit=None)
        assert sorted(r.name for r in records) == names
        assert {r.phase for r in records} == {RunPhase.SUCCEEDED}
        for name in names:
            run = client.get_run(name)
            assert run.result() == expected
            assert len(run.actions) == LEAVES + 1
            assert Counter(a.phase for a in run.actions) == {ActionPhase.SUCCEEDED: LEAVES + 1}
            assert_clean(run)  # one terminal event each, none left non-terminal
    with contextlib.closing(sqlite3.connect(tmp_path / "shared.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# -- X3: abort racing completion ----------------------------------------------------------

X3_ITERATIONS, X3_RUNS_PER_FILE, X3_MAX_YIELDS = 200, 50, 4


class _Race:
    """What the current iteration's child and root share with the test."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new gate, nothing seen: for the next run."""
        self.gate = Gate("x3")
        self.seen: list[int | ActionAbortedError] = []


def _stored_a1(conn: sqlite3.Connection, run: str) -> tuple[str, bytes | None] | None:
    """The phase and output column of `run`'s a1 as committed now (a read: never waits)."""
    row = conn.execute(
        "SELECT phase, output FROM actions WHERE run = ? AND name = 'a1'", (run,)
    ).fetchone()
    return None if row is None else (row[0], row[1])


@pytest.mark.slow
async def test_abort_racing_a_returned_child_ends_in_exactly_one_consistent_outcome(
    tmp_path: Path,
) -> None:
    """X3 on SQLite, 200 times: ABORTED, the parent's error and no output, or SUCCEEDED, 7, stored.

    The child is released from its gate and the abort follows after 0 to 4 loop steps
    (seeded): with none, the body has not returned; after one it has, and its result is
    not yet committed (the writer commits a batch every 10 ms). Both sides must win
    some iterations, and the success must have been uncommitted at the abort at least once.
    """
    env = flowsdk.TaskEnvironment("x3_race")
    race = _Race()

    @env.task
    async def child() -> int:
        await race.gate.enter()
        return 7

    @env.task
    async def root() -> None:
        try:
            race.seen.append(await child())
        except ActionAbortedError as exc:
            race.seen.append(exc)

    outcomes: Counter[str] = Counter()
    uncommitted_successes = 0
    for first in range(0, X3_ITERATIONS, X3_RUNS_PER_FILE):
        path = tmp_path / f"x3-{first}.db"
        expected: dict[str, ActionPhase] = {}
        for i in range(first, first + X3_RUNS_PER_FILE):
            race.reset()
            yields = random.Random(i).randrange(X3_MAX_YIELDS + 1)
            name = f"x3-{i}"
            handle = await flowsdk.start(root, name=name, store=sqlite_url(path))
            await race.gate.wait_running()
            race.gate.release()
            for _ in range(yields):
                await asyncio.sleep(0)
            result = await handle.abort("a1")  # applied on this loop, in this step
            with contextlib.closing(sqlite3.connect(path)) as conn:
                at_abort = _stored_a1(conn, name)  # no loop step since the abort
            run = await handle.wait()
            record = run.action("a1")
            if record.phase is ActionPhase.SUCCEEDED:
                assert (result.outcome, race.seen) == ("already_ended", [7]), (i, result)
                assert "already finished: SUCCEEDED" in result.message
                uncommitted_successes += at_abort is None or at_abort[0] != "SUCCEEDED"
            else:
                assert record.phase is ActionPhase.ABORTED, (i, record.phase)
                assert result.outcome == "applied", (i, result)
                [error] = race.seen
                assert isinstance(error, ActionAbortedError), (i, error)
                assert (error.action, error.cause) == ("a1", "external")
                assert record.abort is not None
                assert record.abort.cause is AbortCause.EXTERNAL
            assert run.phase is RunPhase.SUCCEEDED
            assert_clean(run)
            expected[name] = record.phase
            outcomes[record.phase.value] += 1
        # What is stored, once every runner of the file has ended: the same single outcome.
        with flowsdk.Client(sqlite_url(path)) as client:
            for name, phase in expected.items():
                stored = client.get_action(name, "a1")
                assert stored.action.phase is phase, name
                terminal = [
                    e
                    for e in client.get_run(name).events
                    if e.kind is EventKind.ACTION and e.action == "a1" and e.phase in TERMINAL
                ]
                assert [e.phase for e in terminal] == [phase.value], name
                if phase is ActionPhase.SUCCEEDED:
                    assert stored.output is not None, name
                    assert msgspec.msgpack.decode(stored.output) == 7, name
                else:
                    assert stored.output is None, name
        with contextlib.closing(sqlite3.connect(path)) as conn:
            for name, phase in expected.items():
                column = _stored_a1(conn, name)
                assert column is not None, name
                assert column[0] == phase.value, name
                assert (column[1] is not None) == (phase is ActionPhase.SUCCEEDED), name
    assert outcomes["ABORTED"] > 0, outcomes
    assert outcomes["SUCCEEDED"] > 0, outcomes
    assert uncommitted_successes > 0, "no success was still uncommitted when its abort came"


# -- an operator's abort overtaking workflow code's cancel on its way down ---------------------


async def test_an_abort_reaches_a_descendant_that_a_code_cancel_has_not_reached_yet() -> None:
    """Found by `make soak` (the property test's abort scope): an abort is never absorbed.

    Workflow code cancels `middle`; its `gather` passes the cancel to `leaf` on the
    loop's next step (a chain is cancelled step by step, not by recursion). In this
    step an operator aborts `middle`: `leaf` is in progress, below it, and no cancel
    has reached it yet, so the abort's `ancestor` request is the one it gets. Its body,
    woken in the same step, returns a value before any cancel lands: under workflow
    code's own cancel that would be absorbed (SUCCEEDED); under an operator's abort it
    is ABORTED, as for any other action in progress below the aborted one.
    """
    env = flowsdk.TaskEnvironment("overtaken")
    started, go = asyncio.Event(), asyncio.Event()
    held: list[asyncio.Task[object]] = []
    names: dict[str, str] = {}

    @env.task
    async def leaf() -> int:
        names["leaf"] = flowsdk.current_action().name
        started.set()
        await go.wait()
        return 1

    @env.task
    async def middle() -> list[int | BaseException]:
        names["middle"] = flowsdk.current_action().name
        return list(await asyncio.gather(leaf(), return_exceptions=True))

    @env.task
    async def root() -> str:
        held.append(asyncio.create_task(middle()))
        try:
            await held[0]
        except asyncio.CancelledError:
            return "middle cancelled"
        return "middle returned"

    handle = await flowsdk.start(root, store="memory://")
    await started.wait()
    go.set()  # the leaf's body resumes on the next step, before any cancel is delivered
    held[0].cancel()  # workflow code's cancel of middle, on its way down to the leaf
    result = await handle.abort(names["middle"], reason="operator")  # applied in this step
    assert result.outcome == "applied", result
    run = await handle.wait()
    assert_clean(run)
    middle_record, leaf_record = run.action(names["middle"]), run.action(names["leaf"])
    assert middle_record.phase is ActionPhase.ABORTED
    assert middle_record.abort is not None
    assert middle_record.abort.cause is AbortCause.EXTERNAL
    assert leaf_record.phase is ActionPhase.ABORTED, leaf_record
    assert leaf_record.abort is not None
    assert leaf_record.abort.cause is AbortCause.ANCESTOR
    assert not [
        e for e in run.events if e.kind is EventKind.WARNING and "absorbed" in (e.message or "")
    ]


async def test_the_root_exit_reaches_a_descendant_that_a_code_cancel_has_not_reached_yet() -> None:
    """The same step with the root's exit instead of an abort: the lifetime rule reaches it.

    The root cancels `middle` (whose `gather` passes the cancel on to `leaf` on the next
    step) and returns at once. `leaf` is in progress and no cancel has reached it: the
    root's exit is the first that does, so its body gets `CancelledError` (SPEC §1), and
    it is ABORTED with cause `root_exit`, not recorded SUCCEEDED as if it had absorbed a
    cancel it never saw.
    """
    env = flowsdk.TaskEnvironment("outlived")
    started, go = asyncio.Event(), asyncio.Event()
    seen: list[str] = []

    @env.task
    async def leaf() -> int:
        started.set()
        try:
            await go.wait()
        except asyncio.CancelledError as exc:
            seen.append(str(exc))
            raise
        return 1

    @env.task
    async def middle() -> list[int | BaseException]:
        return list(await asyncio.gather(leaf(), return_exceptions=True))

    @env.task
    async def root() -> str:
        m = asyncio.create_task(middle())
        await started.wait()
        go.set()  # the leaf's body resumes on the next step
        m.cancel()  # on its way down to the leaf
        return "done"  # the root exits in this same step

    run = await flowsdk.run_async(root, store="memory://")
    assert_clean(run)
    assert run.phase is RunPhase.SUCCEEDED
    [leaf_record] = [a for a in run.actions if a.task == "outlived.leaf"]
    assert leaf_record.phase is ActionPhase.ABORTED, leaf_record
    assert leaf_record.abort is not None
    assert leaf_record.abort.cause is AbortCause.ROOT_EXIT
    [message] = seen
    assert "root_exit" in message, message
    assert not [
        e for e in run.events if e.kind is EventKind.WARNING and "absorbed" in (e.message or "")
    ]


# -- the leak bundle's cancelling() check ----------------------------------------------------

CANCELLING_TESTS = textwrap.dedent(
    """
    import asyncio


    def cancel_myself() -> asyncio.Task[object]:
        me = asyncio.current_task()
        assert me is not None
        me.cancel()
        return me


    async def test_leaves_one() -> None:
        me = cancel_myself()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass


    async def test_leaves_two() -> None:
        me = cancel_myself()
        me.cancel()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass


    async def test_uncancels() -> None:
        me = cancel_myself()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            me.uncancel()


    async def test_fails_on_its_own_with_one_left() -> None:
        me = cancel_myself()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass
        assert me.cancelling() == 0, "its own assertion"


    async def test_times_out_and_goes_on() -> None:
        try:
            async with asyncio.timeout(0):
                await asyncio.sleep(3600)
        except TimeoutError:
            pass


    def test_sync() -> None:
        pass
    """
)


@pytest.mark.slow
def test_an_async_test_leaving_its_own_cancelling_count_above_zero_fails(tmp_path: Path) -> None:
    """tests/conftest.py's check, run by pytest on a small test file under the repo's config.

    pytest-asyncio runs each async test in a task of its own: the check must look at
    that task (an async fixture's task would always say 0). A test that absorbed a
    cancel of itself fails and is named with its count; one that uncancelled, or that
    an `asyncio.timeout` cancelled and uncancelled, passes; a test failing on its own
    keeps its own error.
    """
    (tmp_path / "test_cancelling.py").write_text(CANCELLING_TESTS)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            # Only the plugins the check depends on: the others take seconds to load.
            "-p",
            "asyncio",
            "-p",
            "timeout",
            "-p",
            "tests.conftest",
            "-q",
            "-rA",
            str(tmp_path / "test_cancelling.py"),
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "PYTHONPATH": str(ROOT),
        },
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out  # tests failed (not an error of pytest itself)
    summary = {
        line.split()[1].split("::")[1]: line.split()[0]
        for line in out.splitlines()
        if line.startswith(("PASSED ", "FAILED ", "ERROR "))
    }
    assert summary == {
        "test_leaves_one": "FAILED",
        "test_leaves_two": "FAILED",
        "test_uncancels": "PASSED",
        "test_fails_on_its_own_with_one_left": "FAILED",
        "test_times_out_and_goes_on": "PASSED",
        "test_sync": "PASSED",
    }, out
    assert "test_cancelling.py::test_leaves_one left its own task's cancelling() at 1" in out
    assert "test_cancelling.py::test_leaves_two left its own task's cancelling() at 2" in out
    assert "its own assertion" in out
    assert "test_fails_on_its_own_with_one_left left its own" not in out


async def test_the_check_wraps_the_coroutine_this_test_runs_in() -> None:
    """In the suite as it runs (xdist and every plugin loaded), the test's task runs the check."""
    me = asyncio.current_task()
    assert me is not None
    coro = me.get_coro()
    assert isinstance(coro, types.CoroutineType)
    # The code's own name: functools.wraps gave the wrapper the test's `__qualname__`.
    assert coro.cr_code.co_qualname == "_checking_own_cancelling.<locals>.checked"
