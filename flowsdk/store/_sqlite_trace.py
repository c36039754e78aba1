"""The SQLite store's progress reports and log records: a mixin of `SQLiteStore`."""

from __future__ import annotations

import sqlite3
from typing import Any, Protocol

from flowsdk._records import LogEntry, Progress
from flowsdk.store._sqlite_schema import translate
from flowsdk.store._trace_sql import TraceSQL

__all__ = ["SQLITE_TRACE", "SQLiteTrace"]

SQLITE_TRACE = TraceSQL(
    "",
    "?",
    lambda rest: f"INSERT OR IGNORE {rest}",
    # SQLite gives a max() aggregate's other columns from the row holding the max.
    "SELECT action, max(n), at, name, step, value FROM progress "
    "WHERE run = ? AND run_attempt = ? GROUP BY action",
)


class _Connections(Protocol):
    path: str

    def _read(self) -> sqlite3.Connection | None: ...


class SQLiteTrace:
    """Reads of progress and logs (`RunReader`) for `SQLiteStore`."""

    def load_progress(
        self: _Connections, name: str, attempt: int, action: str | None = None
    ) -> list[Progress]:
        """Return the progress reports of one attempt (or of one action), oldest first."""
        conn = self._read()
        if conn is None:
            return []
        params: tuple[Any, ...] = (name, attempt) if action is None else (name, attempt, action)
        with translate(self.path):
            return SQLITE_TRACE.progress(conn.execute(SQLITE_TRACE.progress_query(action), params))

    def latest_progress(self: _Connections, name: str, attempt: int) -> dict[str, Progress]:
        """Return each action's latest progress report in one attempt."""
        conn = self._read()
        if conn is None:
            return {}
        with translate(self.path):
            return SQLITE_TRACE.latest(conn.execute(SQLITE_TRACE.latest_progress, (name, attempt)))

    def load_logs(
        self: _Connections,
        name: str,
        attempt: int,
        action: str | None = None,
        cursor: int = -1,
        limit: int | None = None,
    ) -> list[LogEntry]:
        """Return the kept log records of one attempt (or one action) with `seq > cursor`."""
        conn = self._read()
        if conn is None:
            return []
        params: tuple[Any, ...] = (name, attempt, cursor)
        if action is not None:
            params += (action,)
        with translate(self.path):
            return SQLITE_TRACE.logs(conn.execute(SQLITE_TRACE.logs_query(action, limit), params))
