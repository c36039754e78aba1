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
from contextvars import copy_context
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from flowsdk._action import ActionState
from flowsdk._execute import gathering, start_child
from flowsdk._tracker import HELD_WIDTH
from flowsdk.errors import ActionLimitExceededError

if TYPE_CHECKING:
    from flowsdk._options import TaskSpec
    from flowsdk._runtime import Runtime
    from flowsdk.store import RunRecorder

__all__ = ["Gathered", "release_held", "start_direct", "start_gathered"]

_Task = asyncio.Task


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


class Gathered(asyncio.Future[Any]):
    """The future `gather` holds for a call it wraps: the action's end settles it.

    Its `cancel` cancels the action (`ActionState.__call__`); held while the
    store is far behind (`release_held`), before its action exists, it is
    cancelled as a future. What `gather` and asyncio set on it are slots:
    `gather` marks each future it made (`_log_destroy_pending`), which on a
    plain future makes an instance dictionary, one more object per child for
    the garbage collector. Nothing awaits it (`gather` waits by a callback),
    so asyncio's generic path for a subclass costs nothing here.
    """

    __slots__ = ("_log_destroy_pending", "action", "asked")
    # Set by whoever makes one, right after: an `__init__` of its own would add a
    # Python frame to every call.
    action: ActionState | None

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the action (once it exists), as `gather` cancels what it holds."""
        action = self.action
        if action is None:
            return super().cancel(msg)
        return action(msg)

    def set_name(self, name: object) -> None:
        """A task's name has nowhere to show here (Python 3.13.0 to 3.13.2 set one).

        Their `create_task` calls `set_name` on what the task factory returned,
        `None` included (CPython gh-130033; 3.13.3 passes the name to the
        factory instead).
        """


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

    A replayed or cached output, a store to wait for, a run that has closed
    or a call past the run's `max_actions` (refused by the handle, raised to
    `gather`) is the handle's to deal with, in a task of its own: then a new
    coroutine of the handle, with the same arguments.
    """
    options = task.options
    tracker = runtime.tracker
    if (
        recorded is not None
        or runtime.closed
        or (runtime.max_actions is not None and runtime.started >= runtime.max_actions)
        or tracker is None
        or (options.cache and not options.cache_override)
    ):
        handle = task._handle or task._make_handle()
        return handle(runtime, parent, task, args, kwargs, key, inputs, recorded)
    rec = runtime.log.streaming
    if rec is not None and rec.congested():
        # Backpressure: the action starts once the writer has caught up; a future
        # stands in for it meanwhile (`release_held`).
        fut = Gathered(loop=runtime.loop)
        fut.action = None  # until it is released
        held = tracker.held
        held += (fut, copy_context(), parent, task, args, kwargs, key, inputs)  # `HELD_WIDTH`
        if len(held) == HELD_WIDTH:
            tracker.releaser = _Task(release_held(runtime, rec), loop=runtime.loop)
        return fut
    done = Gathered(loop=runtime.loop)
    action = start_child(runtime, parent, task, args, kwargs, key, inputs, None, done)
    done.action = action  # its `cancel` is the action's (`ActionState.__call__`)
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
            try:
                action = context.run(
                    start_child, runtime, parent, task, args, kwargs, key, inputs, context, fut
                )
            except ActionLimitExceededError as exc:  # past `max_actions`: `gather` gets it
                fut.set_exception(exc)
                continue
            fut.action = action
    tracker.releaser = None
