"""Deep and wide action trees (SPEC §6): small stores, whole keys, a bounded `show`.

A call key is its parent's key and an ordinal (`a0/1/1/...`); a store keeps only
each key's last segment, and every reader gives the whole key back.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import flowsdk
from flowsdk import RunPhase
from flowsdk.cli import main as cli_main
from flowsdk.store import SQLiteStore, Store, open_store
from flowsdk.store._postgres_schema import MIGRATIONS as POSTGRES_MIGRATIONS
from flowsdk.store._sqlite_schema import MIGRATIONS as SQLITE_MIGRATIONS
from tests.support import as_schema_7
from tests.test_cli import cli
from tests.test_store_postgres import admin, as_schema_5
from tests.workflows import deep

DEPTH = 10_000
# The migrations that keep only each key's last segment (found by what they do, so
# renumbering them on a merge does not break these tests).
KEY_MIGRATION_SQLITE = next(n for n, m in SQLITE_MIGRATIONS.items() if "key_segments" in m[0])
KEY_MIGRATION_POSTGRES = next(
    n for n, m in POSTGRES_MIGRATIONS.items() if "SET key = substr" in m[0]
)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def store_size(path: Path) -> int:
    """The store's bytes on disk: the file and its write-ahead log."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def test_a_10000_deep_chain_runs_stores_small_and_shows_a_bounded_tree(tmp_path: Path) -> None:
    """A chain of task calls 10,000 deep: runs, stores under 10 MB, `show` folds it.

    The deepest action's whole key is `a0/1/1/...` (10,000 segments).
    """
    path = tmp_path / "deep.db"
    run = flowsdk.run(deep.chain, DEPTH, name="deep", store=sqlite_url(path))
    assert run.phase is RunPhase.SUCCEEDED
    assert run.result() == DEPTH
    assert store_size(path) < 10_000_000, store_size(path)

    shown = cli(sqlite_url(path), "show", "deep")
    assert shown.code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) < 60, len(lines)
    assert len(shown.stdout) < 10_000, len(shown.stdout)
    assert "a0 " in shown.stdout  # the first level
    assert f"a{DEPTH} " in shown.stdout  # the last one
    folded = [line for line in lines if "folded" in line]
    assert len(folded) == 1, folded
    assert f"{DEPTH - 30 + 1:,} actions of levels 20 to {DEPTH - 10} folded" in folded[0]
    assert "flowsdk show RUN ACTION" in folded[0]

    deepest = cli(sqlite_url(path), "show", "deep", f"a{DEPTH}")
    assert deepest.code == 0, deepest.stderr
    assert f"key       a0{'/1' * DEPTH}\n" in deepest.stdout
    with flowsdk.Client(sqlite_url(path)) as client:
        keys = {a.name: a.key for a in client.get_run("deep").actions}
    assert keys["a0"] == "a0"
    assert keys["a3"] == "a0/1/1/1"
    assert keys[f"a{DEPTH}"] == "a0" + "/1" * DEPTH
    with contextlib.closing(sqlite3.connect(path)) as conn:
        stored = conn.execute("SELECT max(length(key)), sum(length(key)) FROM actions").fetchone()
    assert stored[0] <= 2, stored
    assert stored[1] <= 2 * (DEPTH + 1), stored


def test_a_wide_fan_out_is_folded_in_show_and_complete_in_json(tmp_path: Path) -> None:
    """500 children of one parent: `show` folds the middle ones; `--json` lists them all."""
    path = tmp_path / "wide.db"
    flowsdk.run(deep.fan, 500, name="wide", store=sqlite_url(path))
    shown = cli(sqlite_url(path), "show", "wide")
    assert shown.code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) < 70, len(lines)
    folded = [line for line in lines if "folded" in line]
    assert len(folded) == 1, folded
    assert "450 more children folded (a41 … a490: 450 SUCCEEDED)" in folded[0], folded
    assert " a500 " in shown.stdout
    full = cli(sqlite_url(path), "show", "wide", "--json")
    actions = json.loads(full.stdout)["actions"]
    assert len(actions) == 501
    assert {a["key"] for a in actions} == {"a0"} | {f"a0/{i}" for i in range(1, 501)}


