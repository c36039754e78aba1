"""More adversarial scenarios (/work/shared/SCENARIOS.md): E1, E6, S4, M3 and J1, on SQLite.

Each test names its scenario. The runs are recorded in a real SQLite file under
`tmp_path` and read back with `flowsdk.Client`, as another process would; the
CLI is a real `python -m flowsdk` subprocess.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest

import flowsdk
from flowsdk import ActionPhase, RunPhase
from flowsdk.errors import ActionAbortedError, RunStoppedError, RuntimeUserError
from flowsdk.testing import Gate, sqlite_url
from tests.support import assert_clean, by_task, causes, phases
from tests.test_exceptions import hostile_run

# -- E1 / X11: KeyboardInterrupt and SystemExit are never retried ------------------------


@pytest.mark.parametrize(
    "make",
    [KeyboardInterrupt, lambda: SystemExit(3)],
    ids=["KeyboardInterrupt", "SystemExit3"],
)
def test_base_exception_in_a_retried_child_is_never_retried(
    tmp_path: Path, make: Callable[[], BaseException]
) -> None:
    """X11/E1: KeyboardInterrupt or SystemExit(3) in a `retries=3` child: one attempt, recorded.

    The child is FAILED at attempt 1 with the exception's type; the root is
    ABORTED with cause `sigint` and the live sibling `ancestor` (SPEC §3: a
    KeyboardInterrupt or SystemExit in a body is handled as a Ctrl-C); then the
    very exception leaves `flowsdk.run`, and the store shows all of it.
    """
    env = flowsdk.TaskEnvironment("e1retry")
    url = sqlite_url(tmp_path / "runs.db")
    raised = make()
    attempts: list[int] = []
    sibling_running = asyncio.Event()
    sibling_cleanups: list[str] = []

    @env.task
    async def sibling() -> None:
        sibling_running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            sibling_cleanups.append("cleaned")
            raise

    @env.task(retries=3, backoff=0)
    async def kid() -> None:
        attempts.append(flowsdk.current_action().attempt)
        raise raised

    @env.task
    async def root() -> None:
        pending = asyncio.create_task(sibling())
        await sibling_running.wait()  # the sibling is a1, the kid a2
        await kid()
        await pending

    with pytest.raises(type(raised)) as info:
        flowsdk.run(root, name="e1retry", store=url)
    assert info.value is raised
    assert attempts == [1]
    assert sibling_cleanups == ["cleaned"]
    with flowsdk.Client(url) as client:
        run = client.get_run("e1retry")
    assert run.phase is RunPhase.ABORTED
    assert phases(run) == {"a0": "ABORTED", "a1": "ABORTED", "a2": "FAILED"}
    assert causes(run) == {"a0": "sigint", "a1": "ancestor", "a2": None}
    [record] = by_task(run, "kid")
    assert record.attempt == 1
    assert record.error is not None
    assert record.error.type == type(raised).__name__
    assert_clean(run)


BASE_EXCEPTION_WORKFLOW = """
import asyncio
import logging

import flowsdk

env = flowsdk.TaskEnvironment("e1cli")


running = asyncio.Event()


@env.task
async def sibling() -> None:
    running.set()
    await asyncio.Event().wait()


@env.task(retries=3, backoff=0)
async def kid(how: str) -> None:
    with open("attempts.log", "a") as f:
        f.write(f"{flowsdk.current_action().attempt}\\n")
    if how == "interrupt":
        raise KeyboardInterrupt
    raise SystemExit(3)


@env.task
async def root(how: str) -> None:
    pending = asyncio.create_task(sibling())
    await running.wait()
    await kid(how)
    await pending
