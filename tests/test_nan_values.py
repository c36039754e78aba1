"""NaN and infinite numbers: every store keeps them, and the human views print them.

A loss that turns NaN is what an HPO user most needs to see: SQLite stores a
NaN as NULL, so its progress table takes NULL for a NaN report (schema 9).
JSON cannot hold such numbers (`--json` shows `null`); `show` prints `nan`,
`inf` and `-inf`, as Python does.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import flowsdk
from flowsdk.store import Store
from flowsdk.store._sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from flowsdk.store._trace_sql import table_statements
from tests.test_cli import cli, store_for

env = flowsdk.TaskEnvironment("nan")
REPORTED = [0.5, math.nan, math.inf, -math.inf, 0.25]
# The migration that lets SQLite's progress table keep a NaN (found by what it does,
# so renumbering it on a merge does not break these tests).
NAN_MIGRATION = next(n for n, m in MIGRATIONS.items() if any("progress_nan" in s for s in m))


@env.task
async def last_is_nan() -> None:
    await flowsdk.report(1.0, step=0)
    await flowsdk.report(math.nan, step=1)


@env.task
async def reports() -> float:
    for step, value in enumerate(REPORTED):
        await flowsdk.report(value, step=step)
    await last_is_nan()
    return math.nan


@env.task
async def history() -> dict[str, Any]:
    return {"best": math.inf, "note": "nan", "losses": [0.5] * 20 + [math.nan, -math.inf]}


@env.task
async def diverges() -> float:
    await flowsdk.report(0.5, step=0, name="loss")
    await flowsdk.report(math.nan, step=1, name="loss")
    await history()
    return math.nan


def shown(values: list[float]) -> list[str]:
    """The values as Python prints them: NaN compares unequal to itself, its repr does not."""
    return [repr(v) for v in values]


def test_every_store_keeps_nan_and_infinite_reports(store: str | Store) -> None:
    """Memory, SQLite and PostgreSQL read back 0.5, nan, inf, -inf, 0.25 in order.

    An action whose latest report is NaN has NaN as its latest; the output NaN is kept.
    """
    run = flowsdk.run(reports, name="r", store=store)
    assert math.isnan(run.result())
    with flowsdk.Client(store) as client:
        root = client.progress("r", action="a0")
        latest = client.latest_progress("r")
        assert math.isnan(client.get_run("r").result())
    assert shown([p.value for p in root]) == shown(REPORTED)
    assert [p.step for p in root] == [0, 1, 2, 3, 4]
    assert shown([latest["a0"].value, latest["a1"].value]) == ["0.25", "nan"]


def test_a_sqlite_store_of_the_previous_schema_keeps_its_reports_and_then_keeps_nan(
    tmp_path: Path,
) -> None:
    """A store whose progress value was `REAL NOT NULL` is migrated in place, its rows kept."""
    url = store_for(tmp_path)
    flowsdk.run(reports, name="old", store=url)
    with flowsdk.Client(url) as client:
        before = client.progress("old")
    with contextlib.closing(sqlite3.connect(tmp_path / "store.db")) as conn:
        # What the previous schema kept: the table as schema 4 made it, which
        # dropped a NaN report (SQLite stores NaN as NULL, refused by NOT NULL).
        conn.execute("DELETE FROM progress WHERE value IS NULL")
        conn.execute("ALTER TABLE progress RENAME TO progress_current")
        conn.execute(table_statements("", "REAL")[0])
        conn.execute("INSERT INTO progress SELECT * FROM progress_current")
        conn.execute("DROP TABLE progress_current")
        conn.execute(f"PRAGMA user_version = {NAN_MIGRATION - 1}")
        conn.commit()
    kept = [p for p in before if not math.isnan(p.value)]
    assert len(kept) == len(before) - 2  # the two NaN reports: the root's and its child's
    with flowsdk.Client(url) as client:
        assert client.progress("old") == kept  # read (and migrated) by the client
    flowsdk.run(reports, name="new", store=url)
    with flowsdk.Client(url) as client:
        assert client.progress("old") == kept
        assert shown([p.value for p in client.progress("new", action="a0")]) == shown(REPORTED)
    with contextlib.closing(sqlite3.connect(tmp_path / "store.db")) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        (table,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'progress'").fetchone()
    assert version == SCHEMA_VERSION
    assert "value REAL," in table
    assert "value REAL NOT NULL" not in table


def test_show_prints_nan_and_infinities_as_python_does_and_json_has_null(tmp_path: Path) -> None:
    """`show RUN`, `show RUN ACTION`: `nan`, `inf`, `-inf`; a string "nan" stays quoted."""
    url = store_for(tmp_path)
    flowsdk.run(diverges, name="d", store=url)

    tree = cli(url, "show", "d")
    assert tree.code == 0, tree.stderr
    (root,) = [line for line in tree.stdout.splitlines() if line.startswith("a0 ")]
    assert "() -> nan  [loss nan @1]" in root

    detail = cli(url, "show", "d", "a0")
    assert detail.code == 0, detail.stderr
    lines = detail.stdout.splitlines()
    assert "output: nan" in lines
    assert any(line.startswith("    step      1  nan ") for line in lines), lines

    child = cli(url, "show", "d", "a1")
    assert child.code == 0, child.stderr
    # A long value: below its label, indented, one item a line.
    assert '\n    "best": inf,\n    "note": "nan",\n' in child.stdout
    assert "\n      0.5,\n      nan,\n      -inf\n    ]\n" in child.stdout
    assert "null" not in child.stdout

    def strict(constant: str) -> None:
        raise AssertionError(f"--json printed {constant}, which is not JSON")

    as_json = cli(url, "show", "d", "a0", "--json")
    assert as_json.code == 0, as_json.stderr
    data = json.loads(as_json.stdout, parse_constant=strict)
    assert data["output"] is None
    assert [p["value"] for p in data["progress"]] == [0.5, None]
