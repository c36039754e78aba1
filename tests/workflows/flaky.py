"""A workflow that fails until an environment variable is set: one failed attempt, then a retry.

`root(variable)`: a1 `prepare` succeeds (a retry replays it); a2 `check` fails
while the environment variable `variable` is not set.
"""

from __future__ import annotations

import os

import flowsdk

env = flowsdk.TaskEnvironment("flaky")


@env.task
async def prepare() -> int:
    return 41


@env.task
async def check(variable: str) -> None:
    if not os.environ.get(variable):
        raise RuntimeError(f"${variable} is not set yet")


@env.task
async def root(variable: str) -> int:
    value = await prepare()
    await check(variable)
    return value + 1
