"""The body of a plain `def` task: a coroutine that runs the function in a thread.

Built when the task is declared, so it lives apart from the runtime (which
`import flowsdk` does not load).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from asyncio import CancelledError
from collections.abc import Callable, Coroutine
from contextvars import copy_context
from typing import Any

from flowsdk._action import current
from flowsdk._bodies import BODY_THREADS

__all__ = ["in_thread"]


def in_thread(fn: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Return the body of a plain `def` task: a coroutine that runs `fn` in a thread.

    Each call gets a daemon thread of its own, running in a copy of the
    action's context (so `current_action()` works there). A thread cannot be
    interrupted: cancelled, the coroutine raises `CancelledError` at once (the
    request decides the action's outcome, the parent gets it without
    waiting), the thread runs on and its late result is discarded. If it was
    still running then, the action is marked `cleanup_incomplete`.
    """

    @functools.wraps(fn)
    async def body(*args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        context = copy_context()
        finished = threading.Event()

        def settle(ok: bool, value: Any) -> None:
            if future.done():
                return  # cancelled meanwhile: the late result is discarded
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def work() -> None:
            me = threading.get_ident()
            BODY_THREADS.add(me)
            try:
                outcome: tuple[bool, Any] = (True, context.run(fn, *args, **kwargs))
            except BaseException as exc:  # handed to the loop, raised in the action's task
                outcome = (False, exc)
            finally:
                BODY_THREADS.discard(me)
            finished.set()
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for it
                loop.call_soon_threadsafe(settle, *outcome)

        thread = threading.Thread(target=work, name=f"flowsdk-{fn.__name__}", daemon=True)
        thread.start()
        try:
            return await future
        except CancelledError:
            action = current.get()
            if action is not None and not finished.is_set():
                action.cleanup_incomplete = True
            raise

    return body
