"""A run for the console's tests: a stage of finished actions, one failure, and one that holds.

Usage: `python tests/runners/console.py STORE RUN held`. The root (a0) runs
stage `prep` (a1 succeeds; a2 fails with a message full of markup, which the
console must show as text), then `hold` (a3) in stage `train`, which prints
`STARTED a3 hold` and waits for a line on stdin. Its body prints
`CANCELLED a3 <message>` when it gets `CancelledError`; the root prints
`CAUGHT ...` with what its await raised, and the runner `RESULT <phase>`.
"""

from __future__ import annotations

import asyncio
import contextlib

import flowsdk
from tests.runners._common import gate, main, say, started

env = flowsdk.TaskEnvironment("console")
MARKUP = '<img src=x onerror="document.title=1"><b>not bold</b>'


@env.task
async def prepare(n: int) -> int:
    if n == 2:
        raise ValueError(f"bad shard {MARKUP}")
    return n


@env.task
async def hold() -> str:
    name = started()
    try:
        return await gate()
    except asyncio.CancelledError as exc:
        say("CANCELLED", name, str(exc).replace("\n", " "))
        raise


@env.task
async def held() -> str:
    async with flowsdk.group("prep"):
        await prepare(1)
        with contextlib.suppress(flowsdk.errors.RuntimeUserError):
            await prepare(2)
    try:
        async with flowsdk.group("train"):
            return await hold()
    except flowsdk.errors.ActionError as exc:
        say("CAUGHT", type(exc).__name__, exc.action)
        raise


if __name__ == "__main__":
    main({"held": held})
