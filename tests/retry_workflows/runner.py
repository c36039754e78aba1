"""Run `tests.retry_workflows.pipeline.root` as a runner subprocess.

`python tests/retry_workflows/runner.py STORE RUN WORKDIR` (with the repository
on `PYTHONPATH`). The run records its root as `tests.retry_workflows.pipeline:root`,
which a retry in another process imports again. Prints `STARTED <hold>` from
each hold's body and `RESULT <phase>` when the run has ended.
"""

from __future__ import annotations

import sys

import flowsdk
from tests.retry_workflows import say
from tests.retry_workflows.pipeline import root


def main() -> None:
    store, name, workdir = sys.argv[1:4]
    run = flowsdk.run(root, workdir, name=name, store=store)
    say("RESULT", run.phase.value)


if __name__ == "__main__":
    main()
