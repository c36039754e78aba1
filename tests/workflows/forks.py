"""A body that forks and whose child returns into the workflow (SPEC §3: never run twice).

`python -m tests.workflows.forks RUN_NAME MARKS` runs in the store named by
`$FLOWSDK_STORE`. `forker` forks; the child appends `child PID` to the file
MARKS and returns into the workflow; the parent waits for the child and
returns how it ended. `after` then appends `after PID` to MARKS: once, by the
runner. Prints `RESULT <phase> <child status>` when the run has ended.
"""

from __future__ import annotations

import asyncio
import os
import sys

import flowsdk

env = flowsdk.TaskEnvironment("forks")


def mark(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


@env.task
async def forker(marks: str) -> str:
    pid = os.fork()
    if pid == 0:
        mark(marks, "child")
        return "child"  # returns into the workflow: flowsdk ends this process here
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    return f"exit={os.waitstatus_to_exitcode(status)}"


@env.task
async def after(marks: str) -> None:
    mark(marks, "after")


@env.task
async def root(marks: str) -> str:
    status = await forker(marks)
    await after(marks)
    return status


def main() -> None:
    run = flowsdk.run(root, sys.argv[2], name=sys.argv[1])
    print(f"RESULT {run.phase.value} {run.result()}", flush=True)


if __name__ == "__main__":
    main()
