"""The PostgreSQL store's progress reports and log records: a mixin of `PostgresStore`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import psycopg

from flowsdk._records import LogEntry, Progress
from flowsdk.store._trace_sql import TraceSQL

__all__ = ["POSTGRES_TRACE", "PostgresTrace"]

T = TypeVar("T")

POSTGRES_TRACE = TraceSQL(
    "flowsdk.",
    "%s",
    lambda rest: f"INSERT {rest} ON CONFLICT DO NOTHING",
    "SELECT DISTINCT ON (action) action, n, at, name, step, value FROM flowsdk.progress "
    "WHERE run = %s AND run_attempt = %s ORDER BY action, n DESC",
)


class _Sessions(Protocol):
    def _read(self, work: Callable[[psycopg.Connection[Any]], T], empty: Callable[[], T]) -> T: ...


class PostgresTrace:
    """Reads of progress and logs (`RunReader`) for `PostgresStore`."""

    def load_progress(
        self: _Sessions, name: str, attempt: int, action: str | None = None
    ) -> list[Progress]:
        """Return the progress reports of one attempt (or of one action), oldest first."""
        params: tuple[Any, ...] = (name, attempt) if action is None else (name, attempt, action)

        def work(conn: psycopg.Connection[Any]) -> list[Progress]:
            return POSTGRES_TRACE.progress(
                conn.execute(POSTGRES_TRACE.progress_query(action), params)
            )

        return self._read(work, list)

    def latest_progress(self: _Sessions, name: str, attempt: int) -> dict[str, Progress]:
        """Return each action's latest progress report in one attempt."""

        def work(conn: psycopg.Connection[Any]) -> dict[str, Progress]:
            return POSTGRES_TRACE.latest(
                conn.execute(POSTGRES_TRACE.latest_progress, (name, attempt))
            )

        return self._read(work, dict)

    def load_logs(
        self: _Sessions,
        name: str,
        attempt: int,
        action: str | None = None,
        cursor: int = -1,
        limit: int | None = None,
    ) -> list[LogEntry]:
        """Return the kept log records of one attempt (or one action) with `seq > cursor`."""
        params: tuple[Any, ...] = (name, attempt, cursor)
        if action is not None:
            params += (action,)

        def work(conn: psycopg.Connection[Any]) -> list[LogEntry]:
            return POSTGRES_TRACE.logs(
                conn.execute(POSTGRES_TRACE.logs_query(action, limit), params)
            )

        return self._read(work, list)
