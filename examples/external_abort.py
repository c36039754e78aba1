"""An operator aborts one action of a live run, with a reason.

The root starts 10 long sleepers. While they run, an operator aborts one of
them through the run's handle (`handle.abort("a3", reason=...)`). The aborted
sleeper's body gets `CancelledError`; the root sees an `ActionAbortedError`
carrying `.action` and `.reason` -- an ordinary exception, so
`gather(..., return_exceptions=True)` hands it back as a value. The root reports
it and returns normally; the nine other sleepers are then ended by the root's
exit (cause `root_exit`).

Run it: `python examples/external_abort.py`
"""

from __future__ import annotations

import asyncio

import flowsdk
from flowsdk.errors import ActionAbortedError

env = flowsdk.TaskEnvironment("abort")

SLEEPERS = 10
# The operator acts once every sleeper is running (an Event, not a sleep).
all_running = asyncio.Event()
_running: set[int] = set()


@env.task
async def sleeper(i: int) -> int:
    _running.add(i)
    if len(_running) == SLEEPERS:
        all_running.set()
    await asyncio.sleep(3600)
    return i


@env.task
async def main() -> list[str]:
    sleepers = [asyncio.create_task(sleeper(i)) for i in range(SLEEPERS)]
    # The first sleeper to end is the aborted one: the others sleep for an hour.
    done, _ = await asyncio.wait(sleepers, return_when=asyncio.FIRST_COMPLETED)
    results = await asyncio.gather(*done, return_exceptions=True)
    aborted = [r for r in results if isinstance(r, ActionAbortedError)]
    for err in aborted:
        print(f"main: {err.action} was aborted: {err.reason}")
    return [err.action for err in aborted]


async def abort_action(handle: flowsdk.RunHandle[list[str]], action: str, reason: str) -> None:
    """Abort one action of the live run: the operator's whole part."""
    result = await handle.abort(action, reason=reason)
    print(f"operator: abort {action}: {result.outcome}")


async def operate() -> flowsdk.Run[list[str]]:
    handle = await flowsdk.start(main)
    await all_running.wait()
    await abort_action(handle, "a3", reason="diverging loss")
    return await handle.wait()


if __name__ == "__main__":
    run = asyncio.run(operate())
    print(f"run {run.name}: {run.phase.value}, aborted {run.result()}")
    print(f"{'name':<4} {'phase':<10} {'cause':<10} reason")
    for action in run.actions:
        abort = action.abort
        cause = abort.cause.value if abort else "-"
        reason = abort.reason if abort and abort.reason else "-"
        print(f"{action.name:<4} {action.phase.value:<10} {cause:<10} {reason}")
