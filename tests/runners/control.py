"""Workflows that a test controls from another process (tests/test_cross_process.py).

Usage: `python tests/runners/control.py STORE RUN WORKFLOW`. Each body prints
`STARTED <action> <function>` when it starts; a body that is cancelled prints
`CANCELLED <action>` and then `CLEANUP <action>` from its cleanup; a parent
prints `CAUGHT ...` with what its await raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import threading
import time
from asyncio import CancelledError
from pathlib import Path
from typing import Any

import flowsdk
from flowsdk.errors import ActionAbortedError, RunStoppingError, RuntimeUserError
from flowsdk.store import SQLiteStore
from flowsdk.store._postgres_schema import PgTarget
from tests.runners._common import STARTED, gate, main, say, started

env = flowsdk.TaskEnvironment("ctl")
# How long `blocker` blocks the loop: the runner probes its loop once a second
# (with its heartbeat) and warns when a probe waited 1 s or more, so a block of
# more than 2 s is certain to be reported.
BLOCK_FOR = 2.2
release = asyncio.Event()
victim_running = asyncio.Event()


def report(exc: BaseException) -> None:
    """Print what a parent's await raised: `CAUGHT <type> <action> <detail>`."""
    if isinstance(exc, ActionAbortedError):
        say("CAUGHT", type(exc).__name__, exc.action, exc.cause, exc.reason)
    elif isinstance(exc, RuntimeUserError):
        cause = exc.__cause__
        say(
            "CAUGHT",
            type(exc).__name__,
            exc.action,
            type(cause).__name__,
            getattr(cause, "action", None),
        )


@env.task
async def sleeper() -> None:
    """Run until cancelled."""
    name = started()
    try:
        await asyncio.sleep(3600)
    except CancelledError:
        say("CANCELLED", name)
        raise
    finally:
        say("CLEANUP", name)


@env.task
async def slow_cleanup() -> None:
    """Run until cancelled, then clean up until the test opens the gate."""
    name = started()
    try:
        await asyncio.sleep(3600)
    except CancelledError:
        say("CANCELLED", name)
        await gate()
        say("CLEANUP", name)
        raise


@env.task
async def worker() -> str:
    """Wait until the root releases the workers, then succeed."""
    name = started()
    try:
        await release.wait()
    except CancelledError:
        say("CANCELLED", name)
        raise
    say("FINISHED", name)
    return name


@env.task
async def ok() -> int:
    """Succeed at once."""
    started()
    return 1


@env.task
async def bad() -> int:
    """Fail at once."""
    started()
    raise ValueError("bad input")


@env.task
async def victim() -> None:
    """Run until its parent cancels it."""
    started()
    victim_running.set()
    await asyncio.sleep(3600)


@env.task
async def sibling() -> None:
    """A sibling of the action the test aborts mid-tree: it must keep running."""
    name = started()
    try:
        await asyncio.sleep(3600)
    finally:
        say("CLEANUP", name)


@env.task
async def blocker() -> None:
    """Block the event loop for BLOCK_FOR s; the abort request reaches the store meanwhile."""
    name = started()
    unblock_at = time.monotonic() + BLOCK_FOR
    [state] = wait_for_store(
        "SELECT state FROM requests WHERE run = ? ORDER BY id DESC LIMIT 1",
        flowsdk.current_action().run,
    )
    say("SAW-REQUEST", state)
    # Still blocking the loop on purpose: a body that blocks the loop is the
    # scenario under test (an abort while the body blocks the loop), so this sleep is the
    # behaviour, not a wait.
    time.sleep(max(0.0, unblock_at - time.monotonic()))  # noqa: ASYNC251 - blocking is the point
    try:
        await asyncio.sleep(3600)
    except CancelledError:
        say("CANCELLED", name)
        raise


@env.task
async def stuck() -> None:
    """Block the event loop until the file `$FLOWSDK_TEST_RELEASE` exists, then run until cancelled.

    Named by the environment, not argv: a retry of the run (`flowsdk retry`) reads it too.
    """
    name = started()
    released = Path(os.environ["FLOWSDK_TEST_RELEASE"])
    deadline = time.monotonic() + 60
    while not released.exists() and time.monotonic() < deadline:
        # Blocking the loop is the scenario under test (sync code in an async body):
        # requests reach the store meanwhile, and none is applied.
        time.sleep(0.005)  # noqa: ASYNC251 - blocking is the point
    say("UNBLOCKED", name)
    try:
        await asyncio.sleep(3600)
    except CancelledError:
        say("CANCELLED", name)
        raise


