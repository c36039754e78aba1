"""Running a task as a run: `run()`, `run_async()`, `start()` and `RunHandle`."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from flowsdk._phases import RunPhase
from flowsdk._records import Actor, ControlResult
from flowsdk._result import Run
from flowsdk._runner import Runner, no_running_loop, run_sync, unpartial
from flowsdk._runtime import Runtime
from flowsdk._service import ControlService
from flowsdk.store import InProcessChannel, Store
from flowsdk.store._location import store_location

if TYPE_CHECKING:
    from flowsdk._task import Task

__all__ = ["RunHandle", "run", "run_async", "start"]

R = TypeVar("R")


async def run_async(
    task: Task[..., R] | functools.partial[Coroutine[Any, Any, R]],
    *args: Any,
    name: str | None = None,
    store: str | os.PathLike[str] | Store | None = None,
    max_actions: int | None = None,
    **task_kwargs: Any,
) -> Run[R]:
    """Run `task(*args)` as the root action of a new run and wait until the run ends.

    Keyword arguments for the task go through `functools.partial`; the keywords
    here are the run's options. Cancelled, the run is aborted and its teardown
    awaited before `CancelledError` propagates.

    Args:
        task: A task declared with `@env.task`.
        *args: Positional arguments for the task.
        **task_kwargs: Refused with a `TypeError` that says to use `functools.partial`.
        name: The run's name (unique in its store); default: generated.
        store: Where the run is recorded (see `flowsdk.run`).
        max_actions: The most actions the run may have (see `flowsdk.run`).
    """
    runner = _runner(task, args, task_kwargs, name, store, max_actions, owns_loop=False)
    runtime = await runner.begin()
    try:
        result = await runner.finish()
    finally:
        # Not after `start`: its handle answers control requests from the runtime.
        runtime.release()
    if runtime.base_exc is not None:
        # A KeyboardInterrupt/SystemExit raised in a body, re-raised once the
        # run's end is recorded, as asyncio would have raised it.
        raise runtime.base_exc
    return result


async def start(
    task: Task[..., R] | functools.partial[Coroutine[Any, Any, R]],
    *args: Any,
    name: str | None = None,
    store: str | os.PathLike[str] | Store | None = None,
    max_actions: int | None = None,
    **task_kwargs: Any,
) -> RunHandle[R]:
    """Start a run in the background of the current loop and return its handle at once."""
    runner = _runner(task, args, task_kwargs, name, store, max_actions, owns_loop=False)
    runtime = await runner.begin()
    loop = asyncio.get_running_loop()
    channel = InProcessChannel(loop, runner.handler)
    return RunHandle(runtime, runner.store, channel, loop.create_task(runner.finish()))


def run(
    task: Task[..., R] | functools.partial[Coroutine[Any, Any, R]],
    *args: Any,
    name: str | None = None,
    store: str | os.PathLike[str] | Store | None = None,
    max_actions: int | None = None,
    **task_kwargs: Any,
) -> Run[R]:
    """Run `task(*args)` as the root action of a new run, on a fresh event loop.

    Blocks until the run has ended, its actions' cleanup included, and returns
    the ended `Run`. Ctrl-C aborts the run (root cause `sigint`), waits for
    cleanup, then raises `KeyboardInterrupt`; a second Ctrl-C stops waiting.

    Args:
        task: A task declared with `@env.task` (or a `functools.partial` of one).
        *args: Positional arguments for the task.
        **task_kwargs: Refused with a `TypeError` that says to use `functools.partial`.
        name: The run's name (unique in its store); default: generated.
        store: Where the run is recorded: a URL (`sqlite:///path.db`,
            `memory://`), a path (a string or an `os.PathLike`), or a store
            object; default: `$FLOWSDK_STORE`, else `sqlite:///.flowsdk/flowsdk.db`
            in the working directory.
        max_actions: The most actions the run may have, its root included
            (default: no limit). A call past it raises `ActionLimitExceededError`
            and starts nothing; the run then ends FAILED with that error and
            its actions in progress are cancelled: a runaway recursion stops.

    Raises:
        RuntimeError: called from a running event loop (use `flowsdk.run_async`).
        TypeError, ValueError: `max_actions` is not a positive int.
        TypeError: `store` is not a URL or path string, an `os.PathLike` or a store object.
    """
    no_running_loop()
    return run_sync(_runner(task, args, task_kwargs, name, store, max_actions, owns_loop=True))


def _runner(
    task: Any,
    args: tuple[Any, ...],
    task_kwargs: dict[str, Any],
    name: str | None,
    store: str | os.PathLike[str] | Store | None,
    max_actions: int | None,
    *,
    owns_loop: bool,
) -> Runner:
    """The runner of `run`, `run_async` and `start`: their arguments checked and unpacked."""
    refuse_keywords(task, task_kwargs)
    root, args, kwargs = unpartial(task, args)
    location = store_location(store)
    return Runner(root, args, kwargs, name, location, owns_loop=owns_loop, max_actions=max_actions)


def refuse_keywords(task: object, keywords: dict[str, Any]) -> None:
    """Refuse keyword arguments meant for the task: they go through `functools.partial`.

    Raises:
        TypeError: `keywords` is not empty; the message shows the call to write.
    """
    if not keywords:
        return
    name = getattr(task, "__name__", "task")
    given = ", ".join(f"{k}=..." for k in keywords)
    raise TypeError(
        f"keyword arguments for the task ({', '.join(sorted(keywords))}) are not accepted "
        f"here: the keywords of flowsdk.run are the run's own options (name, store, "
        f"max_actions). "
        f"Pass them with functools.partial: flowsdk.run(functools.partial({name}, {given}))"
    )


class RunHandle(Generic[R]):
    """A run started with `flowsdk.start`, controllable while it runs.

    Its control methods are those of `flowsdk.Client`, applied directly on the
    run's loop (no store round trip), as the local operator.
    """

    def __init__(
        self,
        runtime: Runtime,
        store: Store,
        channel: InProcessChannel,
        task: asyncio.Task[Run[Any]],
    ) -> None:
        self._runtime = runtime
        self._service = ControlService(store, Actor.local(), channel)
        self._task = task

    @property
    def name(self) -> str:
        """The run's name."""
        return self._runtime.name

    @property
    def phase(self) -> RunPhase:
        """The run's phase now."""
        return self._runtime.phase

    def __repr__(self) -> str:
        return f"<RunHandle {self.name} {self.phase.value}>"

    async def wait(self) -> Run[R]:
        """Wait until the run has ended and return it; cancelling the wait leaves the run alone."""
        return await asyncio.shield(self._task)

    async def abort(
        self, action: str | None = None, *, group: str | None = None, reason: str | None = None
    ) -> ControlResult:
        """Abort the run, one action's subtree (`"a3"`) or a group's actions. Idempotent.

        Raises:
            ActionNotFoundError: the run has no such action or group.
            ValueError: both `action` and `group` are given; nothing is recorded.
            TypeError: `reason` is not a string (or None); nothing is recorded.
        """
        return self._service.abort(self.name, action, group=group, reason=reason)

    async def stop(self, *, abandon: bool = False, reason: str | None = None) -> ControlResult:
        """Stop the run: let in-progress actions finish, or (`abandon=True`) abandon them.

        A second stop-and-wait on a stopping run is answered `refused` (a value,
        not an exception); `abandon=True` escalates it.

        Raises:
            TypeError: `reason` is not a string (or None); nothing is recorded.
        """
        return self._service.stop(self.name, abandon=abandon, reason=reason)

    async def mark_failed(self, action: str, *, reason: str | None = None) -> ControlResult:
        """Mark an action as failed: its body is cancelled, its parent gets `RuntimeUserError`.

        Raises:
            ActionNotFoundError: the run has no such action.
            TypeError: `action` is None (name the action; to end the whole run,
                abort or stop it), or `reason` is not a string; nothing is recorded.
        """
        return self._service.mark_failed(self.name, action, reason=reason)
