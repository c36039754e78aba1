"""A workflow module of a package, run as `python -m tests.retry_workflows.module_main`.

Arguments: STORE RUN WORKDIR. Like script.py, but run with `-m` and using a
relative import, as a module inside a package does: a retry must import it
as the module it is, and its `__main__` block (which counts its executions
as `main-block`) must not run again. The task `work` fails until the flag
`fixed` is set.
"""

from __future__ import annotations

import sys

import flowsdk

from . import bump, flag, say

env = flowsdk.TaskEnvironment("module_main")


@env.task
async def work(workdir: str) -> str:
    bump(workdir, "work")
    if not flag(workdir, "fixed"):
        raise RuntimeError("not fixed yet")
    return "worked"


@env.task
async def main(workdir: str) -> str:
    return await work(workdir)


if __name__ == "__main__":
    store, name, workdir = sys.argv[1:4]
    bump(workdir, "main-block")
    run = flowsdk.run(main, workdir, name=name, store=store)
    say("RESULT", run.phase.value)
