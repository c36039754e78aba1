"""Stop a deploy pipeline while it waits, then retry it: what succeeded is replayed.

The pipeline has three stages, each a `flowsdk.group`: build, test (three
shards side by side) and deploy. The deploy stage waits for an approval that
has not been given. The run starts in a background thread, recorded in a
temporary SQLite store; once the deploy stage has started, an operator stops
the run from the command line, abandoning what is in progress:

    python -m flowsdk stop deploy-1 --abandon --store sqlite:////tmp/.../runs.db

The operator then approves the deployment and retries the run with
`flowsdk.Client.retry`. The retry runs in the foreground under the same name
(attempt 2): build and the test shards succeeded in attempt 1, so their bodies
do not run again -- their recorded outputs are replayed -- while the pipeline
and its deploy stage run again. The table at the end shows which was which.

The retry finds the pipeline again by the path the run recorded: this
script's file, imported under another module name, so the `__main__` block
below does not run a second time.

Run it: `python examples/retry_after_stop.py`
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import flowsdk

env = flowsdk.TaskEnvironment("deploy")

RUN = "deploy-1"
# Set by the deploy stage's body, so the operator acts once the stage has started.
deploy_started = threading.Event()


@env.task
async def build(commit: str) -> str:
    print(f"build: building {commit}")
    return f"app-{commit}.tar.gz"


@env.task
async def run_tests(artifact: str, shard: int) -> int:
    print(f"test: shard {shard} of {artifact} passed")
    return 10 + shard


@env.task
async def deploy(artifact: str, approval: str) -> str:
    deploy_started.set()
    if not await asyncio.to_thread(Path(approval).exists):
        print("deploy: waiting for approval")
        await asyncio.Event().wait()  # an approval that does not come in attempt 1
    print(f"deploy: deploying {artifact}")
    return f"deployed {artifact}"


@env.task
async def pipeline(commit: str, approval: str) -> str:
    async with flowsdk.group("build"):
        artifact = await build(commit)
    async with flowsdk.group("test"):
        await asyncio.gather(*(run_tests(artifact, shard) for shard in range(3)))
    async with flowsdk.group("deploy"):
        return await deploy(artifact, approval)


def stop_from_the_command_line(store: str) -> None:
    """Stop the run and abandon its actions, as an operator would, from another process."""
    argv = ["stop", RUN, "--abandon", "--reason", "deploy window closed", "--store", store]
    proc = subprocess.run(
        [sys.executable, "-m", "flowsdk", *argv, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    outcome = json.loads(proc.stdout)["outcome"] if proc.returncode == 0 else proc.stderr.strip()
    print(f"operator: flowsdk stop {RUN} --abandon: {outcome}")


def show(first: flowsdk.Run[Any], second: flowsdk.Run[Any]) -> None:
    """Print each call's phase in both attempts, and whether attempt 2 replayed it."""
    before = {a.key: a for a in first.actions}
    print(f"{'key':<6} {'stage':<7} {'task':<17} {'attempt 1':<10} attempt 2")
    for action in second.actions:
        earlier = before.get(action.key)
        how = "replayed" if action.replayed else "ran again" if earlier else "ran"
        print(
            f"{action.key:<6} {action.group or '-':<7} {action.task:<17} "
            f"{earlier.phase.value if earlier else '-':<10} {action.phase.value} ({how})"
        )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = "sqlite:///" + str(Path(tmp) / "runs.db")
        approval = Path(tmp) / "approved"
        first: list[flowsdk.Run[str]] = []

        def run_in_background() -> None:
            first.append(flowsdk.run(pipeline, "3f2c1a", str(approval), name=RUN, store=store))

        runner = threading.Thread(target=run_in_background)
        runner.start()
        try:
            if not deploy_started.wait(timeout=30):
                raise RuntimeError("the deploy stage did not start")
            stop_from_the_command_line(store)
        finally:
            runner.join(timeout=30)
        print(f"run {RUN} attempt 1: {first[0].phase.value}")

        approval.touch()
        print("operator: approved; retrying")
        with flowsdk.Client(store) as client:
            second = client.retry(RUN)
            stored_first = client.get_run(RUN, attempt=1)
        print(f"run {RUN} attempt {second.attempt}: {second.phase.value}, {second.result()!r}")
        show(stored_first, second)


if __name__ == "__main__":
    main()
