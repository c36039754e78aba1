"""Reading a SQLite store this process cannot write (SPEC §5: readers with read-only access).

A user with read permission only, or a store on a read-only mount, can list
and show runs. The file is opened with `mode=ro`: SQLite then reads the
write-ahead log through the `-shm` index when that file exists (a runner is
live, or was). When the index does not exist and cannot be created (the
folder is not writable), the file is opened `immutable=1`: what the log holds
and was not yet copied into the file is not seen, so a live run may look a
little behind. Nothing is ever written: a run whose runner is gone is shown
`CRASHED` as judged, without recording it, and so are its unfinished actions,
as a writer would record them (`mark_crashed`; `_judged`).
"""

from __future__ import annotations

import os
import sqlite3
from urllib.parse import quote

__all__ = ["cannot_write", "open_read_only"]


def cannot_write(path: str) -> bool:
    """Whether this process cannot write the store file or create files next to it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.access(path, os.W_OK) or not os.access(folder, os.W_OK | os.X_OK):
        return True
    try:
        return os.statvfs(path).f_flag & os.ST_RDONLY != 0
    except OSError:
        return False


def open_read_only(path: str, busy_timeout: float) -> sqlite3.Connection:
    """Open the store for reading only: `mode=ro`, else `immutable=1` (see the module)."""
    base = "file:" + quote(os.path.abspath(path))
    for query in ("mode=ro", "mode=ro&immutable=1"):
        conn = sqlite3.connect(
            f"{base}?{query}",
            uri=True,
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            conn.close()
            if query.endswith("immutable=1"):
                raise
            continue
        return conn
    raise AssertionError("unreachable")
