"""Assertions shared by the tests: one terminal phase each, nothing left running, phases, causes."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import flowsdk
from flowsdk import ActionPhase, EventKind
from flowsdk.store._rows import with_routine
from flowsdk.store._sqlite_schema import EVENTS_AFTER, INSERT_EVENT

TERMINAL = {p.value for p in ActionPhase if p.terminal}


def assert_clean(run: flowsdk.Run[Any]) -> None:
    """Every action is terminal, with exactly one terminal event."""
    for record in run.actions:
        assert record.phase.terminal, f"{record.name} is {record.phase.value}"
        assert record.ended_at is not None, record.name
    terminal = Counter(
        e.action for e in run.events if e.kind is EventKind.ACTION and e.phase in TERMINAL
    )
    for record in run.actions:
        assert terminal[record.name] == 1, f"{record.name}: {terminal[record.name]} terminal events"
    assert run.phase.terminal


def phases(run: flowsdk.Run[Any]) -> dict[str, str]:
    """Map action name -> phase value."""
    return {a.name: a.phase.value for a in run.actions}


def causes(run: flowsdk.Run[Any]) -> dict[str, str | None]:
    """Map action name -> abort cause value (or None)."""
    return {a.name: a.abort.cause.value if a.abort else None for a in run.actions}


def by_task(run: flowsdk.Run[Any], suffix: str) -> list[flowsdk.ActionRecord]:
    """The records whose task name ends with `suffix`, in start order."""
    return [a for a in run.actions if a.task.endswith(suffix)]


def open_files(prefix: Path) -> list[str]:
    """The files this process holds open whose path starts with `prefix` (Linux)."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor that listed them is gone
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [path for path in paths if path.startswith(str(prefix))]


def as_schema_7(conn: sqlite3.Connection) -> None:
    """Rewrite a SQLite store's packed routine events as rows, as schema 7 kept them.

    For tests that turn a current store into an older one: the `routine_events`
    table goes (schema 8 created it).
    """
    rows = []
    for run, attempt in conn.execute("SELECT DISTINCT run, run_attempt FROM routine_events"):
        found = conn.execute(EVENTS_AFTER, {"run": run, "attempt": attempt, "cursor": -1})
        rows += [(run, attempt, *row) for row in with_routine(found, -1)]
    conn.execute("DELETE FROM events")
    conn.executemany(INSERT_EVENT, rows)
    conn.execute("DROP TABLE routine_events")


def pause(proc: Any, timeout: float = 30.0) -> None:
    """SIGSTOP `proc` (a `subprocess.Popen`) and wait until every thread of it has stopped.

    The signal is handled by one of its threads, which then stops the others: on a
    busy machine another thread (the store's writer) may run on for some milliseconds
    after `send_signal` returned, and take a request meant to find it paused.
    """
    import signal
    import time

    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    tasks = Path(f"/proc/{proc.pid}/task")
    while True:
        states = []
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):  # a thread that just ended
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        assert time.monotonic() < deadline, f"process {proc.pid} not stopped: {states}"
        time.sleep(0.005)
