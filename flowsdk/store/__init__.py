"""Stores: where runs are recorded (SPEC §5), behind three small protocols.

`open_store()` turns what a user passes (`store=`, `--store`, `FLOWSDK_STORE`)
into a store: `memory://`, `sqlite:///relative.db`, `sqlite:////absolute.db`,
`postgresql://user@host/db` (extra `flowsdk[postgres]`), or a plain file
path (SQLite). It dispatches on the URL's scheme and imports
only the store it needs. Opening a store object does no I/O; the file is
touched when a run is recorded or read. An empty location, or a URL that
is malformed or carries an unknown parameter, is a `ValueError` here,
before any file or server is touched (`_location.py`).
"""

from __future__ import annotations

import importlib
import os
import re
from typing import TYPE_CHECKING, Any

from flowsdk._records import ControlReply
from flowsdk.errors import StoreError
from flowsdk.store._base import (
    ControlChannel,
    InProcessChannel,
    QueuedRequest,
    RequestHandler,
    RunReader,
    RunRecorder,
    RunState,
    Store,
    StoredAction,
    StoredRun,
    TokenStore,
)
from flowsdk.store._location import masked_url

if TYPE_CHECKING:
    from flowsdk.store._memory import MemoryStore
    from flowsdk.store._postgres import PostgresStore
    from flowsdk.store._sqlite import SQLiteStore

__all__ = [
    "DEFAULT_STORE",
    "ControlChannel",
    "ControlReply",
    "InProcessChannel",
    "MemoryStore",
    "PostgresStore",
    "QueuedRequest",
    "RequestHandler",
    "RunReader",
    "RunRecorder",
    "RunState",
    "SQLiteStore",
    "Store",
    "StoredAction",
    "StoredRun",
    "TokenStore",
    "open_store",
    "store_url",
]

DEFAULT_STORE = "sqlite:///.flowsdk/flowsdk.db"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# URL scheme -> (module, class): a store's module is imported when first used.
_SCHEMES = {
    "memory": ("flowsdk.store._memory", "MemoryStore"),
    "sqlite": ("flowsdk.store._sqlite", "SQLiteStore"),
    "postgresql": ("flowsdk.store._postgres", "PostgresStore"),
    "postgres": ("flowsdk.store._postgres", "PostgresStore"),
}


def __getattr__(name: str) -> Any:
    for module, cls in _SCHEMES.values():
        if cls == name:
            return getattr(importlib.import_module(module), cls)
    raise AttributeError(f"module 'flowsdk.store' has no attribute {name!r}")


def store_url(store: str | None) -> str:
    """Return the URL in force: `store`, else `$FLOWSDK_STORE`, else the default.

    Raises:
        ValueError: `store`, or `$FLOWSDK_STORE` when it is in force, is empty
            (or blank): refused rather than read as "the default", which may be
            another store than the one meant (an unset shell variable).
    """
    if store is not None:
        if not store.strip():
            raise ValueError(
                f"the store location {store!r} is empty; give a store URL or a path "
                f"(such as {DEFAULT_STORE}), or leave --store out to use $FLOWSDK_STORE, "
                "else the default"
            )
        return store
    found = os.environ.get("FLOWSDK_STORE")
    if found is None:
        return DEFAULT_STORE
    if not found.strip():
        raise ValueError(
            f"FLOWSDK_STORE is set but empty ({found!r}); set it to a store URL or a path, "
            f"or unset it to use the default, {DEFAULT_STORE}"
        )
    return found


def open_store(store: str | Store | None = None) -> Store:
    """Return the store named by `store` (a URL, a path, or a store object).

    Raises:
        ValueError: the location is empty, the URL's scheme is not one flowsdk
            knows, or the URL is malformed (checked here, before any I/O).
        StoreError: a PostgreSQL URL, without the `flowsdk[postgres]` extra installed.
    """
    if store is not None and not isinstance(store, str):
        return store
    url = store_url(store)
    head, colon, _ = url.partition(":")
    # A URL's scheme (RFC 3986: a letter, then letters, digits, +, - or .); one letter
    # is a Windows drive, and a path with no colon is a SQLite file.
    scheme = head.lower() if colon and len(head) > 1 and _SCHEME.fullmatch(head) else ""
    if scheme == "memory" and url[len("memory:") :] != "//":
        raise ValueError(f"a memory store URL is memory:// and nothing more, not {url!r}")
    if scheme in _SCHEMES:
        module, cls = _SCHEMES[scheme]
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != "psycopg":
                raise
            raise StoreError(
                "PostgreSQL stores need the psycopg driver: pip install 'flowsdk[postgres]'"
            ) from None
        found: Store = getattr(imported, cls)(url)
        return found
    if scheme:
        raise ValueError(
            f"unknown store URL {masked_url(url)!r}; use memory://, sqlite:///relative/path.db, "
            "sqlite:////absolute/path.db or postgresql://user@host/database"
        )
    module, cls = _SCHEMES["sqlite"]
    plain: Store = getattr(importlib.import_module(module), cls)("sqlite:///" + url)
    return plain
