"""The PostgreSQL store's reads of actions: a mixin of `PostgresStore`.

The named actions, their values, their groups and one action in full are read by
the tables' keys, so a run of a million actions answers about as fast as a run of
ten (one action's routine events are searched for in the run's packs, in the
database). A run's outline (`load_tree`) is every action's name, parent and phase.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn, Protocol, TypeVar

import psycopg

from flowsdk._phases import ActionPhase
from flowsdk._records import (
    ActionOutline,
    ActionRecord,
    ActionRow,
    RunRecord,
    action_from_row,
    whole_keys,
)
from flowsdk.errors import ActionNotFoundError
from flowsdk.store._base import StoredAction
from flowsdk.store._judged import Judged
from flowsdk.store._postgres_schema import ACTION_COLUMNS, ACTION_EVENTS
from flowsdk.store._rows import events_from_rows, of_action, outline, routine_needle

__all__ = ["PostgresActions", "missing_action"]

T = TypeVar("T")
Conn = psycopg.Connection[Any]


class _Store(Protocol):
    _judged: Judged  # what a role that may not write judged gone

    def _read(self, work: Callable[[Conn], T], empty: Callable[[], T]) -> T: ...

    def _none_yet(self, name: str) -> NoReturn: ...

    def _reconcile(self, conn: Conn, name: str | None = None) -> None: ...

    def _run(self, conn: Conn, name: str, attempt: int | None) -> RunRecord: ...


def _rows(
    conn: Conn, name: str, attempt: int, actions: list[str]
) -> tuple[list[ActionRow], dict[str, str]]:
    """The named actions' rows in start order, and their whole keys."""
    rows = [
        ActionRow(*r)
        for r in conn.execute(
            f"SELECT {ACTION_COLUMNS} FROM flowsdk.actions WHERE run = %s "
            "AND run_attempt = %s AND name = ANY(%s) ORDER BY seq",
            (name, attempt, actions),
        )
    ]
    # A row keeps its key's last segment: read the ancestors' segments too.
    keys = whole_keys(
        conn.execute(
            "WITH RECURSIVE up(name, parent, key) AS ("
            "SELECT name, parent, key FROM flowsdk.actions WHERE run = %s "
            "AND run_attempt = %s AND name = ANY(%s) "
            "UNION SELECT a.name, a.parent, a.key FROM flowsdk.actions a JOIN up "
            "ON a.run = %s AND a.run_attempt = %s AND a.name = up.parent) "
            "SELECT name, parent, key FROM up",
            (name, attempt, actions, name, attempt),
        )
    )
    return rows, keys


def missing_action(conn: Conn, name: str, attempt: int, action: str) -> ActionNotFoundError:
    """The error for an action the attempt does not have, naming its first and last ones."""
    row = conn.execute(
        "SELECT count(*), min(seq), max(seq) FROM flowsdk.actions "
        "WHERE run = %s AND run_attempt = %s",
        (name, attempt),
    ).fetchone()
    assert row is not None
    count, first, last = row
    if count <= 8:
        query = "SELECT name FROM flowsdk.actions WHERE run = %s AND run_attempt = %s ORDER BY seq"
        params: tuple[Any, ...] = (name, attempt)
    else:
        query = (
            "SELECT name FROM flowsdk.actions WHERE run = %s AND run_attempt = %s "
            "AND seq IN (%s, %s) ORDER BY seq"
        )
        params = (name, attempt, first, last)
    names = [r[0] for r in conn.execute(query, params)]
    return ActionNotFoundError.for_action(name, action, names, count)


class PostgresActions:
    """Keyed reads of actions (`RunReader`) for `PostgresStore`."""

    def load_actions(
        self: _Store, name: str, attempt: int, actions: list[str]
    ) -> list[ActionRecord]:
        """Return the records of the named actions of one attempt, in start order."""
        if not actions:
            return []

        def work(conn: Conn) -> list[ActionRecord]:
            rows, keys = _rows(conn, name, attempt, actions)
            rows = self._judged.rows(name, attempt, rows)
            return [action_from_row(name, r, keys[r.name]) for r in rows]

        return self._read(work, list)

    def load_tree(self: _Store, name: str, attempt: int) -> list[ActionOutline]:
        """Return every action of one attempt in outline, in start order."""

        def work(conn: Conn) -> list[ActionOutline]:
            found = outline(
                conn.execute(
                    "SELECT name, parent, phase FROM flowsdk.actions WHERE run = %s "
                    "AND run_attempt = %s ORDER BY seq",
                    (name, attempt),
                )
            )
            return self._judged.outline(name, attempt, found)

        return self._read(work, list)

    def load_payloads(
        self: _Store, name: str, attempt: int, actions: list[str]
    ) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Return the recorded inputs and output of the named actions (keyed lookups)."""

        def work(conn: Conn) -> dict[str, tuple[bytes | None, bytes | None]]:
            return {
                action: (inputs, output)
                for action, inputs, output in conn.execute(
                    "SELECT name, inputs, output FROM flowsdk.actions WHERE run = %s "
                    "AND run_attempt = %s AND name = ANY(%s)",
                    (name, attempt, actions),
                )
            }

        return self._read(work, dict)

    def load_action(self: _Store, name: str, attempt: int | None, action: str) -> StoredAction:
        """Return one action of one attempt (default: the latest) in full, by keyed lookups."""

        def work(conn: Conn) -> StoredAction:
            self._reconcile(conn, name)
            record = self._run(conn, name, attempt)
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

        return self._read(work, lambda: self._none_yet(name))

    def group_phases(self: _Store, name: str, attempt: int, group: str) -> list[ActionPhase]:
        """Return the phases of the actions of `group` in one attempt."""

        def work(conn: Conn) -> list[ActionPhase]:
            return [
                ActionPhase(self._judged.phase(name, attempt, r[0]))
                for r in conn.execute(
                    "SELECT phase FROM flowsdk.actions WHERE run = %s AND run_attempt = %s "
                    "AND grp = %s",
                    (name, attempt, group),
                )
            ]

        return self._read(work, list)

    def groups(self: _Store, name: str, attempt: int) -> list[str]:
        """Return the group names of one attempt, sorted."""

        def work(conn: Conn) -> list[str]:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT grp FROM flowsdk.actions WHERE run = %s AND run_attempt = %s "
                    "AND grp IS NOT NULL ORDER BY grp",
                    (name, attempt),
                )
            ]

        return self._read(work, list)
