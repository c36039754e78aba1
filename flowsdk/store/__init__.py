"""Stores: where runs are recorded (SPEC §5).

`open_store()` turns what a user passes (`store=`, `--store`, `FLOWSDK_STORE`)
into a store: `memory://`, `sqlite:///relative.db`, `sqlite:////absolute.db`,
or a plain file path (SQLite). Opening a store object does no I/O; the file is
touched when a run is recorded or read.
"""

from __future__ import annotations

import os

from flowsdk.store._base import ControlAnswer, RequestHandler, RunRecorder, Store, StoredRun
from flowsdk.store._memory import MemoryStore
from flowsdk.store._sqlite import SQLiteStore

__all__ = [
    "DEFAULT_STORE",
    "ControlAnswer",
    "MemoryStore",
    "RequestHandler",
    "RunRecorder",
    "SQLiteStore",
    "Store",
    "StoredRun",
    "open_store",
    "store_url",
]

DEFAULT_STORE = "sqlite:///.flowsdk/flowsdk.db"


def store_url(store: str | None) -> str:
    """Return the URL in force: `store`, else `$FLOWSDK_STORE`, else the default."""
    return store or os.environ.get("FLOWSDK_STORE") or DEFAULT_STORE


def open_store(store: str | Store | None = None) -> Store:
    """Return the store named by `store` (a URL, a path, or a store object).

    Raises:
        ValueError: the URL's scheme is not one flowsdk knows.
    """
    if store is not None and not isinstance(store, str):
        return store
    url = store_url(store)
    if url.startswith("memory:"):
        return MemoryStore(url)
    if url.startswith("sqlite:"):
        return SQLiteStore(url)
    if url.startswith(("postgresql:", "postgres:")):
        raise ValueError(
            f"store {url!r}: PostgreSQL stores are not available in this version of flowsdk; "
            "use sqlite:///path.db"
        )
    if "://" in url:
        raise ValueError(
            f"unknown store URL {url!r}; use memory://, sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db"
        )
    return SQLiteStore("sqlite:///" + url)
