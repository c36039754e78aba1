"""Workflows that exercise the SQLite store from a runner process (tests/test_store_sqlite.py).

Usage: `python tests/runners/store_io.py STORE RUN WORKFLOW [ARGS...]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from typing import Any

import flowsdk
from flowsdk.errors import RuntimeUserError, StoreError
from flowsdk.store import SQLiteStore
from tests.runners._common import STARTED, gate, main, say, started

THREADS: list[str] = []

env = flowsdk.TaskEnvironment("io")
# The runner's exit code when flowsdk.run raised StoreError (a write failed: disk full).
EXIT_STORE_ERROR = 5
# Longer than the runner's heartbeat interval (1 s) plus its busy timeout (store locked).
LOCKED_FOR = 1.5
# How many batches `writer` may make past the ones the test has allowed with a line: enough
# that it is still writing while the test reads, and a bound on the run however slowly the
# test reads (each read loads the whole run, so a writer left free would outrun it).
AHEAD = 10


@env.task
async def ok() -> int:
    """Succeed at once."""
    return 1


@env.task
async def bad(i: int) -> int:
    """Fail with a long message, so that each failure makes the store grow."""
    raise ValueError(f"{i}: " + "x" * 2000)


@env.task
async def sleeper() -> None:
    """Run until cancelled; say when its cleanup ran."""
    name = started()
    try:
        await asyncio.sleep(3600)
    finally:
        say("CLEANUP", name)


@env.task
async def writer() -> int:
    """Record batches of 20 children while the test reads, until it closes stdin.

    The first `AHEAD` batches are free; each line from the test allows one more.
    """
    started()
    batches = 0
    allowed = AHEAD
    while True:
        if batches == allowed:
            if not await gate():  # stdin closed: the test has read enough
                break
            allowed += 1
        await asyncio.gather(*(ok() for _ in range(20)))
        batches += 1
        say("BATCH", batches)
    return batches


@env.task
async def lock_across_heartbeat() -> int:
    """Keep running, recording children, while the test holds the store's write lock."""
    started()
    await gate()  # the test holds the lock from now on
    await ok()
    # The scenario: the lock outlasts a heartbeat and the busy timeout.
    await asyncio.sleep(LOCKED_FOR)
    say("SLEPT")
    await gate()  # the lock is released
    return await ok()


@env.task
async def disk_full() -> int:
    """Make every further write to the store fail (RLIMIT_FSIZE), then keep recording."""
    started()
    asyncio.create_task(sleeper())  # noqa: RUF006 -- cancelled at the root's exit
    while len(STARTED) < 2:
        await asyncio.sleep(0)
    limit_file_size(SQLiteStore(sys.argv[1]).path)
    say("LIMITED")
    for i in range(100):
        with contextlib.suppress(RuntimeUserError):
            await bad(i)
    return 1


@env.task
def waits_for_a_file(path: str) -> None:
    """A plain `def` body: its thread runs until `path` exists (bounded)."""
    THREADS.append("started")
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)  # a thread cannot wait on the loop: a bounded poll of a file


@env.task
async def disk_full_with_a_thread() -> int:
    """`disk_full`, with a plain `def` body's thread running on past the run's end."""
    asyncio.create_task(waits_for_a_file(sys.argv[4]))  # noqa: RUF006 -- cancelled at exit
    while not THREADS:
        await asyncio.sleep(0)
    return await disk_full()


@env.task
async def execs() -> None:
    """Replace the runner's program (same pid) by one that waits for stdin to close."""
    started()
    os.execv(sys.executable, [sys.executable, "-c", "import sys; sys.stdin.read()"])


def limit_file_size(path: str) -> None:
    """Let this process's files grow by 8 KiB at most: the store's next writes fail.

    A write past RLIMIT_FSIZE fails with EFBIG once SIGXFSZ is ignored, which
    SQLite reports as "disk I/O error": a deterministic stand-in for a full disk.
    """
    sizes = [os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p)]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes) + 8192, resource.RLIM_INFINITY))


WORKFLOWS: dict[str, flowsdk.Task[[], Any]] = {
    "writer": writer,
    "lock_across_heartbeat": lock_across_heartbeat,
    "execs": execs,
}


def same_name() -> None:
    """Two runners, one run name: on go, run argv[2] with a task of environment p7<argv[4]>."""
    ident = sys.argv[4]
    mine = flowsdk.TaskEnvironment(f"p7{ident}")

    @mine.task
    async def contender() -> str:
        started()
        await gate()
        return ident

    say("READY")
    sys.stdin.readline()
    sys.argv[3] = "contender"
    main({"contender": contender})


def full(live_on: bool) -> None:
    """Run `disk_full`; report the StoreError that flowsdk.run raises and exit with 5.

    With `live_on`, the disk is freed and the process lives on until stdin closes.
    """
    try:
        main(
            {
                "disk_full": disk_full,
                "disk_full_live_on": disk_full,
                "disk_full_with_a_thread": disk_full_with_a_thread,
            }
        )
    except StoreError as exc:
        say("STORE-ERROR", type(exc).__name__, exc)
        if live_on:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            sys.stdin.read()
        sys.exit(EXIT_STORE_ERROR)


if __name__ == "__main__":
    if sys.argv[3] == "same_name":
        same_name()
    elif sys.argv[3].startswith("disk_full"):
        full(live_on=sys.argv[3] != "disk_full")
    else:
        main(WORKFLOWS)
