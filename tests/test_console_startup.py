"""`flowsdk ui` as a command: how it starts, how it fails to, and what it logs.

Each test runs a real `python -m flowsdk ui` (the console script's entry point,
with the CLI's own log handler) and reads its first stdout line with a deadline:
a console that should not have started is stopped and the test fails at once.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.console_support import WAIT, Console, create_token
from tests.runners.harness import ROOT, sqlite_url

pytestmark = pytest.mark.timeout(120)


@dataclass
class Started:
    """What `flowsdk ui` did: its first stdout line, its exit code and its stderr."""

    first: str
    code: int
    stderr: str


def start(*args: str) -> Started:
    """Run `flowsdk ui ARGS`; stop it (SIGTERM) once it printed a first line, if it is alive."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowsdk", "ui", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(WAIT)
    first = proc.stdout.readline() if ready else ""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=WAIT)
    return Started(first, proc.returncode, stderr)


def test_a_port_in_use_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = start("--store", sqlite_url(tmp_path / "s.db"), "--port", str(port))
    assert (done.first, done.code) == ("", 2)
    assert done.stderr == (
        f"flowsdk: error: cannot listen on 127.0.0.1:{port}: the address is already in use; "
        "choose another --port\n"
    )


def test_an_unknown_host_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    store = sqlite_url(tmp_path / "s.db")
    create_token(store, "alice", "operator")  # so that any host may be served
    done = start("--store", store, "--host", "nosuchhost.invalid", "--port", "0")
    assert (done.first, done.code) == ("", 2)
    assert done.stderr.startswith(
        "flowsdk: error: cannot listen on nosuchhost.invalid:0: the host name cannot be resolved"
    )
    assert done.stderr.endswith("; choose another --host\n")
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("kind", ["text", "sqlite"])
def test_a_file_that_is_no_store_fails_before_serving_with_exit_5(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "notdb.db"
    if kind == "text":
        path.write_text("not a database at all\n")
    else:  # a SQLite database, but not a flowsdk store
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("CREATE TABLE t (x)")
    done = start("--store", str(path), "--port", "0")
    assert (done.first, done.code) == ("", 5)
    assert done.stderr.startswith("flowsdk: error: ")
    assert "not a flowsdk store" in done.stderr
    assert done.stderr.count("\n") == 1


def test_json_prints_the_address_as_one_json_object_first(tmp_path: Path) -> None:
    store = sqlite_url(tmp_path / "s.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowsdk", "ui", "--store", store, "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first.keys() == {"url", "store"}
        assert first["store"] == store
        assert first["url"].startswith("http://127.0.0.1:")
        with urllib.request.urlopen(first["url"] + "api/runs", timeout=WAIT) as answer:
            assert json.load(answer) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0
    assert "Traceback" not in stderr


def test_a_refused_request_is_logged_once_its_path_made_visible(tmp_path: Path) -> None:
    store = sqlite_url(tmp_path / "s.db")
    create_token(store, "alice", "viewer")
    console = Console(store, tmp_path / "console.log")
    try:
        assert console.call("GET", "/api/runs").status == 401
        # A path is decoded before it is logged: an escape sequence in it must not reach
        # the terminal of the person running the console.
        assert console.call("GET", "/api/runs/%1b%5b2J%07").status == 401
        # Each record is written before its answer is sent: all of them are in the file.
        logged = console.logged()
    finally:
        assert console.close() == 0
    assert logged.count("refused GET /api/runs: 401") == 1
    assert logged.count("refused GET /api/runs/\\x1b[2J\\x07: 401") == 1
    assert "\x1b" not in logged
    assert "\x07" not in logged