def wait_for_store(sql: str, *params: object) -> tuple[Any, ...]:
    """Poll the store, blocking the event loop, until `sql` finds a row; return it.

    Blocking the loop is the behaviour under test: the run's recorder thread
    keeps writing and reading the store, but nothing on the loop runs until
    this returns.
    """
    url = sys.argv[1]
    deadline = time.monotonic() + 30
    if url.startswith("postgres"):
        import psycopg

        with psycopg.connect(PgTarget(url).conninfo, autocommit=True) as pg:
            pg.execute("SET search_path TO flowsdk")
            while time.monotonic() < deadline:
                found = pg.execute(sql.replace("?", "%s"), params).fetchone()
                if found is not None:
                    return tuple(found)
                time.sleep(0.002)  # keeps the loop blocked: that is the scenario
        raise TimeoutError(f"the store never answered {sql!r}")
    with contextlib.closing(sqlite3.connect(SQLiteStore(url).path)) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(sql, params).fetchone()
            if row is not None:
                return tuple(row)
            time.sleep(0.002)  # keeps the loop blocked: that is the scenario
    raise TimeoutError(f"the store never answered {sql!r}")


@env.task
async def one_child() -> str:
    """Await one child that runs until cancelled; report what the await raised."""
    started()
    try:
        await sleeper()
    except (ActionAbortedError, RuntimeUserError) as exc:
        report(exc)
    return "done"


@env.task
async def one_slow_cleanup() -> str:
    """Await one child whose cleanup waits for the test; report what the await raised."""
    started()
    try:
        await slow_cleanup()
    except ActionAbortedError as exc:
        report(exc)
    return "done"


@env.task
async def one_blocker() -> str:
    """Await one child that blocks the loop; report what the await raised."""
    started()
    try:
        await blocker()
    except ActionAbortedError as exc:
        report(exc)
    return "done"


@env.task
async def one_stuck() -> str:
    """Await one child that blocks the loop until released; report what it raised; gate."""
    started()
    try:
        await stuck()
    except ActionAbortedError as exc:
        report(exc)
    await gate()
    return "done"


@env.task
async def fan_out() -> None:
    """Await two children that run until cancelled."""
    started()
    await asyncio.gather(sleeper(), sleeper())


@env.task
async def ended() -> None:
    """End a1 SUCCEEDED, a2 FAILED and a3 ABORTED (cancelled), then wait in a4."""
    started()
    await ok()
    with contextlib.suppress(RuntimeUserError):
        await bad()
    t = asyncio.create_task(victim())
    await victim_running.wait()
    t.cancel()
    with contextlib.suppress(CancelledError):
        await t
    say("READY")
    await sleeper()


@env.task
async def p() -> None:
    """The mid-tree action the test aborts: two children below it."""
    started()
    await asyncio.gather(sleeper(), sleeper())


@env.task
async def mid() -> None:
    """Start a sibling of `p`, then await `p` without catching what it raises."""
    started()
    asyncio.create_task(sibling())  # noqa: RUF006 -- the run holds every action's task
    await p()


@env.task
async def tree() -> None:
    """Build a tree to abort mid-way: root -> mid -> p -> two sleepers, and mid -> sibling."""
    started()
    try:
        await mid()
    except RuntimeUserError as exc:
        report(exc)
    await gate()


@env.task
async def stages() -> None:
    """Two stages: three sleepers in group stage1, then one in stage2."""
    started()
    with flowsdk.group("stage1"):
        await asyncio.gather(sleeper(), sleeper(), sleeper())
    with flowsdk.group("stage2"):
        await sleeper()


@env.task
async def stop_wait() -> list[str]:
    """Two workers; after the gate, try a new task, then release the workers."""
    started()
    workers = [asyncio.create_task(worker()) for _ in range(2)]
    await gate()
    try:
        await worker()
    except RunStoppingError as exc:
        say("REFUSED", type(exc).__name__)
    release.set()
    return list(await asyncio.gather(*workers))


@env.task
async def gated_create() -> int:
    """Create a child only once the test opens the gate (an abort racing its creation)."""
    started()
    await gate()
    return await ok()


@env.task
async def crash() -> None:
    """Reach 3 SUCCEEDED, 2 RUNNING and 1 QUEUED action, then block until killed."""
    started()
    for _ in range(3):
        await ok()
    running = [asyncio.create_task(sleeper()) for _ in range(2)]
    while len(STARTED) < 6:
        await asyncio.sleep(0)
    # Its action is QUEUED from here; its body's first step is scheduled after
    # this one, which blocks the loop from here on.
    queued = asyncio.create_task(ok())
    [name] = wait_for_store(
        # A child: the root is recorded QUEUED with the run itself, and RUNNING next.
        "SELECT name FROM actions WHERE run = ? AND phase = 'QUEUED' AND parent IS NOT NULL",
        flowsdk.current_action().run,
    )
    say("READY", name)
    threading.Event().wait()  # until SIGKILL
    await asyncio.gather(queued, *running)


WORKFLOWS: dict[str, flowsdk.Task[[], Any]] = {
    "one_child": one_child,
    "one_slow_cleanup": one_slow_cleanup,
    "one_blocker": one_blocker,
    "one_stuck": one_stuck,
    "fan_out": fan_out,
    "ended": ended,
    "tree": tree,
    "stages": stages,
    "stop_wait": stop_wait,
    "gated_create": gated_create,
    "crash": crash,
}

if __name__ == "__main__":
    main(WORKFLOWS)
