"""Store locations as users give them (`store=`, `--store`, `$FLOWSDK_STORE`).

A location that cannot be a store is refused in one line that names what was
wrong and what to write: a malformed URL before anything is opened
(`ValueError`, exit 2 on the CLI), a path that is not a regular file or
cannot be created with `StoreError` (exit 5), leaving what is there as it was.
PostgreSQL URLs are checked by libpq's own parser, without a server.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import flowsdk
from flowsdk.errors import StoreCorruptedError, StoreError
from flowsdk.store import SQLiteStore, open_store

env = flowsdk.TaskEnvironment("store_location_tests")
ran: list[str] = []

ON_LINUX = pytest.mark.skipif(
    not os.path.exists("/proc/self/mountinfo"), reason="a Linux /proc is needed"
)


@env.task
async def noop() -> str:
    ran.append("noop")
    return "done"


@pytest.fixture(autouse=True)
def _forget_runs() -> None:
    ran.clear()


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


def cli(cwd: Path, *args: str, store_env: str | None = None) -> Result:
    """Run `python -m flowsdk ARGS` in `cwd`; an expected error never shows a traceback."""
    environ = dict(os.environ)
    environ.pop("FLOWSDK_STORE", None)
    if store_env is not None:
        environ["FLOWSDK_STORE"] = store_env
    done = subprocess.run(
        [sys.executable, "-m", "flowsdk", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environ,
        timeout=30,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Result(done.returncode, done.stdout, done.stderr)


def refused_by_reader_and_runner(store: str, match: str) -> StoreError:
    """Both a read and a run refuse `store` with a `StoreError` matching `match`; nothing ran."""
    with flowsdk.Client(store) as client, pytest.raises(StoreError, match=match):
        client.runs()
    with pytest.raises(StoreError, match=match) as caught:
        flowsdk.run(noop, name="first", store=store)
    assert ran == []
    return caught.value


# -- paths that are not regular files ---------------------------------------------------------


def test_a_device_or_a_named_pipe_is_refused_as_not_a_regular_file(tmp_path: Path) -> None:
    """/dev/null and a FIFO are not "empty files" to remove: a store needs a file path."""
    pipe = tmp_path / "pipe.db"
    os.mkfifo(pipe)
    for store, kind in (("/dev/null", "character device"), (str(pipe), "named pipe")):
        error = refused_by_reader_and_runner(store, f"not a regular file \\(a {kind}")
        assert not isinstance(error, StoreCorruptedError)
        assert "Remove it" not in str(error)
        assert "a store needs a file path" in str(error)
    assert stat.S_ISFIFO(pipe.stat().st_mode)


@ON_LINUX
def test_a_file_of_proc_is_refused_as_not_a_regular_file() -> None:
    """/proc/self/status says it is 0 bytes: it is still not an empty store to delete."""
    error = refused_by_reader_and_runner("/proc/self/status", "not a regular file.*on proc")
    assert "Remove it" not in str(error)


def test_a_directory_is_refused_with_a_file_to_name_inside_it(tmp_path: Path) -> None:
    """A folder given as the store: say so, and suggest a file in it."""
    refused_by_reader_and_runner(str(tmp_path), "is a directory, not a file; name a file")


# -- paths that cannot be created -------------------------------------------------------------


def test_a_store_under_a_file_names_that_file_and_reading_it_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`notdb.db/x.db` where notdb.db is a file: the path as given, and the file in the way."""
    monkeypatch.chdir(tmp_path)
    Path("notdb.db").write_bytes(b"")
    for store in ("notdb.db/x.db", "notdb.db/sub/x.db"):
        with flowsdk.Client(store) as client:
            assert client.runs() == []
        with pytest.raises(StoreError) as caught:
            flowsdk.run(noop, name="first", store=store)
        assert str(caught.value) == (
            f"cannot create the store {store}: notdb.db is a file, not a directory"
        )
    assert ran == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notdb.db"]


@ON_LINUX
def test_a_store_in_proc_names_the_directory_never_a_private_file() -> None:
    """/proc accepts no new files: the message names /proc and why, not a `.new` file."""
    with pytest.raises(StoreError) as caught:
        flowsdk.run(noop, name="first", store="/proc/x.db")
    message = str(caught.value)
    assert message.startswith("cannot create the store /proc/x.db: its directory /proc ")
    assert "does not accept new files" in message
    assert ".new" not in message
    assert "Errno" not in message


