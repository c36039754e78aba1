"""The command line on a PostgreSQL store whose URL holds a password (SPEC §9).

A password is never printed: every output that names the store shows its URL
as the store's own messages do, `postgresql://user:***@host/db` or
`...?password=***`. And `flowsdk run` says `run NAME` only once the run is
recorded, so a role that may only read prints its error alone.

Every call is a real `python -m flowsdk` process on a new database of the
session's PostgreSQL server, which trusts local logins: any password is
accepted, so each URL carries one that must not show.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

import flowsdk
from tests.workflows import deep

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0
SECRET = "s3cret-Pw-7731"


@dataclass(frozen=True)
class Secret:
    """A store URL with the password in it, and the URL as messages must show it."""

    url: str
    masked: str


def with_password(url: str, where: str, *, user: str | None = None) -> Secret:
    """`url` (a test database) as `user`, with SECRET in its user part or in its query."""
    parts = urlsplit(url)
    name = user or parts.username or "postgres"
    host = parts.netloc.rpartition("@")[2]
    if where == "userinfo":
        shown = urlunsplit((parts.scheme, f"{name}:***@{host}", parts.path, parts.query, ""))
        return Secret(shown.replace(":***@", f":{SECRET}@"), shown)
    query = f"{parts.query}&password=***" if parts.query else "password=***"
    shown = urlunsplit((parts.scheme, f"{name}@{host}", parts.path, query, ""))
    return Secret(shown.replace("password=***", f"password={SECRET}"), shown)


@pytest.fixture(params=["userinfo", "query"])
def secret(request: pytest.FixtureRequest, pg_url: str) -> Secret:
    """A new, empty database, its URL holding the password in the user part, then the query."""
    return with_password(pg_url, request.param)


def flowsdk_cli(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m flowsdk ARGS --store STORE`; the password shows in neither stream."""
    done = subprocess.run(
        [sys.executable, "-m", "flowsdk", *args, "--store", store],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "FLOWSDK_STORE": "memory://", "NO_COLOR": "1"},
        timeout=TIMEOUT,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert SECRET not in done.stdout + done.stderr, (done.stdout, done.stderr)
    return done


def test_runs_on_a_database_without_runs_names_it_without_the_password(secret: Secret) -> None:
    listed = flowsdk_cli(secret.url, "runs")
    assert (listed.returncode, listed.stdout) == (0, f"no runs in {secret.masked}\n")


def test_prune_names_the_store_without_the_password(secret: Secret) -> None:
    """`prune --keep 0` deletes the one run, then finds nothing; `runs` finds the schema empty."""
    flowsdk.run(deep.chain, 1, name="old", store=secret.url)
    pruned = flowsdk_cli(secret.url, "prune", "--keep", "0")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout == f"deleted 1 run (1 attempt) from {secret.masked}: old\n"
    again = flowsdk_cli(secret.url, "prune", "--keep", "0")
    assert (again.returncode, again.stdout) == (0, f"nothing to delete in {secret.masked}\n")
    listed = flowsdk_cli(secret.url, "runs")
    assert (listed.returncode, listed.stdout) == (0, f"no runs in {secret.masked}\n")


def test_run_with_a_name_in_use_names_the_store_without_the_password(secret: Secret) -> None:
    flowsdk.run(deep.chain, 1, name="taken", store=secret.url)
    refused = flowsdk_cli(secret.url, "run", "tests.workflows.deep:chain", "1", "--name", "taken")
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (
        f"flowsdk: error: a run named 'taken' already exists in {secret.masked}; "
        "choose another name\n"
    )


def test_ui_json_announces_the_store_without_the_password(secret: Secret) -> None:
    """The `--json` announce, which scripts log, has the masked URL; SIGTERM ends it (exit 0)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowsdk", "ui", "--store", secret.url, "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "FLOWSDK_STORE": "memory://"},
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(TIMEOUT)
        first = proc.stdout.readline() if ready else ""
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rest, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr
    announced = json.loads(first)
    assert announced["store"] == secret.masked
    assert announced["url"].startswith("http://127.0.0.1:")
    assert SECRET not in first + rest + stderr


@pytest.fixture
def viewer(pg_url: str) -> Iterator[Secret]:
    """A role that may read the store's tables and write nothing, its URL with a password."""
    flowsdk.run(deep.chain, 1, name="seen", store=pg_url)  # the schema, and a run to read
    role = f"viewer_{pg_url.rsplit('_', 1)[-1]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA flowsdk TO {role}")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA flowsdk TO {role}")
    try:
        yield with_password(pg_url, "userinfo", user=role)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_run_that_cannot_be_recorded_announces_no_run(viewer: Secret) -> None:
    """The role reads (the name is free) but cannot record: exit 4, and no `run NAME` line."""
    refused = flowsdk_cli(viewer.url, "run", "tests.workflows.deep:chain", "1", "--name", "ghost")
    assert refused.returncode == 4, (refused.stdout, refused.stderr)
    assert refused.stdout == ""
    assert refused.stderr.startswith("flowsdk: error: ")
    assert "lacks a privilege" in refused.stderr
    with flowsdk.Client(viewer.url) as client:
        assert [r.name for r in client.runs()] == ["seen"]