"""


@pytest.mark.parametrize(
    ("how", "code", "kind"),
    [("interrupt", 130, "KeyboardInterrupt"), ("exit", 3, "SystemExit")],
)
def test_cli_run_exits_as_the_base_exception_raised_in_a_child(
    tmp_path: Path, how: str, code: int, kind: str
) -> None:
    """E1: `flowsdk run` exits 130 for a child's KeyboardInterrupt, 3 for its SystemExit(3).

    README "Exit codes": 130 is "interrupted by Ctrl-C"; a SystemExit keeps its
    normal exit semantics (SPEC guarantee 9). The run is recorded before the
    process leaves, without a Python traceback on stderr, and the child ran once.
    """
    (tmp_path / "wf.py").write_text(BASE_EXCEPTION_WORKFLOW)
    proc = subprocess.run(
        [sys.executable, "-m", "flowsdk", "run", "wf:root", how, "--name", "e1", "--quiet"],
        cwd=tmp_path,
        env={**os.environ, "FLOWSDK_STORE": "sqlite:///runs.db", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.splitlines() == ["run e1: ABORTED"]
    assert (tmp_path / "attempts.log").read_text() == "1\n"
    with flowsdk.Client(sqlite_url(tmp_path / "runs.db")) as client:
        run = client.get_run("e1")
    assert run.phase is RunPhase.ABORTED
    [record] = by_task(run, "kid")
    assert record.phase is ActionPhase.FAILED
    assert record.attempt == 1
    assert record.error is not None
    assert record.error.type == kind
    assert causes(run) == {"a0": "sigint", "a1": "ancestor", "a2": None}
    assert_clean(run)


# -- E6: hostile exceptions, recorded in SQLite ---------------------------------------------


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class UnpicklableError(Exception):
    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("UnpicklableError cannot be pickled")


HUGE = 50_000_000  # characters: the message of a ~50 MB exception
MESSAGE_BOUND = 2_100  # flowsdk/_describe.py: 2,000 characters, then "... (N more characters)"
TRACEBACK_BOUND = 20_100  # flowsdk/_describe.py: 20,000 characters, then "\n...\n"


def _hostile(kind: str) -> tuple[BaseException, str, str | None]:
    """The exception, its recorded type name, and its exact recorded message (None: bounded)."""
    if kind == "unprintable":
        return UnprintableError(), "UnprintableError", "<unprintable UnprintableError>"
    if kind == "unpicklable":
        return UnpicklableError("cannot travel"), "UnpicklableError", "cannot travel"
    if kind == "huge-message":
        return ValueError("x" * HUGE), "ValueError", None
    return ValueError("y" * (HUGE // 2), "z" * (HUGE // 2)), "ValueError", None  # huge args


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["unprintable", "unpicklable", "huge-message", "huge-args"])
def test_hostile_exception_is_recorded_bounded_in_sqlite(tmp_path: Path, kind: str) -> None:
    """E6 on SQLite: the child is FAILED with a fallback or truncated message, read back bounded.

    The parent gets RuntimeUserError whose `__cause__` is the very exception; the
    store (read back with Client) holds the same type and a message no longer
    than flowsdk's limit, and the root's own failure reads back the same way.
    """
    url = sqlite_url(tmp_path / "runs.db")
    hostile, type_name, message = _hostile(kind)
    _, caught = hostile_run("e6", hostile, store=url, reraise=True)
    [err] = caught
    assert err.__cause__ is hostile
    with flowsdk.Client(url) as client:
        run = client.get_run("e6")
    assert run.phase is RunPhase.FAILED
    assert phases(run) == {"a0": "FAILED", "a1": "FAILED"}
    for name in ("a0", "a1"):
        error = run.action(name).error
        assert error is not None, name
        assert error.type.endswith(type_name), (name, error.type)
        assert len(error.message) <= MESSAGE_BOUND, (name, len(error.message))
        assert len(error.traceback) <= TRACEBACK_BOUND, (name, len(error.traceback))
        if message is not None:
            assert error.message == message
    with pytest.raises(RuntimeUserError) as stored:
        run.result()  # read from the store: the recorded type and message, no object
    assert stored.value.error_type.endswith(type_name)
    assert len(stored.value.error_message) <= MESSAGE_BOUND
    assert len(str(stored.value)) <= MESSAGE_BOUND + 1_000
    assert all(len(e.message or "") <= MESSAGE_BOUND + 1_000 for e in run.events)
    stored_bytes = sum(p.stat().st_size for p in tmp_path.glob("runs.db*"))
    assert stored_bytes < 5_000_000  # the 50 MB never reached the file
    assert_clean(run)


# -- S4: one task called 1,000 times concurrently ------------------------------------------


CALLS = 1_000


@pytest.mark.timeout(120)
def test_one_task_called_a_thousand_times_concurrently(tmp_path: Path) -> None:
    """S4: x = 0..999 at once: results in order, distinct names, each input and context its own.

    Every body is in flight before any returns (they wait for the last one to
    start), so the calls really overlap.
    """
    env = flowsdk.TaskEnvironment("s4")
    url = sqlite_url(tmp_path / "runs.db")
    everyone_started = asyncio.Event()
    seen: dict[int, tuple[str, str, str]] = {}

    @env.task
    async def double(x: int) -> int:
        before = flowsdk.current_action().name
        seen[x] = (before, "", "")
        if len(seen) == CALLS:
            everyone_started.set()
        await everyone_started.wait()
        after = flowsdk.current_action()
        seen[x] = (before, after.name, after.run)
        return 2 * x

    @env.task
    async def root() -> list[int]:
        return await asyncio.gather(*(double(x) for x in range(CALLS)))

    result = flowsdk.run(root, name="s4", store=url).result()
    assert result == [2 * x for x in range(CALLS)]
    with flowsdk.Client(url) as client:
        run = client.get_run("s4")
        children = by_task(run, "double")
        names = [a.name for a in children]
        assert len(set(names)) == CALLS
        assert len(run.actions) == CALLS + 1
        for x, (before, after, run_name) in seen.items():
            assert (before, after, run_name) == (before, before, "s4"), x
            detail = client.get_action("s4", before)
            assert detail.action.phase is ActionPhase.SUCCEEDED
            assert detail.inputs is not None
            args, kwargs = msgspec.msgpack.decode(detail.inputs)[:2]
            assert (args, kwargs) == ([x], {}), before
            assert detail.output is not None
            assert msgspec.msgpack.decode(detail.output) == 2 * x
    assert sorted(name for name, _, _ in seen.values()) == sorted(names)
    assert_clean(run)


# -- M3: a plain `def` task blocked in its worker thread ------------------------------------


class Blocked:
    """A plain `def` body's view of the test: it says when it runs and waits to be let go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self.threads: list[threading.Thread] = []

    def body(self) -> int:
        self.threads.append(threading.current_thread())
        self.entered.set()
        assert self.release.wait(30), "the test never released the worker thread"
        self.finished.set()
        return 7

    async def wait_entered(self) -> None:
        """Poll (the loop must not block) until the body runs in its thread, or fail."""
        deadline = time.monotonic() + 10
        while not self.entered.is_set():
            assert time.monotonic() < deadline, "the plain def body never started"
            await asyncio.sleep(0.005)  # polling a thread's Event: the loop must not block

    def let_go(self) -> None:
        """Release the thread and wait for it to end: no thread outlives the test."""
        self.release.set()
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive(), thread


