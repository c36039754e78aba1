"""What the workflow scripts in this folder share: how they talk to the test that runs them.

A runner is started as `python tests/runners/<script>.py STORE RUN [ARGS...]`
(with the repository on `PYTHONPATH`). It prints one line for each moment the
test waits for (`STARTED a2 sleeper`, `CANCELLED a2`, ...), flushed at once,
and a body that must wait for the test reads a line from stdin (`gate()`);
closing stdin releases every gate. The test reads the lines with a blocking
read: nothing is synchronised by sleeping.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import flowsdk
from flowsdk.errors import RunExistsError

__all__ = ["EXIT_RUN_EXISTS", "STARTED", "gate", "main", "say", "started"]

# The runner's exit code when its run name is taken (two runners started one run name).
EXIT_RUN_EXISTS = 3
# The actions whose bodies have started, in order (so a root can wait for its children).
STARTED: list[str] = []


def say(*words: object) -> None:
    """Print one line for the test, at once (one write, so no log line can split it)."""
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def started() -> str:
    """Print `STARTED <action> <function>` from inside a body; return the action's name."""
    info = flowsdk.current_action()
    STARTED.append(info.name)
    say("STARTED", info.name, info.task.rsplit(".", 1)[-1])
    return info.name


async def gate() -> str:
    """Wait, without blocking the loop, until the test writes a line (or closes stdin)."""
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


def main(workflows: dict[str, flowsdk.Task[[], Any]]) -> None:
    """Run the workflow named by argv[3] as run argv[2] in store argv[1]; print its phase."""
    store, name, workflow = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        run = flowsdk.run(workflows[workflow], name=name, store=store)
    except RunExistsError as exc:
        say("EXISTS", exc)
        sys.exit(EXIT_RUN_EXISTS)
    say("RESULT", run.phase.value)