def test_a_fold_never_hides_a_failed_child_while_there_is_room_and_counts_phases(
    tmp_path: Path,
) -> None:
    """Children that did not succeed are drawn in a folded fan-out (20 of them at most)."""
    url = sqlite_url(tmp_path / "picky.db")
    flowsdk.run(deep.fan_failing, 500, name="few", store=url)
    flowsdk.run(deep.fan_failing, 3000, name="many", store=url)
    few = cli(url, "show", "few")
    assert few.code == 0, few.stderr
    failed = [line.split()[0] for line in few.stdout.splitlines() if " FAILED " in line]
    assert failed == ["a38", "a138", "a238", "a338", "a438"]  # child i is a{i+1}
    folded = [line.strip() for line in few.stdout.splitlines() if "folded" in line]
    assert [line.split(";")[0] for line in folded] == [
        "… 97 more children folded (a41 … a137: 97 SUCCEEDED)",
        "… 99 more children folded (a139 … a237: 99 SUCCEEDED)",
        "… 99 more children folded (a239 … a337: 99 SUCCEEDED)",
        "… 99 more children folded (a339 … a437: 99 SUCCEEDED)",
        "… 52 more children folded (a439 … a490: 52 SUCCEEDED)",
    ]
    assert "error ValueError: child 437 fails" in few.stdout

    many = cli(url, "show", "many")
    assert many.code == 0, many.stderr
    lines = many.stdout.splitlines()
    drawn = [line.split()[0] for line in lines if " FAILED " in line]
    # The one among the first 40, the first 20 of the folded range: the rest are counted.
    assert drawn == [f"a{38 + 100 * k}" for k in range(21)]
    last_fold = [line.strip() for line in lines if "folded" in line][-1]
    assert last_fold.startswith(
        "… 952 more children folded (a2039 … a2990: 943 SUCCEEDED, 9 FAILED)"
    )
    assert lines.index(next(line for line in lines if "a2039 … a2990" in line)) == len(lines) - 11
    assert len(lines) < 150, len(lines)


def test_a_fold_draws_a_child_whose_subtree_holds_a_failure_and_counts_those_below(
    tmp_path: Path,
) -> None:
    """A succeeded child that caught its own child's failure is drawn, failure and all."""
    url = sqlite_url(tmp_path / "guarded.db")
    flowsdk.run(deep.fan_guarded, 500, name="guarded", store=url)
    shown = cli(url, "show", "guarded")
    assert shown.code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    failed = [line for line in lines if " FAILED " in line]
    assert len(failed) == 5  # each under the child that caught it
    drawn = {line.split()[0] for line in lines if "deep.guarded" in line}
    assert {"a38", "a138", "a238", "a338", "a438"} <= drawn
    assert len(drawn) == 40 + 4 + 10  # the first, those with a failure below, the last
    folded = [line.strip().split(";")[0] for line in lines if "folded" in line]
    assert folded[0] == (
        "… 97 more children folded (a41 … a137: 97 SUCCEEDED) and 97 actions below them"
    )


