"""Retention (SPEC §6): `flowsdk prune` deletes ended runs, never a live one.

A SQLite file gives the space back to the file system.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from flowsdk import PruneReport, RunPhase
from flowsdk.errors import PermissionDeniedError
from flowsdk.store import Store
from flowsdk.testing import Gate
from tests.test_cli import Runner, cli, start_runner, store_for
from tests.workflows import deep

__all__ = ["start_runner"]  # the fixture, used here by name

env = flowsdk.TaskEnvironment("prune")


@env.task
async def ok() -> int:
    return 1


@env.task
async def bad() -> int:
    raise ValueError("no")


GATES = [Gate("hold")]  # the gate `held` waits at (each test sets its own)


@env.task
async def held() -> int:
    await GATES[0].enter()
    return 2


def store_bytes(path: Path) -> int:
    """The store's bytes on disk: the file and its write-ahead log."""
    return sum(
        p.stat().st_size
        for p in path.parent.iterdir()
        if p.name.startswith(path.name) and p.is_file()  # not its runners' lock folder
    )


def ended_rows(path: Path) -> list[int]:
    """How many rows the store holds of runs other than `live` (whose runner writes on)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return [
            conn.execute(f"SELECT count(*) FROM {table} WHERE {column} != 'live'").fetchone()[0]
            for table, column in (
                ("runs", "name"),
                ("actions", "run"),
                ("events", "run"),
                ("routine_events", "run"),
            )
        ]


def test_prune_deletes_ended_runs_names_a_live_one_and_the_file_shrinks(
    tmp_path: Path, start_runner: Callable[[str, str], Runner]
) -> None:
    """Real CLI processes on a SQLite file: ended runs go, a live one is named, it shrinks.

    Three ended runs (one of two attempts) are deleted; the live one stays.
    """
    store = store_for(tmp_path)
    path = tmp_path / "store.db"
    for name in ("big-1", "big-2"):
        flowsdk.run(deep.chain, 1500, name=name, store=store)
    flowsdk.run(bad, name="failed", store=store)
    assert cli(store, "retry", "failed").code == 6  # a second attempt, failed again
    runner = start_runner(store, "live")
    runner.expect("STARTED a1")
    before = store_bytes(path)
    rows = ended_rows(path)

    dry = cli(store, "prune", "--older-than", "0", "--dry-run")
    assert dry.code == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].startswith("would delete 3 runs (4 attempts) from ")
    assert lines[0].endswith(": failed, big-2, big-1")
    assert (
        lines[1]
        == "would keep 1 live run that matched (a live run is never deleted): live (RUNNING)"
    )
    assert lines[2] == "nothing was deleted (--dry-run)"
    assert len(lines) == 3
    # Nothing deleted (the bytes may move: the live runner's heartbeat goes on).
    assert ended_rows(path) == rows
    planned = cli(store, "prune", "--older-than", "0", "--dry-run", "--json").json()
    assert planned["dry_run"] is True
    assert [r["name"] for r in planned["deleted"]] == ["failed", "big-2", "big-1"]
    assert (planned["attempts"], planned["freed_bytes"]) == (4, None)
    assert len(cli(store, "runs", "--json").json()) == 4

    result = cli(store, "prune", "--older-than", "0")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("deleted 3 runs (4 attempts) from ")
    assert lines[0].endswith(": failed, big-2, big-1")
    assert lines[1] == "kept 1 live run that matched (a live run is never deleted): live (RUNNING)"
    assert lines[2].startswith("gave ")
    assert lines[2].endswith(" back to the file system")
    assert store_bytes(path) < before // 2, (store_bytes(path), before)

    listed = cli(store, "runs", "--json").json()
    assert [r["name"] for r in listed] == ["live"]
    runner.release()
    runner.expect("RESULT SUCCEEDED")
    runner.finish()
    again = cli(store, "prune", "--keep", "0", "--json").json()
    assert again["dry_run"] is False
    assert [r["name"] for r in again["deleted"]] == ["live"]
    assert again["live"] == []
    assert cli(store, "runs", "--json").json() == []


def test_prune_needs_a_criterion_and_valid_numbers(tmp_path: Path) -> None:
    """No option, a negative count, or days that are not a number: usage errors (exit 2)."""
    store = store_for(tmp_path)
    flowsdk.run(ok, name="kept", store=store)
    bare = cli(store, "prune")
    assert bare.code == 2
    assert "say which runs to delete" in bare.stderr
    assert cli(store, "prune", "--keep", "-1").code == 2
    assert cli(store, "prune", "--older-than", "soon").code == 2
    assert cli(store, "prune", "--phase", "LOST").code == 2
    assert [r["name"] for r in cli(store, "runs", "--json").json()] == ["kept"]


def test_an_old_store_is_converted_to_incremental_vacuum_by_its_first_prune(
    tmp_path: Path,
) -> None:
    """A store made before incremental vacuum (auto_vacuum NONE) still shrinks.

    Its first prune converts it; later prunes give space back page by page.
    """
    path = tmp_path / "old.db"
    store = f"sqlite:///{path}"
    for name in ("a", "b", "c"):
        flowsdk.run(deep.chain, 1000, name=name, store=store)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA auto_vacuum = NONE")
        conn.execute("VACUUM")
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    with flowsdk.Client(store) as client:
        first = client.prune(keep=2)
        assert first.freed_bytes is not None
        assert first.freed_bytes > 0
        second = client.prune(keep=1)
        assert second.freed_bytes is not None
        assert second.freed_bytes > 0
        assert [r.name for r in client.runs()] == ["c"]
    assert [r.name for r in first.deleted + second.deleted] == ["a", "b"]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0


async def test_every_store_prunes_by_phase_keep_and_age_never_a_live_run(
    store: str | Store,
) -> None:
    """Client.prune on memory, SQLite and PostgreSQL: phase, keep and older_than select.

    A live run that matches is kept and listed as live.
    """
    for name, task in [("s1", ok), ("f1", bad), ("s2", ok), ("f2", bad), ("s3", ok)]:
        await flowsdk.run_async(task, name=name, store=store)
    gate = GATES[0] = Gate("hold")
    handle = await flowsdk.start(held, name="live", store=store)
    await gate.wait_running(1)
    client = flowsdk.Client(store)
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(1)  # store calls block: not on the loop

    def prune(**options: Any) -> PruneReport:
        """Prune, after a dry run with the same options that must plan the same."""
        plan = client.prune(dry_run=True, **options)
        assert plan.dry_run
        assert plan.freed_bytes is None
        report = client.prune(**options)
        assert not report.dry_run
        assert [r.name for r in plan.deleted] == [r.name for r in report.deleted]
        assert [r.name for r in plan.live] == [r.name for r in report.live]
        assert plan.attempts == report.attempts
        return report

    try:
        none_old = await loop.run_in_executor(pool, partial(prune, older_than=timedelta(days=1)))
        assert (none_old.deleted, none_old.live) == ([], [])
        failed = await loop.run_in_executor(pool, partial(prune, phase="FAILED", keep=1))
        assert [r.name for r in failed.deleted] == ["f1"]
        assert failed.attempts == 1
        older = await loop.run_in_executor(pool, partial(prune, keep=2))
        assert [r.name for r in older.deleted] == ["f2", "s2", "s1"]
        assert older.live == []
        matched = await loop.run_in_executor(pool, partial(prune, phase=RunPhase.RUNNING))
        assert matched.deleted == []
        assert [(r.name, r.phase) for r in matched.live] == [("live", RunPhase.RUNNING)]
        ended = await loop.run_in_executor(pool, partial(prune, older_than=timedelta(0)))
        assert [r.name for r in ended.deleted] == ["s3"]
        assert [r.name for r in ended.live] == ["live"]
        gate.release_all()
        assert (await handle.wait()).phase is RunPhase.SUCCEEDED
        assert [r.name for r in await loop.run_in_executor(pool, partial(client.runs))] == ["live"]
        with pytest.raises(ValueError, match="say which runs to delete"):
            client.prune()
        with pytest.raises(ValueError, match="say which runs to delete"):
            client.prune(dry_run=True)
    finally:
        gate.release_all()
        pool.shutdown()
        client.close()


def test_a_viewer_may_not_prune_but_may_see_what_a_prune_would_delete(tmp_path: Path) -> None:
    """Deleting runs needs the control permission (an operator); a dry run only reading."""
    store = store_for(tmp_path)
    flowsdk.run(ok, name="kept", store=store)
    viewer = flowsdk.Actor(name="token:v", role=flowsdk.Role.VIEWER)
    with flowsdk.Client(store, actor=viewer) as client:
        with pytest.raises(PermissionDeniedError):
            client.prune(keep=0)
        assert [r.name for r in client.prune(keep=0, dry_run=True).deleted] == ["kept"]
    with flowsdk.Client(store) as client:
        assert [r.name for r in client.runs()] == ["kept"]


def test_compacting_waits_while_another_connection_holds_the_log_then_says_it_could_not(
    tmp_path: Path,
) -> None:
    """A checkpoint SQLite answers busy (a reader's snapshot, another checkpoint): waited for."""
    from flowsdk.store._prune import file_size, give_back_space

    path = tmp_path / "store.db"
    flowsdk.run(deep.chain, 300, name="big", store=store_for(tmp_path))
    reader = sqlite3.connect(path, isolation_level=None)
    pruner = sqlite3.connect(path, isolation_level=None, timeout=0.05)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM runs").fetchone()  # a snapshot: holds the log
        pruner.execute("DELETE FROM actions")
        _, note = give_back_space(pruner, str(path), file_size(str(path)), wait=0.2)
        assert note is not None
        assert "could not be compacted now" in note
        reader.execute("COMMIT")
        freed, note = give_back_space(pruner, str(path), file_size(str(path)), wait=5)
        assert note is None
        assert freed > 0
    finally:
        reader.close()
        pruner.close()


@env.task
async def reporting(value: float) -> None:
    await flowsdk.report(value, step=1)
    logging.getLogger("prune.reporting").warning("reported %s", value)


async def test_a_pruned_run_takes_its_progress_and_logs_with_it(store: str | Store) -> None:
    """Every store: after a prune, a new run of the same name has only its own reports and logs.

    (Left behind, the old rows would be shown as the new run's, and the SQL stores
    would ignore the new run's rows that have the same keys.)
    """
    client = flowsdk.Client(store)
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(1)  # store calls block: not on the loop
    try:
        await flowsdk.run_async(partial(reporting, 1.0), name="again", store=store)
        pruned = await loop.run_in_executor(pool, partial(client.prune, keep=0))
        assert [r.name for r in pruned.deleted] == ["again"]
        await flowsdk.run_async(partial(reporting, 2.0), name="again", store=store)
        progress = await loop.run_in_executor(pool, partial(client.progress, "again"))
        assert [(p.action, p.value) for p in progress] == [("a0", 2.0)]
        logs = await loop.run_in_executor(pool, partial(client.logs, "again"))
        assert [entry.message for entry in logs] == ["reported 2.0"]
    finally:
        pool.shutdown()
        client.close()
