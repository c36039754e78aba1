"""The calls that `asyncio.gather` wraps: no task of their own, the action's future instead.

`gather` makes a task for each coroutine it is given and only ever holds it
as a future: it waits for it by a callback, cancels it and reads its result;
workflow code never sees it. For a call's handle that task would only start
the action and wait for it. So the run's task factory (`TaskTracker`), when
`gather` calls it, runs the handle's first step itself (`start_gathered`):
the handle calls `start_direct` at once instead of its own course, the
action starts, and `gather` gets the action's own future, which the
action's end settles with what the handle would have returned or raised
(`_outcome.settle`) and whose `cancel` cancels the action
(`ActionState.__call__`). One task, a coroutine and two loop steps fewer per
child. While the store is far behind (backpressure), the calls wait to start
in one task for all of them (`release_held`), behind futures that stand in
for their actions.
"""

from __future__ import annotations

import asyncio
import sys
from contextvars import copy_context
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from flowsdk._action import ActionState
from flowsdk._execute import gathering, start_child
from flowsdk._tracker import HELD_WIDTH

if TYPE_CHECKING:
    from flowsdk._options import TaskSpec
    from flowsdk._runtime import Runtime
    from flowsdk.store import RunRecorder

__all__ = ["GATHERED", "release_held", "start_direct", "start_gathered", "start_gathered_named"]

_Task = asyncio.Task
_Future = asyncio.Future


def start_gathered(coro: CoroutineType[Any, Any, Any]) -> Any:
    """Start the action of a call that `gather` wraps; return the future to give `gather`.

    Or, when the handle has more to do than start the action, a coroutine for
    a task of its own (`start_direct`).
    """
    if coro.cr_running or coro.cr_suspended:
        return coro  # not a fresh coroutine: a task runs the rest, as for any other
    gathering[0] = start_direct  # what the handle's first step calls and returns
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    finally:
        gathering[0] = None
    raise AssertionError("a handle's first step under gather suspended")  # pragma: no cover


def _unnamed(name: object) -> None:
    """The future `gather` holds has no name to set (a task's would be shown nowhere)."""


def start_gathered_named(coro: CoroutineType[Any, Any, Any]) -> Any:
    """`start_gathered` where `create_task` then calls `set_name` on what it got.

    Python 3.13.0 to 3.13.2 do, `name` None included (CPython gh-130033; 3.13.3
    passes the name to the factory instead): the future gets a `set_name` too.
    """
    started = start_gathered(coro)
    if type(started) is _Future:
        started.set_name = _unnamed  # type: ignore[attr-defined]  # beside `cancel`
    return started


GATHERED = start_gathered_named if (3, 13) <= sys.version_info < (3, 13, 3) else start_gathered
"""What the run's task factory calls for `gather` on this Python (`TaskTracker`)."""


def start_direct(
    runtime: Runtime,
    parent: ActionState,
    task: TaskSpec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: str,
    inputs: bytes,
    recorded: bytes | None,
) -> Any:
    """Start the action of a call for `gather`, from its handle's arguments; return its future.

    A replayed or cached output, a store to wait for or a run that has closed
    is the handle's to deal with, in a task of its own: then a new coroutine
    of the handle, with the same arguments.
    """
    options = task.options
    tracker = runtime.tracker
    if (
        recorded is not None
        or runtime.closed
        or tracker is None
        or (options.cache and not options.cache_override)
    ):
        handle = task._handle or task._make_handle()
        return handle(runtime, parent, task, args, kwargs, key, inputs, recorded)
    rec = runtime.log.streaming
    if rec is not None and rec.congested():
        # Backpressure: the action starts once the writer has caught up; a future
        # stands in for it meanwhile (`release_held`).
        fut: asyncio.Future[Any] = _Future(loop=runtime.loop)
        held = tracker.held
        held += (fut, copy_context(), parent, task, args, kwargs, key, inputs)  # `HELD_WIDTH`
        if len(held) == HELD_WIDTH:
            tracker.releaser = _Task(release_held(runtime, rec), loop=runtime.loop)
        return fut
    done: asyncio.Future[Any] = _Future(loop=runtime.loop)
    action = start_child(runtime, parent, task, args, kwargs, key, inputs, None, done)
    action.direct = True  # its end settles `done` (`_outcome.settle`)
    done.cancel = action  # type: ignore[method-assign]  # `ActionState.__call__`
    return done


async def release_held(runtime: Runtime, rec: RunRecorder) -> None:
    """Start the actions of the calls `gather` made while the store was far behind.

    One task waits for the writer for all of them (`RunRecorder.relieved`),
    then starts them in the order they were called, each in the context it
    was called in, and makes each one's action end the future `gather` holds.
    A call whose future was cancelled meanwhile never starts, as a task
    cancelled before its first step; after the root's exit none does.
    """
    tracker = runtime.tracker
    assert tracker is not None
    while tracker.held:
        await rec.relieved()
        calls, tracker.held = tracker.held, []
        each = [iter(calls)] * HELD_WIDTH  # one call's items at a time
        for fut, context, parent, task, args, kwargs, key, inputs in zip(*each, strict=True):
            if fut.done():
                continue  # cancelled while held
            if runtime.closed:
                fut.cancel()
                continue
            action = context.run(
                start_child, runtime, parent, task, args, kwargs, key, inputs, context, fut
            )
            action.direct = True
            fut.cancel = action
    tracker.releaser = None