async def test_external_abort_of_a_blocked_plain_def_task(tmp_path: Path) -> None:
    """M3 (a): abort of a sync action blocked in its thread: ABORTED external, parent told at once.

    README "plain def": the action is recorded by the request at once and its
    parent gets ActionAbortedError without waiting for the thread; the action
    is `cleanup_incomplete` (the thread was still running); the thread's late
    result is discarded.
    """
    env = flowsdk.TaskEnvironment("m3abort")
    url = sqlite_url(tmp_path / "runs.db")
    blocked = Blocked()
    parent_saw: list[str] = []

    @env.task
    def blocking() -> int:
        return blocked.body()

    @env.task
    async def root() -> str:
        try:
            await blocking()
        except ActionAbortedError as exc:
            parent_saw.append(f"{exc.action} {exc.cause} {blocked.finished.is_set()}")
            return "aborted"
        return "value"

    try:
        handle = await flowsdk.start(root, name="m3a", store=url)
        await blocked.wait_entered()
        result = await handle.abort("a1", reason="stuck")
        run = await handle.wait()
        assert not blocked.finished.is_set()  # the run ended while the thread was blocked
    finally:
        blocked.let_go()
    assert result.outcome == "applied"
    assert run.result() == "aborted"
    assert parent_saw == ["a1 external False"]
    record = run.action("a1")
    assert record.phase is ActionPhase.ABORTED
    assert record.abort is not None
    assert (record.abort.cause.value, record.abort.reason) == ("external", "stuck")
    assert record.cleanup_incomplete is True
    for _ in range(10):  # a late result would be handed to the loop: give it turns
        await asyncio.sleep(0)
    with flowsdk.Client(url) as client:
        late = client.get_action("m3a", "a1")
    assert late.action.phase is ActionPhase.ABORTED  # the late 7 is discarded
    assert late.output is None
    assert_clean(run)


