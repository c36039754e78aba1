"""A run that keeps changing while its database goes away (tests/test_store_postgres.py).

Usage: `python tests/runners/outage.py STORE RUN COUNT`. The root starts one
child, prints `STARTED`, then waits for a line on stdin: the test stops the
database meanwhile and writes the line. The root then runs COUNT children
that each succeed (changes made while the database is away), prints
`WORKED`, and waits for stdin to close before it returns. The runner prints
`RESULT <phase>`, or `STORE-ERROR <message>` when `flowsdk.run` raised
`StoreError`.
"""

from __future__ import annotations

import asyncio
import sys

import flowsdk
from flowsdk.errors import StoreError
from tests.runners._common import gate, say, started

env = flowsdk.TaskEnvironment("outage")


@env.task
async def step(i: int) -> int:
    """One small action: recorded when it starts and when it ends."""
    return i


@env.task
async def root(count: int) -> int:
    """Run one step, wait for the test, run `count` more, wait for stdin to close."""
    started()
    total = await step(0)
    say("READY")
    await gate()
    total += sum(await asyncio.gather(*(step(i) for i in range(1, count + 1))))
    say("WORKED", total)
    while await gate():
        pass
    return total


if __name__ == "__main__":
    store, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        run = flowsdk.run(root, count, name=name, store=store)
    except StoreError as exc:
        say("STORE-ERROR", exc)
        sys.exit(5)
    say("RESULT", run.phase.value)
