"""A loop with the user's eager task factory (Python 3.12+): actions run as with any factory.

`asyncio.eager_task_factory` runs a task's first step inside `create_task`, so a
body that does not suspend ends before `create_task` returns (SCENARIOS R4:
"including eager task factories"; README: a run chains to a factory you installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import pytest

import flowsdk
from flowsdk import ActionPhase, RunPhase
from tests.support import assert_clean

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="asyncio.eager_task_factory is new in Python 3.12"
)

env = flowsdk.TaskEnvironment("eager")
RAN: list[str] = []


@env.task
async def at_once(x: int) -> int:
    RAN.append(f"at_once {x}")
    return x


@env.task
async def after_a_step(x: int) -> int:
    await asyncio.sleep(0)
    RAN.append(f"after_a_step {x}")
    return x


@env.task
async def sleeper() -> None:
    RAN.append("sleeper")
    await asyncio.sleep(3600)


@env.task
async def aborted_then_calls(store: str) -> None:
    with flowsdk.Client(store) as client:
        client.abort(flowsdk.current_action().run, reason="enough")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        for call in (at_once(7), after_a_step(8)):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.create_task(call)
        raise


@env.task
async def shapes() -> list[int]:
    values = [await at_once(1), await after_a_step(2)]
    values += await asyncio.gather(at_once(3), after_a_step(4))
    values.append(await asyncio.create_task(at_once(5)))
    t = asyncio.create_task(at_once(6))
    t.cancel()  # in the same step: SCENARIOS C6 (an eager body ran already)
    try:
        values.append(await t)
    except asyncio.CancelledError:
        values.append(-6)
    asyncio.create_task(sleeper())  # noqa: RUF006 -- pending at the root's exit (R1)
    await asyncio.sleep(0)
    return values


async def run_eagerly(task: flowsdk.Task[..., Any], *args: Any) -> flowsdk.Run[Any]:
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    try:
        return await flowsdk.run_async(task, *args, store=args[0] if args else "memory://")
    finally:
        loop.set_task_factory(None)


@pytest.fixture(autouse=True)
def fresh() -> None:
    RAN.clear()


@pytest.mark.timeout(60)
async def test_actions_of_every_shape_run_under_an_eager_task_factory() -> None:
    run = await run_eagerly(shapes)
    assert run.phase is RunPhase.SUCCEEDED
    assert run.result()[:5] == [1, 2, 3, 4, 5]
    assert run.result()[5] in (6, -6)  # eager: its body may have returned before the cancel
    assert not [a for a in run.actions if a.phase is ActionPhase.CRASHED]
    by_task = {a.task: a for a in run.actions}
    assert by_task["eager.sleeper"].phase is ActionPhase.ABORTED  # cancelled at the root's exit
    assert "sleeper" in RAN
    assert_clean(run)


@pytest.mark.timeout(60)
async def test_no_body_starts_below_an_abort_under_an_eager_task_factory(tmp_path: Any) -> None:
    """The call's action is ended before its task exists: an eager factory starts nothing."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    run = await run_eagerly(aborted_then_calls, url)
    assert run.phase is RunPhase.ABORTED
    assert RAN == []
    calls = [a for a in run.actions if a.name != "a0"]
    assert [a.phase for a in calls] == [ActionPhase.ABORTED] * 2
    assert all(a.abort is not None and a.abort.cause.value == "ancestor" for a in calls)


@env.task
async def calls_inside(x: int) -> list[int]:
    """Its first step runs inside the `gather` or `create_task` that started it."""
    own = await at_once(x)
    more = await asyncio.gather(at_once(x + 1), after_a_step(x + 2))
    alone = await asyncio.create_task(at_once(x + 3))
    return [own, *more, alone]


@env.task
async def nested() -> list[list[int]]:
    gathered = await asyncio.gather(calls_inside(10), calls_inside(20))
    return [*gathered, await asyncio.create_task(calls_inside(30))]


@pytest.mark.timeout(60)
async def test_a_body_started_inside_gather_makes_calls_of_its_own() -> None:
    """Calls a body makes in the step an eager factory runs are its own children."""
    run = await run_eagerly(nested)
    assert run.phase is RunPhase.SUCCEEDED
    assert run.result() == [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]
    by_name = {a.name: a for a in run.actions}
    outer = [a for a in run.actions if a.task == "eager.calls_inside"]
    assert [a.parent for a in outer] == ["a0"] * 3
    inner = [a for a in run.actions if a.task in ("eager.at_once", "eager.after_a_step")]
    assert len(inner) == 12
    assert all(by_name[a.parent or ""].task == "eager.calls_inside" for a in inner)
    assert {a.phase for a in run.actions} == {ActionPhase.SUCCEEDED}
    assert_clean(run)