def test_a_dangling_symbolic_link_is_refused_and_its_target_never_created(
    tmp_path: Path,
) -> None:
    """SQLite would create the link's target, empty, outside the whole-file creation."""
    link = tmp_path / "s.db"
    link.symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(StoreError, match=r"symbolic link to .*elsewhere\.db, which does not exist"):
        flowsdk.run(noop, name="first", store=str(link))
    assert not (tmp_path / "elsewhere.db").exists()


# -- SQLite URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("sqlite:///x.db?busy_timout=1", r"unknown parameter 'busy_timout'.*busy_timeout=SECONDS"),
        ("sqlite:///x.db?foo=1", r"unknown parameter 'foo'.*busy_timeout=SECONDS"),
        ("x.db?foo", r"unknown parameter 'foo'"),
        ("sqlite:///x.db?busy_timeout=", r"busy_timeout .* must be a number of seconds"),
        ("sqlite:///x.db?busy_timeout=nan", r"must be a number of seconds from 0"),
        ("sqlite:///x.db?busy_timeout=inf", r"must be a number of seconds from 0"),
        ("sqlite:///x.db?busy_timeout=-1", r"must be a number of seconds from 0"),
        ("sqlite:///x.db?busy_timeout=1&busy_timeout=2", r"busy_timeout is given 2 times"),
        ("sqlite:/abs.db", r"not a SQLite store URL.*sqlite:////absolute/path.db"),
        ("sqlite:///x.db#part", r"has a '#'"),
        ("memory://somewhere", r"memory:// and nothing more"),
    ],
)
def test_a_loose_store_url_is_refused_naming_what_is_wrong(url: str, match: str) -> None:
    """A typo in a store URL is an error before any file is touched, never ignored."""
    with pytest.raises(ValueError, match=match):
        open_store(url)


def test_a_sqlite_url_keeps_its_file_and_busy_timeout_and_names_no_fragment() -> None:
    """The forms the README shows parse as before; a '#' no longer cuts the file name."""
    store = open_store("sqlite:////abs/dir/s.db?busy_timeout=0.5")
    assert isinstance(store, SQLiteStore)
    assert (store.path, store.busy_timeout) == ("/abs/dir/s.db", 0.5)
    relative = open_store("runs/s.db")
    assert isinstance(relative, SQLiteStore)
    assert (relative.path, relative.busy_timeout) == ("runs/s.db", 5.0)
    escaped = open_store("sqlite:///run%231.db")
    assert isinstance(escaped, SQLiteStore)
    assert escaped.path == "run#1.db"
    with pytest.raises(ValueError, match="write a '#' of a file name as %23"):
        open_store("run#1.db")


# -- empty locations ---------------------------------------------------------------------------


def test_an_empty_store_location_is_refused_not_read_as_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`store=""` (an unset shell variable, say) is not "the default store"."""
    for empty in ("", "  "):
        with pytest.raises(ValueError, match=r"the store location .* is empty"):
            open_store(empty)
        with pytest.raises(ValueError, match="is empty"):
            flowsdk.Client(empty)
        with pytest.raises(ValueError, match="is empty"):
            flowsdk.run(noop, name="first", store=empty)
    monkeypatch.setenv("FLOWSDK_STORE", "")
    with pytest.raises(ValueError, match="FLOWSDK_STORE is set but empty"):
        open_store(None)
    assert ran == []


def test_on_the_cli_an_empty_or_loose_store_is_exit_2_and_creates_nothing(
    tmp_path: Path,
) -> None:
    """Exit 2 (a bad argument), one error line, no default store made or read."""
    for args, store_env in (
        (["runs", "--store", ""], None),
        (["runs"], ""),
        (["--store", "", "runs"], "memory://"),
        (["runs", "--store", "sqlite:///x.db?busy_timout=1"], None),
        (["runs", "--store", "postgresql://db.example/flows?foo=1"], None),
    ):
        result = cli(tmp_path, *args, store_env=store_env)
        assert result.code == 2, (args, result)
        assert result.stdout == ""
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1
    assert list(tmp_path.iterdir()) == []


def test_on_the_cli_a_device_is_exit_5_saying_it_is_not_a_regular_file(tmp_path: Path) -> None:
    result = cli(tmp_path, "runs", "--store", "/dev/null")
    assert result.code == 5
    assert "not a regular file" in result.stderr
    assert "Remove it" not in result.stderr


# -- PostgreSQL URLs (parsed by libpq, no server) ----------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("postgresql:flows", r"not a PostgreSQL store URL.*postgresql://user@host/dbname"),
        ("postgresql:/flows", r"not a PostgreSQL store URL"),
        ("postgresql://db.example/flows?foo=1", r"invalid URI query parameter: \"foo\""),
        ("postgresql://db.example/flows?sslmode", r"malformed PostgreSQL store URL"),
        ("postgresql://db.example/%zz", r"invalid percent-encoded token"),
        ("postgresql://db.example:port/flows", r"the port 'port' .* not a number from 1"),
        ("postgresql://[::1/flows", r"malformed PostgreSQL store URL"),
    ],
)
def test_a_malformed_postgresql_url_is_refused_before_connecting(url: str, match: str) -> None:
    """The URL is judged by libpq's own parser: a bad one is a `ValueError` saying what to do."""
    pytest.importorskip("psycopg")
    with pytest.raises(ValueError, match=match) as caught:
        open_store(url)
    assert "postgresql://user@host/dbname" in str(caught.value)


