"""A run's actions live no longer than its root.

The root starts a long child with `asyncio.create_task`, waits until the child
is running, then returns. flowsdk cancels the child at once: its body gets
`CancelledError`, so its `except`/`finally` cleanup runs, and the child is
recorded `ABORTED` with cause `root_exit`. The run itself `SUCCEEDED`.

Run it: `python examples/action_lifetime.py`
"""

from __future__ import annotations

import asyncio

import flowsdk

env = flowsdk.TaskEnvironment("lifetime")

# Set by the child once its body runs, so the root returns only after that
# (an Event, not a sleep: the example does not depend on timing).
child_running = asyncio.Event()


@env.task
async def long_job() -> None:
    child_running.set()
    try:
        await asyncio.sleep(3600)  # an hour of work that will not be allowed to finish
    except asyncio.CancelledError:
        print("long_job: cancelled, cleaning up")
        raise  # re-raise: the cancellation is not ours to swallow
    finally:
        print("long_job: cleanup done")


@env.task
async def main() -> str:
    job = asyncio.create_task(long_job())
    await child_running.wait()
    print(f"main: returning while long_job is still running (done={job.done()})")
    return "main finished"


if __name__ == "__main__":
    run = flowsdk.run(main)
    print(f"run {run.name}: {run.phase.value}, result {run.result()!r}")
    print(f"{'name':<4} {'task':<18} {'phase':<10} cause")
    for action in run.actions:
        cause = action.abort.cause.value if action.abort else "-"
        print(f"{action.name:<4} {action.task:<18} {action.phase.value:<10} {cause}")
