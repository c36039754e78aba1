"""A runner whose heartbeat may lapse (tests/test_liveness.py): `HOLD_AFTER` is short here.

Usage: `python tests/runners/lease.py STORE RUN two_steps HOLD_AFTER`. The root
calls `first`, whose body prints `STARTED a1 first` and waits for a line, then
`second`, whose body prints `STARTED a2 second`. A runner starts no new body once
its heartbeat is older than `HOLD_AFTER` (5 s in flowsdk; shorter here, so that
a test need not hold the store locked or the process stopped for that long).
"""

from __future__ import annotations

import sys

import flowsdk
from flowsdk import _liveness
from tests.runners._common import gate, main, started

_liveness.HOLD_AFTER = float(sys.argv[4])

env = flowsdk.TaskEnvironment("lease")


@env.task
async def first() -> None:
    started()
    await gate()


@env.task
async def second() -> None:
    started()


@env.task
async def two_steps() -> None:
    await first()
    await second()


if __name__ == "__main__":
    main({"two_steps": two_steps})
