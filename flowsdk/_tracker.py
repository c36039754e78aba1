"""Plain asyncio tasks that a run's bodies start, so the root's exit can cancel them."""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Callable, Coroutine
from contextvars import copy_context
from types import CodeType, CoroutineType
from typing import Any

from flowsdk._action import RunContext, current

_getframe = sys._getframe
_GATHER = asyncio.gather.__code__
_Future = asyncio.Future
_Coroutine = CoroutineType

__all__ = ["HELD_WIDTH", "TaskTracker"]

HELD_WIDTH = 8
"""Items per held call: its future, context, parent, task, args, kwargs, key, inputs."""


class TaskTracker:
    """Installed as the loop's task factory for a run's duration; remembers the run's tasks.

    It chains to any factory already set, so a user's own factory keeps
    working: it makes every task, the calls' included, as below, and one that
    starts a task at once (`asyncio.eager_task_factory`) starts a call's body
    inside `create_task` or `gather`, as asyncio starts a coroutine then (the
    handle of a call with more to do, in a task made by that factory, makes
    the body's context itself). Python 3.11 tasks do not expose their context:
    this is how a task is known to belong to the run. Tasks whose coroutine runs one of `own`
    (the SDK's action and handle coroutines) are not tracked: they are actions.
    For a task that runs a call's handle (`handle`) it makes the task's context
    itself, the copy asyncio would make, and `gathered` starts the call's action
    in it at once (`start_gathered`): the task runs the rest of the handle. A
    handle with more to do runs in that task and takes the context then
    (`contexts`). A handle that `asyncio.gather` wraps gets no task: `gathered`
    starts its action and gives `gather` the action's own future.
    """

    def __init__(
        self,
        runtime: RunContext,
        loop: asyncio.AbstractEventLoop,
        own: frozenset[CodeType],
        handle: CodeType,
        gathered: Callable[..., Any],
    ) -> None:
        self.runtime = runtime
        self.loop = loop
        self.own = own
        self.previous: Callable[..., Any] | None = loop.get_task_factory()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.handle = handle
        self.gathered = gathered
        # Calls `gather` made while the store was far behind, waiting to start, and
        # the task that starts them (`_gather.release_held`). Each call is
        # `HELD_WIDTH` items one after the other, its future first: no tuple per
        # call for the garbage collector to count (from a big run's second wave
        # on, every call waits here).
        self.held: list[Any] = []
        self.releaser: asyncio.Task[None] | None = None
        # The context made for each task of its own that runs a call's handle,
        # until the handle starts the action in it (`start_child`).
        self.contexts: dict[asyncio.Task[Any], contextvars.Context] = {}
        loop.set_task_factory(self)  # type: ignore[arg-type]

    def __call__(
        self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        previous = self.previous
        task: Any
        code = getattr(coro, "cr_code", None)
        if code is self.handle and "context" not in kwargs:
            try:  # gather -> _ensure_future -> loop.create_task -> this
                by_gather = _getframe(3).f_code is _GATHER
            except ValueError:  # a stack that shallow (a callback called from C): not gather
                by_gather = False
            if by_gather:
                # `gather` wraps the call: it gets the action's own future instead,
                # or, if the handle has more to do, a coroutine for a task of its own.
                started = self.gathered(coro)
                if isinstance(started, _Future):
                    return started  # type: ignore[return-value]  # gather holds it as a future
                coro = started
            # A call in a task of its own: its action starts now, in the context made
            # for that task, and the task runs the rest of the handle; or, if the
            # handle has more to do, the handle runs there and starts the action in
            # that context when it gets to it (`contexts`, taken by `start_child`).
            context = copy_context()
            if not by_gather:
                started = self.gathered(coro, context)
                if not isinstance(started, _Coroutine):  # the task (a user's factory made it?)
                    if "name" in kwargs:  # given to the factory by Python 3.13.3 and later
                        started.set_name(kwargs["name"])
                    return started  # type: ignore[no-any-return]
                coro = started
            if previous is not None:
                # The user's factory may start the handle inside this call (eager): the
                # handle then makes the body's context itself, a copy of this one.
                return previous(loop, coro, context=context, **kwargs)  # type: ignore[no-any-return]
            handle_task = asyncio.Task(coro, loop=loop, context=context, **kwargs)
            self.contexts[handle_task] = context
            return handle_task
        if previous is not None:
            task = previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        if code in self.own:
            return task  # type: ignore[no-any-return]  # an action's handle: not tracked
        state = current.get()
        if state is not None and state.runtime is self.runtime and not self.runtime.closed:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return task  # type: ignore[no-any-return]

    def cancel_all(self) -> None:
        """Cancel every tracked task still running (no record: they are not actions)."""
        for task in list(self.tasks):
            if not task.done():
                task.cancel("flowsdk: the run's root exited (root_exit)")

    def survivors(self) -> list[asyncio.Task[Any]]:
        """The tracked tasks that are still pending."""
        return [t for t in self.tasks if not t.done()]

    def close(self) -> None:
        """Give the loop back its previous task factory (unless someone replaced ours)."""
        self.contexts.clear()  # of handles that never started an action (replayed, cancelled)
        held, self.held = self.held, []
        for fut in held[::HELD_WIDTH]:
            fut.cancel()  # a call held back at the run's end never starts
        if self.releaser is not None:
            self.releaser.cancel()
            self.releaser = None
        factory: object = self.loop.get_task_factory()
        if factory is self:
            self.loop.set_task_factory(self.previous)
