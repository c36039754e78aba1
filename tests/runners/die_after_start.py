"""A runner killed right after its run is created: `python die_after_start.py STORE RUN`.

The writer thread's first transaction (the run's row, its root and the root's
recorded inputs) commits; then the process dies at once, before anything else
is written, as a SIGKILL at that instant would leave it. A retry imports this
script again (under another module name), where `work` succeeds.
"""

from __future__ import annotations

import os
import sys

import flowsdk
from flowsdk.store import _writer

env = flowsdk.TaskEnvironment("die_after_start")


@env.task
async def work(n: int) -> int:
    return n * 2


def _die(self: object, conn: object) -> None:
    os._exit(137)  # what a SIGKILL right after the commit leaves behind


if __name__ == "__main__":
    _writer.RunWriter._serve = _die  # type: ignore[method-assign]
    flowsdk.run(work, 21, name=sys.argv[2], store=sys.argv[1])
