"""Progress reports and captured log records in both SQL stores: tables, writes, reads.

SQLite and PostgreSQL keep the same two tables (`progress`, `logs`) with the
same columns (but for a NaN report: SQLite keeps it as NULL, PostgreSQL as
NaN); the statements differ only in their placeholders, the schema prefix
and how a row written twice is ignored. The per-run writer writes
them with its batches (never one transaction per report), and keeps only an
action's last `MAX_LOGS` log records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flowsdk._records import (
    MAX_LOGS,
    LogEntry,
    LogRow,
    Progress,
    ProgressRow,
    log_from_row,
    progress_from_row,
)

__all__ = ["TraceSQL", "log_params", "progress_params"]

_PROGRESS_COLUMNS = "action, n, at, name, step, value"
_LOG_COLUMNS = "seq, action, n, at, level, logger, message"


def table_statements(prefix: str, real: str) -> list[str]:
    """Return the statements creating both tables (`prefix`: `""` or `"flowsdk."`).

    As SQLite's schema 4 and PostgreSQL's schema 3 made them: a migration's statements
    never change (SQLite's schema 9 rebuilds `progress` so that it takes a NaN).
    """
    return [
        f"""CREATE TABLE {prefix}progress (
            run TEXT NOT NULL,
            run_attempt INTEGER NOT NULL,
            action TEXT NOT NULL,
            n INTEGER NOT NULL,
            at {real} NOT NULL,
            name TEXT NOT NULL,
            step BIGINT,
            value {real} NOT NULL,
            PRIMARY KEY (run, run_attempt, action, n)
        )""",
        f"""CREATE TABLE {prefix}logs (
            run TEXT NOT NULL,
            run_attempt INTEGER NOT NULL,
            seq BIGINT NOT NULL,
            action TEXT NOT NULL,
            n INTEGER NOT NULL,
            at {real} NOT NULL,
            level TEXT NOT NULL,
            logger TEXT NOT NULL,
            message TEXT NOT NULL,
            PRIMARY KEY (run, run_attempt, seq)
        )""",
        f"CREATE INDEX logs_action ON {prefix}logs (run, run_attempt, action, n)",
    ]


def progress_params(name: str, attempt: int, rows: Sequence[ProgressRow]) -> list[tuple[Any, ...]]:
    """Return the insert parameters of a batch's progress rows."""
    return [(name, attempt, r.action, r.n, r.at, r.name, r.step, r.value) for r in rows]


def _progress_row(row: Sequence[Any]) -> ProgressRow:
    """Return a selected progress row, its NULL value read as NaN.

    SQLite stores a NaN as NULL (its progress table takes NULL since schema 9);
    a report's value is never None otherwise. PostgreSQL keeps NaN itself.
    """
    action, n, at, name, step, value = row
    return ProgressRow(action, n, at, name, step, math.nan if value is None else value)


def log_params(
    name: str, attempt: int, rows: Sequence[LogRow]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Return a batch's log rows to insert and the trims that keep `MAX_LOGS` per action.

    Rows that the same batch would drop again are not inserted at all.
    """
    last: dict[str, int] = {}
    for r in rows:
        if r.n > last.get(r.action, -1):
            last[r.action] = r.n
    inserts = [
        (name, attempt, r.seq, r.action, r.n, r.at, r.level, r.logger, r.message)
        for r in rows
        if r.n > last[r.action] - MAX_LOGS
    ]
    trims = [(name, attempt, action, n - MAX_LOGS) for action, n in last.items() if n >= MAX_LOGS]
    return inserts, trims


class TraceSQL:
    """The statements of one SQL dialect for progress and logs, and the reads built on them."""

    def __init__(
        self, prefix: str, mark: str, ignore_conflict: Callable[[str], str], latest: str
    ) -> None:
        def marks(count: int) -> str:
            return ", ".join([mark] * count)

        self.insert_progress = ignore_conflict(
            f"INTO {prefix}progress (run, run_attempt, {_PROGRESS_COLUMNS}) VALUES ({marks(8)})"
        )
        self.insert_log = ignore_conflict(
            f"INTO {prefix}logs (run, run_attempt, {_LOG_COLUMNS}) VALUES ({marks(9)})"
        )
        self.trim_logs = (
            f"DELETE FROM {prefix}logs WHERE run = {mark} AND run_attempt = {mark} "
            f"AND action = {mark} AND n <= {mark}"
        )
        where = f"WHERE run = {mark} AND run_attempt = {mark}"
        self.select_progress = f"SELECT {_PROGRESS_COLUMNS} FROM {prefix}progress {where}"
        self.progress_action = f" AND action = {mark}"
        self.select_logs = f"SELECT {_LOG_COLUMNS} FROM {prefix}logs {where} AND seq > {mark}"
        # Each action's latest report: the dialect's own form (SQLite's bare columns
        # of a max() aggregate, PostgreSQL's DISTINCT ON).
        self.latest_progress = latest
        self.mark = mark

    def write(
        self,
        executemany: Callable[[str, list[tuple[Any, ...]]], object],
        name: str,
        attempt: int,
        progress: Sequence[ProgressRow],
        logs: Sequence[LogRow],
    ) -> None:
        """Write one batch's progress and log rows (inside the batch's transaction)."""
        if progress:
            executemany(self.insert_progress, progress_params(name, attempt, progress))
        if logs:
            inserts, trims = log_params(name, attempt, logs)
            executemany(self.insert_log, inserts)
            if trims:
                executemany(self.trim_logs, trims)

    @staticmethod
    def progress(rows: Iterable[Sequence[Any]]) -> list[Progress]:
        """Turn selected progress rows into records."""
        return [progress_from_row(_progress_row(row)) for row in rows]

    @staticmethod
    def latest(rows: Iterable[Sequence[Any]]) -> dict[str, Progress]:
        """Turn each action's latest progress row into a record, keyed by action."""
        return {p.action: p for p in (progress_from_row(_progress_row(row)) for row in rows)}

    def progress_query(self, action: str | None) -> str:
        """Return the query for a run's (or one action's) reports, oldest first."""
        extra = self.progress_action if action is not None else ""
        return f"{self.select_progress}{extra} ORDER BY at, action, n"

    def logs_query(self, action: str | None, limit: int | None = None) -> str:
        """Return the query for a run's (or one action's) kept log records after a cursor."""
        extra = f" AND action = {self.mark}" if action is not None else ""
        page = f" LIMIT {int(limit)}" if limit is not None else ""
        return f"{self.select_logs}{extra} ORDER BY seq{page}"

    @staticmethod
    def logs(rows: Iterable[Sequence[Any]]) -> list[LogEntry]:
        """Turn selected log rows into records."""
        return [log_from_row(LogRow(*row)) for row in rows]
