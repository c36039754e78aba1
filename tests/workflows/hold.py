"""A runner whose one child holds until the test releases it or controls the run.

`python -m tests.workflows.hold RUN_NAME` runs in the store named by
`$FLOWSDK_STORE`. The root (a0) starts `hold` (a1) in group `train`; a1 prints
`STARTED a1` and waits for a line on stdin (the test's release). Lines it
prints, each flushed, so the test can synchronise with blocking reads:

- `STARTED a1` once a1's body runs;
- `CANCELLED a1` when a1's body gets `CancelledError` (abort, mark-failed, abandon);
- `CAUGHT <error> <action> <detail>` when the root catches what a1 raised;
- `RESULT <run phase>` when the run has ended.
"""

from __future__ import annotations

import asyncio
import sys

import flowsdk
from flowsdk.errors import ActionAbortedError, RuntimeUserError

env = flowsdk.TaskEnvironment("hold")


async def read_release() -> str:
    """Wait for one line on stdin without blocking the loop (cancellable)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        return (await reader.readline()).decode().strip()
    finally:
        transport.close()


@env.task
async def hold() -> str:
    name = flowsdk.current_action().name
    print(f"STARTED {name}", flush=True)
    try:
        return await read_release()
    except asyncio.CancelledError:
        print(f"CANCELLED {name}", flush=True)
        raise


@env.task
async def root() -> str:
    try:
        async with flowsdk.group("train"):
            return await hold()
    except ActionAbortedError as exc:
        print(f"CAUGHT ActionAbortedError {exc.action} {exc.cause} {exc.reason}", flush=True)
        return "aborted"
    except RuntimeUserError as exc:
        cause = type(exc.__cause__).__name__
        print(f"CAUGHT RuntimeUserError {exc.action} {cause}", flush=True)
        raise


def main() -> None:
    run = flowsdk.run(root, name=sys.argv[1])
    print(f"RESULT {run.phase.value}", flush=True)


if __name__ == "__main__":
    main()