def test_root_exit_while_a_plain_def_task_is_blocked(tmp_path: Path) -> None:
    """M3 (b): the root returns while a sync child blocks: ABORTED root_exit, cleanup incomplete.

    `flowsdk.run` returns without waiting for the thread (it cannot be
    interrupted); the thread is let go by the test afterwards.
    """
    env = flowsdk.TaskEnvironment("m3exit")
    url = sqlite_url(tmp_path / "runs.db")
    blocked = Blocked()

    @env.task
    def blocking() -> int:
        return blocked.body()

    @env.task
    async def root() -> int:
        asyncio.create_task(blocking())  # noqa: RUF006 -- left running on purpose
        await blocked.wait_entered()
        return 1

    try:
        run = flowsdk.run(root, name="m3b", store=url)
        returned_while_blocked = not blocked.finished.is_set()
    finally:
        blocked.let_go()
    assert returned_while_blocked
    assert run.result() == 1
    with flowsdk.Client(url) as client:
        stored = client.get_run("m3b")
    for seen in (run, stored):
        assert seen.phase is RunPhase.SUCCEEDED
        assert phases(seen) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
        assert causes(seen) == {"a0": None, "a1": "root_exit"}
        assert seen.action("a1").cleanup_incomplete is True
        assert_clean(seen)


# -- J1: stop and abandon while a child swallows its cancellation ----------------------------


