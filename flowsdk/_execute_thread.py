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
from flowsdk._bodies import AT_REPORT, BODY_THREADS

__all__ = ["in_thread"]


def in_thread(fn: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Return the body of a plain `def` task: a coroutine that runs `fn` in a thread.

    Each call gets a daemon thread of its own, running in a copy of the
    action's context (so `current_action()` works there). A thread cannot be
    interrupted: cancelled, the coroutine raises `CancelledError` at once (the
    request decides the action's outcome, the parent gets it without
    waiting), the thread runs on and its late result is discarded. If it was
    still running then, the action is marked `cleanup_incomplete`. Unless the
    thread waits in `flowsdk.report_sync` then: the cancel lands there, as at
    an async body's `await`, and the coroutine waits for the thread's end
    (its cleanup) and ends as it did; a second cancel (the grace period is
    over) stops that wait, as it stops an async body's cleanup.
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
            return await asyncio.shield(future)
        except CancelledError:
            if not finished.is_set() and thread.ident in AT_REPORT:
                try:
                    return await future  # the thread's end: its cleanup has run
                except CancelledError:
                    if future.done() and not future.cancelled():
                        raise  # the thread's own CancelledError: the cancel it was given
            future.cancel()  # its late result is discarded
            action = current.get()
            if action is not None and not finished.is_set():
                action.cleanup_incomplete = True
            raise

    return body
