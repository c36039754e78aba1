"""A user's workflow script, run as `python script.py STORE RUN WORKDIR` (`__main__`).

Its run records the script's own path; a retry imports the file under
another module name, so the `__main__` block below (which appends a line to
`WORKDIR/main.marker` each time it runs) does not run again. The task `work`
fails until the file `WORKDIR/fixed` exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

import flowsdk

env = flowsdk.TaskEnvironment("script")


@env.task
async def work(workdir: str) -> str:
    with (Path(workdir) / "work.count").open("a") as f:
        f.write("ran\n")
    if not (Path(workdir) / "fixed").exists():
        raise RuntimeError("not fixed yet")
    return "worked"


@env.task
async def main(workdir: str) -> str:
    return await work(workdir)


if __name__ == "__main__":
    store, name, workdir = sys.argv[1:4]
    with (Path(workdir) / "main.marker").open("a") as marker:
        marker.write("main block ran\n")
    run = flowsdk.run(main, workdir, name=name, store=store)
    print("RESULT", run.phase.value, flush=True)