def test_a_malformed_postgresql_url_never_shows_its_password() -> None:
    pytest.importorskip("psycopg")
    for url in (
        "postgresql://me:s3cret-pw@db.example/flows?foo=1",
        "postgresql://me:s3cret-pw@[::1/flows",
        "postgresql://db.example/flows?password=s3cret-pw&sslmode",
    ):
        with pytest.raises(ValueError, match="malformed") as caught:
            open_store(url)
        assert "s3cret-pw" not in str(caught.value)


def test_valid_postgresql_urls_reach_libpq_as_written_without_busy_timeout() -> None:
    """The socket form keeps its `//`, a query keeps its escapes; only busy_timeout goes."""
    pytest.importorskip("psycopg")
    from psycopg.conninfo import conninfo_to_dict

    from flowsdk.store._postgres_url import PgTarget

    for url, conninfo, parsed in [
        ("postgresql://", "postgresql://", {}),
        ("postgresql:///flows", "postgresql:///flows", {"dbname": "flows"}),
        (
            "postgresql://me@db.example:5432/flows",
            "postgresql://me@db.example:5432/flows",
            {"user": "me", "host": "db.example", "port": "5432", "dbname": "flows"},
        ),
        (
            "postgres://db.example/flows?sslmode=require&busy_timeout=2",
            "postgresql://db.example/flows?sslmode=require",
            {"host": "db.example", "dbname": "flows", "sslmode": "require"},
        ),
        (
            "postgresql:///flows?host=/run/pg&options=-c%20lock_timeout%3D0",
            "postgresql:///flows?host=/run/pg&options=-c%20lock_timeout%3D0",
            {"dbname": "flows", "host": "/run/pg", "options": "-c lock_timeout=0"},
        ),
    ]:
        target = PgTarget(url)
        assert target.conninfo == conninfo
        assert conninfo_to_dict(target.conninfo) == parsed
        assert target.display.startswith(url.partition("?")[0])  # `///` shown as written


@pytest.mark.parametrize(
    "url",
    [
        "postgress://ann:s3cret@db.example/flows",  # a typo in the scheme
        "postgresql+psycopg://ann:s3cret@db.example/flows",  # SQLAlchemy's form
        "mysql://ann@db.example/flows?password=s3cret",
    ],
)
def test_an_unknown_scheme_is_refused_without_its_password_and_is_never_a_file(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL of a scheme flowsdk does not know is refused, not read as a SQLite path."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="unknown store URL") as refused:
        open_store(url)
    assert "s3cret" not in str(refused.value)
    assert "***" in str(refused.value)
    assert list(tmp_path.iterdir()) == []  # no file made of the URL


def test_a_client_shows_its_store_url_without_the_password() -> None:
    """`repr` and the closed client's message mask a PostgreSQL password (nothing connects)."""
    client = flowsdk.Client("postgresql://ann:s3cret@127.0.0.1:1/flows")
    assert repr(client) == "Client('postgresql://ann:***@127.0.0.1:1/flows')"
    client.close()
    with pytest.raises(RuntimeError) as closed:
        client.runs()
    assert "s3cret" not in str(closed.value)
    assert "postgresql://ann:***@127.0.0.1:1/flows" in str(closed.value)