def test_show_draws_a_big_tree_and_one_action_without_reading_the_whole_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`show RUN` reads the outline and the drawn actions; `show RUN ACTION` that one."""
    url = sqlite_url(tmp_path / "few.db")
    flowsdk.run(deep.fan_failing, 500, name="few", store=url)
    assert cli_main(["show", "few", "--store", url]) == 0
    whole = capsys.readouterr().out

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole run was read")

    monkeypatch.setattr(SQLiteStore, "load_run", refused)
    assert cli_main(["show", "few", "--store", url]) == 0
    outlined = capsys.readouterr().out
    assert cli_main(["show", "few", "a438", "--store", url]) == 0
    one = capsys.readouterr().out
    assert cli_main(["logs", "few", "a438", "--store", url]) == 0

    def durations(text: str) -> str:
        return re.sub(r"\d+(\.\d+)?(ms|s)\b", "T", text)

    assert durations(outlined) == durations(whole)  # what `show` printed from the whole run
    assert "… 97 more children folded (a41 … a137: 97 SUCCEEDED)" in outlined
    assert "error: ValueError" in one
    assert "child 437 fails" in one


def test_every_store_gives_whole_keys_back_from_a_full_read_and_a_keyed_one(
    store: str | Store,
) -> None:
    """`get_run` and `load_actions` (what a follower reads) both rebuild whole keys.

    Also under a later attempt of a retried action (`@2`).
    """
    env = flowsdk.TaskEnvironment("keys")
    tries: list[int] = []

    @env.task(retries=1, backoff=0)
    async def flaky() -> int:
        tries.append(1)
        await deep.leaf(len(tries))
        if len(tries) == 1:
            raise ValueError("first try fails")
        return await deep.chain(3)

    @env.task
    async def root() -> int:
        return await deep.chain(2) + await flaky()

    flowsdk.run(root, name="keys", store=store)
    reader: Any = open_store(store) if isinstance(store, str) else store
    try:
        whole = {a.name: a.key for a in reader.load_run("keys").actions}
        keyed = {a.name: a.key for a in reader.load_actions("keys", 1, list(whole)[-2:])}
    finally:
        if isinstance(store, str):
            reader.close()
    assert sorted(whole.values()) == sorted(
        [
            "a0",
            "a0/1",
            "a0/1/1",
            "a0/1/1/1",
            "a0/2",
            "a0/2/1",
            "a0/2@2/1",
            "a0/2@2/2",
            "a0/2@2/2/1",
            "a0/2@2/2/1/1",
            "a0/2@2/2/1/1/1",
        ]
    )
    assert keyed == {name: whole[name] for name in keyed}
    assert len(keyed) == 2


def test_a_sqlite_store_from_before_the_key_migration_keeps_its_keys(tmp_path: Path) -> None:
    """Before the key migration whole keys were stored; after it, the last segments."""
    path = tmp_path / "old.db"
    flowsdk.run(deep.chain, 5, name="old", store=sqlite_url(path))
    with flowsdk.Client(sqlite_url(path)) as client:
        before = [(a.name, a.key) for a in client.get_run("old").actions]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        as_schema_7(conn)  # then, what schema 3 kept: the whole key in each row
        for name, key in before:
            conn.execute("UPDATE actions SET key = ? WHERE name = ?", (key, name))
        conn.execute(f"PRAGMA user_version = {KEY_MIGRATION_SQLITE - 1}")
        conn.commit()
    with flowsdk.Client(sqlite_url(path)) as client:
        after = [(a.name, a.key) for a in client.get_run("old").actions]
    assert after == before
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = dict(conn.execute("SELECT name, key FROM actions").fetchall())
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    assert version >= KEY_MIGRATION_SQLITE
    assert rows == {"a0": "a0", **{f"a{i}": "/1" for i in range(1, 6)}}


def test_a_postgres_store_from_before_the_key_migration_keeps_its_keys(pg_url: str) -> None:
    """Before the key migration whole keys were stored; after it, the last segments."""
    flowsdk.run(deep.chain, 5, name="old", store=pg_url)
    with flowsdk.Client(pg_url) as client:
        before = [(a.name, a.key) for a in client.get_run("old").actions]
    with admin(pg_url) as conn:
        as_schema_5(conn)  # then, what schema 4 kept: the whole key in each row
        for name, key in before:
            conn.execute("UPDATE flowsdk.actions SET key = %s WHERE name = %s", (key, name))
        conn.execute(
            "UPDATE flowsdk.schema_version SET version = %s", (KEY_MIGRATION_POSTGRES - 1,)
        )
    with flowsdk.Client(pg_url) as client:
        after = [(a.name, a.key) for a in client.get_run("old").actions]
    assert after == before
    with admin(pg_url) as conn:
        rows = {str(n): str(k) for n, k in conn.execute("SELECT name, key FROM flowsdk.actions")}
        version = conn.execute("SELECT version FROM flowsdk.schema_version").fetchone()
    assert version is not None
    assert int(str(version[0])) >= KEY_MIGRATION_POSTGRES
    assert rows == {"a0": "a0", **{f"a{i}": "/1" for i in range(1, 6)}}


FOLD_LINE = re.compile(
    r"… ([\d,]+) more children folded \((\S+) … (\S+): ([^)]*)\)"
    r"(?: and ([\d,]+) actions? below them(?: \(([\d,]+) of them not SUCCEEDED\))?)?;"
)


def _number(text: str | None) -> int:
    return int((text or "0").replace(",", ""))


@pytest.mark.parametrize("seed", range(6))
def test_every_fold_line_counts_exactly_the_children_it_stands_for(seed: int) -> None:
    """On random trees, each fold line's numbers are those of the children it folds.

    Checked against a plain recount from the outline (children by parent, each
    subtree walked), not the fold's own bookkeeping: how many children, their
    phases, the actions below them and how many of those did not succeed. A
    child whose subtree holds a failure is folded only once 20 such are drawn.
    """
    import random

    from flowsdk._records import ActionOutline
    from flowsdk.cli._fold import folded_tree

    rng = random.Random(seed)
    nodes = [ActionOutline("a0", None, "RUNNING")]
    for i in range(1, 3_000):
        parent = 0 if rng.random() < 0.6 else rng.randrange(i)
        phase = rng.choice(["FAILED", "ABORTED"]) if rng.random() < 0.02 else "SUCCEEDED"
        nodes.append(ActionOutline(f"a{i}", f"a{parent}", phase))
    children: dict[str | None, list[ActionOutline]] = {}
    for node in nodes:
        children.setdefault(node.parent, []).append(node)

    def below(name: str) -> list[ActionOutline]:
        found, stack = [], list(children.get(name, []))
        while stack:
            node = stack.pop()
            found.append(node)
            stack += children.get(node.name, [])
        return found

    def troubled(node: ActionOutline) -> bool:
        return any(n.phase != "SUCCEEDED" for n in [node, *below(node.name)])

    entries = folded_tree(nodes)
    drawn = {item.name for _, item in entries if not isinstance(item, str)}
    lines = [item for _, item in entries if isinstance(item, str) and "children folded" in item]
    assert lines, "a fan-out of this size is folded"
    for line in lines:
        match = FOLD_LINE.search(line)
        assert match is not None, line
        count, first, last, phases, under, bad = match.groups()
        names = [n.name for n in nodes]
        kids = children[nodes[names.index(first)].parent]
        span = kids[[k.name for k in kids].index(first) : [k.name for k in kids].index(last) + 1]
        folded = [k for k in span if k.name not in drawn]
        assert _number(count) == len(folded)
        tally = {p: sum(k.phase == p for k in folded) for p in {k.phase for k in folded}}
        parts = (part.split(" ") for part in phases.split(", "))
        assert {p: _number(n) for n, p in parts} == tally
        inside = [d for k in folded for d in below(k.name)]
        assert _number(under) == len(inside)
        assert _number(bad) == sum(d.phase != "SUCCEEDED" for d in inside)
        if any(troubled(k) for k in folded):
            assert sum(k.name in drawn for k in kids[40:-10]) >= 20, line
