"""Workflows retried by tests/test_retry.py, imported as `tests.retry_workflows.pipeline`.

- `root`: steps a, b, c, then holds d and e side by side, then step f. A hold
  waits (an hour) unless the flag `release` is set, so the first attempt can
  be killed, aborted or stopped while d and e run; a retry with `release` set
  completes.
- `failing`: steps a and b, then `check`, which fails until the flag `fixed`
  is set, then step c. With the flag `fail-early` it fails before any call.
- `diverging`: like `failing`, but with the flag `other-input` (or
  `other-task`) its second call differs from the first attempt's; with
  `by-keyword` it passes the same values by keyword, and the default too.
- `gathered`: gathers steps a and b and `check` (fails until `fixed`), then
  gathers step c.
- `staged`: calls `stage` (retries=1), whose first attempt calls step b then
  fails, and whose second attempt fails at once, until the flag `fixed` is
  set; with `other-input` the step it calls is B.
"""

from __future__ import annotations

import asyncio

import flowsdk
from flowsdk.errors import NondeterminismError
from tests.retry_workflows import bump, flag, say

env = flowsdk.TaskEnvironment("pipeline")


@env.task
async def step(name: str, workdir: str, suffix: str = "-done") -> str:
    bump(workdir, name)
    return f"{name}{suffix}"


@env.task
async def other(name: str, workdir: str) -> str:
    bump(workdir, f"other-{name}")
    return f"{name}-other"


@env.task
async def hold(name: str, workdir: str) -> str:
    bump(workdir, name)
    say("STARTED", name)
    if not flag(workdir, "release"):
        await asyncio.sleep(3600)  # until the runner is killed, aborted or stopped
    return f"{name}-done"


@env.task
async def check(workdir: str) -> None:
    bump(workdir, "check")
    if not flag(workdir, "fixed"):
        raise RuntimeError("check failed: not fixed yet")


@env.task
async def root(workdir: str) -> list[str]:
    bump(workdir, "root")
    done = [await step("a", workdir), await step("b", workdir), await step("c", workdir)]
    done += await asyncio.gather(hold("d", workdir), hold("e", workdir))
    done.append(await step("f", workdir))
    return done


@env.task
async def failing(workdir: str) -> list[str]:
    bump(workdir, "failing")
    if flag(workdir, "fail-early"):
        raise RuntimeError("failed before calling anything")
    done = [await step("a", workdir), await step("b", workdir)]
    await check(workdir)
    done.append(await step("c", workdir))
    return done


@env.task
async def diverging(workdir: str) -> list[str]:
    a = await step("a", workdir)
    try:
        if flag(workdir, "other-input"):
            call = step("B", workdir)
        elif flag(workdir, "other-task"):
            call = other("b", workdir)
        elif flag(workdir, "by-keyword"):  # the same values: by keyword, the default given
            call = step(workdir=workdir, name="b", suffix="-done")
        else:
            call = step("b", workdir)
    except NondeterminismError:
        bump(workdir, "raised-by-call")
        raise
    b = await call
    await check(workdir)
    return [a, b]


@env.task(retries=1, backoff=0)
async def stage(workdir: str) -> str:
    attempt = flowsdk.current_action().attempt
    if attempt == 1 or flag(workdir, "fixed"):
        done = await step("B" if flag(workdir, "other-input") else "b", workdir)
        if flag(workdir, "fixed"):
            return done
    raise RuntimeError(f"stage attempt {attempt} failed")


@env.task
async def staged(workdir: str) -> str:
    return await stage(workdir)


@env.task
async def gathered(workdir: str) -> list[str]:
    a, b, _ = await asyncio.gather(step("a", workdir), step("b", workdir), check(workdir))
    [c] = await asyncio.gather(step("c", workdir))
    return [a, b, c]
