"""A build -> test -> deploy pipeline, stopped three ways by an operator's command.

Each stage is a `flowsdk.group`. The pipeline runs three times; each time,
once the test stage has started, an operator runs one command from another
process (the command line), as one would from a terminal:

1. `flowsdk abort RUN --group test`: the stage's actions are ABORTED (cause
   `external`); the root lets the `ActionAbortedError` propagate, so deploy
   never starts and the run ends ABORTED.
2. `flowsdk stop RUN`: stop and wait. The test shards in progress finish;
   calling deploy is refused (`RunStoppingError`), and the run ends STOPPED.
3. `flowsdk stop RUN --abandon`: stop and abandon. The shards in progress are
   cancelled and recorded ABANDONED (cause `stop`); the run ends STOPPED at once.

Run it: `python examples/pipeline_stages.py`
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import flowsdk

env = flowsdk.TaskEnvironment("pipeline")

SHARDS = 3
# Set (from the loop) when the test stage is running; the operator acts then.
testing = threading.Event()
# Set once the operator's command has returned: a test shard runs until then (unless it
# is cancelled), however long the command takes to start; a stop-and-wait lets it finish.
landed = threading.Event()


@env.task
async def build() -> str:
    return "app.tar.gz"


@env.task
async def test_shard(artifact: str, shard: int) -> str:
    testing.set()
    await asyncio.to_thread(landed.wait)  # the testing work; cancellable at this await
    return f"shard {shard} ok"


@env.task
async def deploy(artifact: str) -> str:
    return f"deployed {artifact}"


@env.task
async def pipeline() -> str:
    with flowsdk.group("build"):
        artifact = await build()
    with flowsdk.group("test"):
        await asyncio.gather(*(test_shard(artifact, i) for i in range(SHARDS)))
    with flowsdk.group("deploy"):
        return await deploy(artifact)


def operator(command: list[str]) -> None:
    """Run one command from another process once the test stage has started."""
    testing.wait()
    done = subprocess.run(
        [sys.executable, "-m", "flowsdk", *command], capture_output=True, text=True, check=False
    )
    landed.set()
    print(
        f"operator: flowsdk {' '.join(command[:-2])}: {done.stdout.strip() or done.stderr.strip()}"
    )


def once(store: str, name: str, command: list[str]) -> None:
    testing.clear()
    landed.clear()
    helper = threading.Thread(target=operator, args=([*command, "--store", store],))
    helper.start()
    run = flowsdk.run(pipeline, name=name, store=store)
    helper.join()
    print(f"run {run.name}: {run.phase.value}")
    for action in run.actions:
        cause = action.abort.cause.value if action.abort else "-"
        error = action.error.type.rsplit(".", 1)[-1] if action.error else "-"
        group = action.group or "-"
        print(
            f"  {action.name:<3} {group:<7} {action.task:<20} {action.phase.value:<10} "
            f"{cause:<9} {error}"
        )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'runs.db'}"
        once(store, "abort-stage", ["abort", "abort-stage", "--group", "test"])
        once(store, "stop-wait", ["stop", "stop-wait"])
        once(store, "stop-abandon", ["stop", "stop-abandon", "--abandon"])
