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
from contextvars import Context, copy_context
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from flowsdk._action import ActionState
from flowsdk._execute import gathering, run_action, start_child, started
from flowsdk._tracker import HELD_WIDTH
from flowsdk.errors import ActionLimitExceededError

if TYPE_CHECKING:
    from flowsdk._options import TaskSpec
    from flowsdk._runtime import Runtime
    from flowsdk.store import RunRecorder

__all__ = ["Gathered", "release_held", "start_direct", "start_gathered"]

_Task = asyncio.Task
_running_loop = asyncio._get_running_loop


def start_gathered(coro: CoroutineType[Any, Any, Any], context: Context | None = None) -> Any:
    """Start the action of a call that `gather` wraps; return the future to give `gather`.

    Or, when the handle has more to do than start the action, a coroutine for
    a task of its own (`start_direct`). With the `context` made for a task of
    its own (`create_task`...), start the action in it and return that task.
    """
    if coro.cr_running or coro.cr_suspended:
        return coro  # not a fresh coroutine: a task runs the rest, as for any other
    # What the handle's first step calls and returns.
    gathering[0] = start_direct
    gathering[1] = context
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    finally:
        gathering[0] = gathering[1] = None
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
    """Start the action of a call from its handle's arguments, for `gather` or a task.

    For `gather`, return the action's future. For a task of its own (the context
    made for it in `gathering[1]`), start the action in that context and return
    the task: its body starts on the loop's next step, as the coroutine would in
    asyncio, and the task, which runs the rest of the handle (`hosted_wait`),
    first. A replayed or cached output, a run that has closed, a call past the
    run's `max_actions` (refused by the handle, raised where the call is awaited),
    a store the handle waits for in a task of its own, or a call made for another
    loop, is the handle's to deal with: then a new coroutine of the handle, with the
    same arguments, for a task of its own.
    """
    options = task.options
    tracker = runtime.tracker
    context = gathering[1]
    rec = runtime.log.streaming
    if (
        recorded is not None
        or runtime.closed
        or (runtime.max_actions is not None and runtime.started >= runtime.max_actions)
        or tracker is None
        or (options.cache and not options.cache_override)
        or (context is not None and rec is not None and rec.congested())
        or (context is not None and _running_loop() is not runtime.loop)
    ):
        handle = task._handle or task._make_handle()
        return handle(runtime, parent, task, args, kwargs, key, inputs, recorded)
    if context is not None:
        # A task of its own, made here before the action's task, so its first step
        # comes first; its coroutine run to its first `await` (`_primed`), where a
        # cancel of the task before that step lands.
        action = start_child(runtime, parent, task, args, kwargs, key, inputs, context, None, True)
        done, waiter = action.done, task._waiter
        assert done is not None
        assert waiter is not None  # made with the handle (`Runtime.call` made that)
        done.cancel = action  # type: ignore[method-assign]  # the task's cancel reaches the action
        coro: Any = waiter(runtime, action)
        coro.send(None)
        loop = runtime.loop
        previous = tracker.previous
        if previous is None:
            host = _Task(coro, loop=loop, context=context)
            action.atask = _Task(run_action(runtime, action), loop=loop, context=context)
            return host
        # The tasks are the user's factory's to make. One that starts a task at once
        # (eager) runs the waiter past `_primed` in this call, and the waiter starts the
        # body (`hosted_wait`): a body that returns in its first step has ended when
        # `create_task` returns, and so has the task, as in asyncio. The body runs in
        # `context` meanwhile, so the waiter runs in a copy: a context is entered by
        # one task at a time.
        primed = coro.cr_await
        gathering[0] = gathering[1] = None  # the calls of a body started at once are its own
        host = previous(loop, coro, context=context.copy())
        if coro.cr_await is primed:  # not started yet: the body's task is made second
            started(action, previous(loop, run_action(runtime, action), context=context))
        return host
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
