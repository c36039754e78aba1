"""Deep and wide trees: a chain of task calls `depth` deep, and a root with many children."""

from __future__ import annotations

import asyncio

import flowsdk
from flowsdk.errors import RuntimeUserError

env = flowsdk.TaskEnvironment("deep")


@env.task
async def chain(depth: int) -> int:
    """Call itself until `depth` is 0: one action per level, each awaiting the next."""
    if depth == 0:
        return 0
    return await chain(depth - 1) + 1


@env.task
async def leaf(i: int) -> int:
    return i


@env.task
async def fan(width: int) -> int:
    """Start `width` children at once and add their values."""
    values = await asyncio.gather(*(leaf(i) for i in range(width)))
    return sum(values)


@env.task
async def picky(i: int) -> int:
    if i % 100 == 37:
        raise ValueError(f"child {i} fails")
    return i


@env.task
async def fan_failing(width: int) -> int:
    """Start `width` children at once; those numbered 37 modulo 100 fail."""
    values = await asyncio.gather(*(picky(i) for i in range(width)), return_exceptions=True)
    return sum(v for v in values if isinstance(v, int))


@env.task
async def guarded(i: int) -> int:
    try:
        return await picky(i)
    except RuntimeUserError:  # the failure stays below: this action succeeds
        return -1


@env.task
async def fan_guarded(width: int) -> int:
    """Start `width` children at once; those numbered 37 modulo 100 catch a failed child."""
    return sum(await asyncio.gather(*(guarded(i) for i in range(width))))
