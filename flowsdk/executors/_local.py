"""The local executor: a body runs as a coroutine in its action's own asyncio task."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

__all__ = ["LOCAL", "Executor", "LocalExecutor"]


class Executor(Protocol):
    """Where bodies run: how one is called, and how a cancellation reaches it."""

    name: str
    """What the action record's `executor` field says."""

    times_attempts: bool
    """True: the executor counts an attempt's `timeout` where the body runs (from
    the body's start there) and calls `RunContext.on_timeout` when it passes;
    False: the runtime's timer counts it."""

    def check_options(self, options: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Validate the task's `ray_options` (at decoration); return what is kept.

        Raises:
            ValueError: options this executor refuses.
        """

    def call(
        self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[Any]:
        """Return the awaitable that runs one attempt of a body.

        It is awaited in the action's task; what it returns or raises is the
        body's outcome.
        """

    def cancel(self, task: asyncio.Task[Any], message: str) -> bool:
        """Deliver a cancellation to the body running in the action's `task`.

        The body receives `CancelledError(message)` at its current `await`.
        Returns whether a cancellation was requested (False: the task is done).
        """


class LocalExecutor:
    """Runs bodies on the run's event loop, in the action's task (the default)."""

    name = "local"
    times_attempts = False

    def check_options(self, options: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Refuse `ray_options`: a local body has no placement."""
        if options is not None:
            raise ValueError(
                "ray_options is for tasks that run on Ray: add executor='ray' to the environment"
            )
        return None

    def call(
        self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[Any]:
        """Call the body: its coroutine runs in the action's task, with no wrapper frame."""
        return fn(*args, **kwargs)

    def cancel(self, task: asyncio.Task[Any], message: str) -> bool:
        """Cancel the action's task with `message`."""
        return task.cancel(message)


LOCAL = LocalExecutor()
