"""A runner that a test stops with SIGTERM or SIGHUP: `python signals.py STORE RUN MARKERS`.

The root starts one child that sleeps; both bodies write a marker in their
`finally`, and so does the script's own `finally` around `flowsdk.run`, so
the test can see that every cleanup ran. `STARTED a1 sleeper` says when to
send the signal.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import flowsdk
from tests.runners._common import say, started

env = flowsdk.TaskEnvironment("signals")


def mark(name: str) -> None:
    """Write the marker file `name` into the folder given as argv[3]."""
    (Path(sys.argv[3]) / name).write_text(name)


@env.task
async def sleeper() -> None:
    try:
        started()
        await asyncio.sleep(3600)
    finally:
        mark("child-finally")


@env.task
async def root() -> None:
    try:
        await sleeper()
    finally:
        mark("root-finally")


if __name__ == "__main__":
    try:
        flowsdk.run(root, name=sys.argv[2], store=sys.argv[1])
    finally:
        mark("script-finally")
        say("SCRIPT FINALLY")
