"""The runs live in this process, by store and name: a control request from a run's own loop.

A `Client` on a SQLite or PostgreSQL store asks a live run's runner through
the store and waits for its answer. Called on the thread whose event loop
runs that very run (code beside `flowsdk.start`'s handle, or a task body
controlling its own run), the wait would block the loop that has to answer,
until the answer's deadline. Such a request is applied on the spot instead,
as for the memory store (`InProcessChannel`): the runner records it as it
records any request.
"""

from __future__ import annotations

import asyncio
import os
import threading
from asyncio import _get_running_loop
from typing import Any

from flowsdk.store import InProcessChannel, RequestHandler

__all__ = ["local_channel", "run_ended_here", "run_started_here"]

_Key = tuple[str, str]
_live: dict[_Key, tuple[asyncio.AbstractEventLoop, RequestHandler]] = {}
_lock = threading.Lock()


def _key(store: Any, run: str) -> _Key:
    """A store named the same way whatever spelling its URL had (a file by its real path)."""
    path = getattr(store, "path", None)
    where = os.path.realpath(path) if isinstance(path, str) else str(store.url)
    return where, run


def run_started_here(
    store: Any, run: str, loop: asyncio.AbstractEventLoop, handler: RequestHandler
) -> None:
    """Note that `run` of `store` is live on `loop`, its requests applied by `handler`."""
    with _lock:
        _live[_key(store, run)] = (loop, handler)


def run_ended_here(store: Any, run: str) -> None:
    """Note that `run` of `store` is no longer live in this process."""
    with _lock:
        _live.pop(_key(store, run), None)


def local_channel(store: Any, run: str) -> InProcessChannel | None:
    """The channel to `run` if it is live on the event loop of the calling thread, else None."""
    with _lock:
        found = _live.get(_key(store, run))
    if found is None or _get_running_loop() is not found[0]:
        return None
    return InProcessChannel(*found)
