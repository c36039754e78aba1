"""The SQLite store's reads of actions: a mixin of `SQLiteStore`.

The named actions, their values, their groups and one action in full are read by
the tables' keys, so a run of a million actions answers about as fast as a run of
ten (one action's routine events are searched for in the run's packs, in the
database). A run's outline (`load_tree`) is every action's name, parent and phase.
"""

from __future__ import annotations

import sqlite3
from typing import Protocol

from flowsdk._phases import ActionPhase
from flowsdk._records import (
    ActionOutline,
    ActionRecord,
    ActionRow,
    RunRecord,
    action_from_row,
    whole_keys,
)
from flowsdk.errors import ActionNotFoundError, RunNotFoundError
from flowsdk.store._base import StoredAction
from flowsdk.store._judged import Judged
from flowsdk.store._rows import events_from_rows, of_action, outline, routine_needle
from flowsdk.store._sqlite_schema import ACTION_COLUMNS, ACTION_EVENTS, translate

__all__ = ["SQLiteActions"]

# SQLite limits the number of bound parameters of one statement.
_CHUNK = 500


class _Store(Protocol):
    path: str
    _judged: Judged  # what a reader that may not write judged gone

    def _read(self) -> sqlite3.Connection | None: ...

    def _no_runs(self, name: str) -> str: ...

    def _record(self, conn: sqlite3.Connection, name: str, attempt: int | None) -> RunRecord: ...

    def reconcile(self) -> None: ...


def _rows(
    conn: sqlite3.Connection, name: str, attempt: int, actions: list[str]
) -> tuple[list[ActionRow], dict[str, str]]:
    """The named actions' rows in start order, and their whole keys."""
    rows: list[ActionRow] = []
    keys: dict[str, str] = {}
    for i in range(0, len(actions), _CHUNK):
        chunk = actions[i : i + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows += [
            ActionRow(*r)
            for r in conn.execute(
                f"SELECT {ACTION_COLUMNS} FROM actions WHERE run = ? AND run_attempt = ? "
                f"AND name IN ({marks})",
                (name, attempt, *chunk),
            )
        ]
        # A row keeps its key's last segment: read the ancestors' segments too.
        keys.update(
            whole_keys(
                conn.execute(
                    "WITH RECURSIVE up(name, parent, key) AS ("
                    "SELECT name, parent, key FROM actions WHERE run = ? "
                    f"AND run_attempt = ? AND name IN ({marks}) "
                    "UNION SELECT a.name, a.parent, a.key FROM actions a JOIN up "
                    "ON a.run = ? AND a.run_attempt = ? AND a.name = up.parent) "
                    "SELECT name, parent, key FROM up",
                    (name, attempt, *chunk, name, attempt),
                )
            )
        )
    rows.sort(key=lambda r: r.seq)
    return rows, keys


def missing_action(
    conn: sqlite3.Connection, name: str, attempt: int, action: str
) -> ActionNotFoundError:
    """The error for an action the attempt does not have, naming its first and last ones."""
    count, first, last = conn.execute(
        "SELECT count(*), min(seq), max(seq) FROM actions WHERE run = ? AND run_attempt = ?",
        (name, attempt),
    ).fetchone()
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM actions WHERE run = ? AND run_attempt = ? "
            + ("ORDER BY seq" if count <= 8 else "AND seq IN (?, ?) ORDER BY seq"),
            (name, attempt) if count <= 8 else (name, attempt, first, last),
        )
    ]
    return ActionNotFoundError.for_action(name, action, names, count)


class SQLiteActions:
    """Keyed reads of actions (`RunReader`) for `SQLiteStore`."""

    def load_actions(
        self: _Store, name: str, attempt: int, actions: list[str]
    ) -> list[ActionRecord]:
        """Return the records of the named actions of one attempt, in start order."""
        conn = self._read()
        if conn is None or not actions:
            return []
        with translate(self.path):
            rows, keys = _rows(conn, name, attempt, actions)
        rows = self._judged.rows(name, attempt, rows)
        return [action_from_row(name, r, keys[r.name]) for r in rows]

    def load_tree(self: _Store, name: str, attempt: int) -> list[ActionOutline]:
        """Return every action of one attempt in outline, in start order."""
        conn = self._read()
        if conn is None:
            return []
        with translate(self.path):
            found = outline(
                conn.execute(
                    "SELECT name, parent, phase FROM actions WHERE run = ? AND run_attempt = ? "
                    "ORDER BY seq",
                    (name, attempt),
                )
            )
        return self._judged.outline(name, attempt, found)

    def load_payloads(
        self: _Store, name: str, attempt: int, actions: list[str]
    ) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Return the recorded inputs and output of the named actions (keyed lookups)."""
        conn = self._read()
        found: dict[str, tuple[bytes | None, bytes | None]] = {}
        if conn is None:
            return found
        with translate(self.path):
            for i in range(0, len(actions), _CHUNK):
                chunk = actions[i : i + _CHUNK]
                for action, inputs, output in conn.execute(
                    "SELECT name, inputs, output FROM actions WHERE run = ? AND run_attempt = ? "
                    f"AND name IN ({', '.join('?' * len(chunk))})",
                    (name, attempt, *chunk),
                ):
                    found[action] = (inputs, output)
        return found

    def load_action(self: _Store, name: str, attempt: int | None, action: str) -> StoredAction:
        """Return one action of one attempt (default: the latest) in full, by keyed lookups."""
        self.reconcile()
        conn = self._read()
        if conn is None:
            raise RunNotFoundError(self._no_runs(name))
        with translate(self.path):
            record = self._record(conn, name, attempt)
            rows, keys = _rows(conn, name, record.attempt, [action])
            if not rows:
                raise missing_action(conn, name, record.attempt, action)
            found = conn.execute(
                ACTION_EVENTS,
                {
                    "run": name,
                    "attempt": record.attempt,
                    "action": action,
                    "needle": routine_needle(action),
                },
            )
            events = events_from_rows(of_action(found, action))
        [row] = self._judged.rows(name, record.attempt, rows)
        return StoredAction(
            record, action_from_row(name, row, keys[row.name]), row.inputs, row.output, events
        )

    def group_phases(self: _Store, name: str, attempt: int, group: str) -> list[ActionPhase]:
        """Return the phases of the actions of `group` in one attempt."""
        conn = self._read()
        if conn is None:
            return []
        judged = self._judged
        with translate(self.path):
            return [
                ActionPhase(judged.phase(name, attempt, r[0]))
                for r in conn.execute(
                    "SELECT phase FROM actions WHERE run = ? AND run_attempt = ? AND grp = ?",
                    (name, attempt, group),
                )
            ]

    def groups(self: _Store, name: str, attempt: int) -> list[str]:
        """Return the group names of one attempt, sorted."""
        conn = self._read()
        if conn is None:
            return []
        with translate(self.path):
            return [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT grp FROM actions WHERE run = ? AND run_attempt = ? "
                    "AND grp IS NOT NULL ORDER BY grp",
                    (name, attempt),
                )
            ]