@pytest.mark.parametrize("via", ["handle", "client"])
async def test_stop_and_abandon_does_not_wait_for_a_swallowing_child(
    tmp_path: Path, via: str
) -> None:
    """J1: stop-and-abandon with a child that swallows CancelledError: run STOPPED at once.

    Every action in progress (the root, the swallower, an honest sibling) is
    ABANDONED with cause `stop` and `cleanup_incomplete=True`, and
    `handle.wait()` returns while the swallower still waits for its Event,
    released only at the end.
    """
    env = flowsdk.TaskEnvironment(f"j1{via}")
    url = sqlite_url(tmp_path / "runs.db")
    gate = Gate("honest")
    swallowing = asyncio.Event()
    release = asyncio.Event()
    swallowed: list[str] = []
    swallower_done = asyncio.Event()

    @env.task
    async def swallower() -> str:
        try:
            swallowing.set()
            while not release.is_set():
                try:
                    await release.wait()
                except asyncio.CancelledError as exc:
                    swallowed.append(str(exc))
            return "released"
        finally:
            swallower_done.set()

    @env.task
    async def honest() -> None:
        await gate.enter()

    @env.task
    async def root() -> None:
        tasks = [asyncio.create_task(swallower()), asyncio.create_task(honest())]
        await asyncio.gather(*tasks)

    def stop_from_a_client() -> flowsdk.ControlResult:
        with flowsdk.Client(url) as client:
            return client.stop("j1", abandon=True, reason="leaving")

    handle = await flowsdk.start(root, name="j1", store=url)
    try:
        await gate.wait_running()
        await swallowing.wait()
        if via == "handle":
            result = await handle.stop(abandon=True, reason="leaving")
        else:  # from another thread, through the SQLite store, as another process would
            with ThreadPoolExecutor(1) as pool:
                result = await asyncio.get_running_loop().run_in_executor(pool, stop_from_a_client)
        async with asyncio.timeout(30):  # a hang guard: waiting for the swallower is the bug
            run = await handle.wait()
        waited_for_swallower = swallower_done.is_set()
    finally:
        release.set()
        await swallower_done.wait()
    assert result.outcome == "applied"
    assert not waited_for_swallower
    assert swallowed  # it did get the cancel, and swallowed it
    with flowsdk.Client(url) as client:
        stored = client.get_run("j1")
    for seen in (run, stored):
        assert seen.phase is RunPhase.STOPPED
        assert phases(seen) == {"a0": "ABANDONED", "a1": "ABANDONED", "a2": "ABANDONED"}
        assert causes(seen) == {"a0": "stop", "a1": "stop", "a2": "stop"}
        assert all(a.cleanup_incomplete for a in seen.actions), seen.actions
        assert {a.abort.reason for a in seen.actions if a.abort} == {"leaving"}
        with pytest.raises(RunStoppedError):
            seen.result()
        assert_clean(seen)


def test_stop_and_abandon_lets_flowsdk_run_return_past_a_swallowing_child(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """J1 with `flowsdk.run`: a swallower that never ends cannot keep the run from returning.

    An operator (a `Client` in another thread, through the SQLite file) stops
    and abandons the run while its child swallows every cancel; `flowsdk.run`
    returns, the run is STOPPED with both actions ABANDONED (`stop`,
    `cleanup_incomplete`), and a warning names the abandoned body. The loop is
    closed by then, so the swallower is never released: nothing may complain.
    """
    env = flowsdk.TaskEnvironment("j1run")
    url = sqlite_url(tmp_path / "runs.db")
    swallowing = threading.Event()
    swallowed: list[str] = []
    stopped: list[flowsdk.ControlResult] = []

    @env.task
    async def swallower() -> None:
        never = asyncio.Event()
        swallowing.set()
        while True:
            try:
                await never.wait()
            except asyncio.CancelledError as exc:
                swallowed.append(str(exc))

    @env.task
    async def root() -> None:
        await asyncio.create_task(swallower())

    def operator() -> None:
        assert swallowing.wait(30), "the swallower never ran"
        with flowsdk.Client(url) as client:
            stopped.append(client.stop("j1run", abandon=True, reason="leaving"))

    thread = threading.Thread(target=operator, name="j1-operator")
    thread.start()
    try:
        with caplog.at_level(logging.WARNING, logger="flowsdk"):
            run = flowsdk.run(root, name="j1run", store=url)
    finally:
        thread.join(30)
    assert not thread.is_alive()
    [result] = stopped
    assert result.outcome == "applied"
    assert swallowed  # the body got the cancel and swallowed it
    assert any("swallower" in r.getMessage() for r in caplog.records if r.name == "flowsdk")
    with flowsdk.Client(url) as client:
        stored = client.get_run("j1run")
    for seen in (run, stored):
        assert seen.phase is RunPhase.STOPPED
        assert phases(seen) == {"a0": "ABANDONED", "a1": "ABANDONED"}
        assert causes(seen) == {"a0": "stop", "a1": "stop"}
        assert all(a.cleanup_incomplete for a in seen.actions)
        assert_clean(seen)
