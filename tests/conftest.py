"""The leak bundle every test runs under.

- warnings are errors (pyproject `filterwarnings`), so "coroutine ... was never
  awaited" and unraisable exceptions fail the test;
- anything asyncio logs at ERROR ("Task was destroyed but it is pending",
  "Task exception was never retrieved") fails the test;
- a test must not leave a thread running that it started;
- async tests must end with no other task pending on their loop and with their
  own `cancelling()` count back to 0 (checked in the test's own task, which is
  not the task an async fixture runs in: `pytest_runtest_call` below).

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`).
Each worker is a session of its own: its own PostgreSQL server (`postgres_server`,
started on first use, stopped at its end), tmp_path and environment. Tests that
share something heavy carry an `xdist_group` marker, so one worker runs them all:
"ray" (the Ray cluster, and the example that starts one of its own), "browser"
(Chromium and its console), "console_api" and "console_openapi" (a console and
the runs its module's tests share).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.pg_server import PostgresServer
from tests.ray_support import ray_cluster

if TYPE_CHECKING:
    from flowsdk.store import Store

__all__ = ["ray_cluster"]  # the session's Ray cluster (tests/ray_support.py)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection left alive out of the collector's reach, for the session.

    The modules imported by then (flowsdk, pytest, Hypothesis, Ray, Playwright,
    schemathesis: some 150,000 objects) live as long as the process. The leak
    bundle's `gc.collect()` after each test scanned them all, a third of a second
    a test, a third of the suite's time; it now scans what was made since, so
    every object a test or a fixture makes is still collected and finalized there.
    """
    gc.collect()  # what collection left as garbage is freed, not frozen
    gc.freeze()


# Why a test of an `xdist_group` was left out of it (see below); such a test fails at setup.
_UNGROUPED = pytest.StashKey[str]()
THREAD_EXIT_WAIT = 5.0  # seconds a test's finished threads get to exit before they count as leaked


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own, which adds the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup`, note each test that pytest-xdist could not group.

    It groups by adding `@group` to each grouped test's node id; where that no
    longer takes (pytest 9.2 with pytest-xdist 3.8), every test would be spread
    on its own, two Ray clusters and two browsers at once, without a word.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted({str(m.args[0]) for m in item.iter_markers("xdist_group")})
        if names and not item.nodeid.endswith("@" + "_".join(names)):
            item.stash[_UNGROUPED] = (
                f"pytest-xdist left this test out of its group {names}: it cannot group tests "
                "on this version of pytest (see the pin of pytest in pyproject.toml)"
            )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a test that its `xdist_group` should have kept on one worker with the rest."""
    problem = item.stash.get(_UNGROUPED, None)
    if problem is not None:
        pytest.fail(problem, pytrace=False)


@pytest.fixture(autouse=True)
def memory_store_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs go to memory:// unless a test names a store: tests never write to the repo."""
    monkeypatch.setenv("FLOWSDK_STORE", "memory://")


@pytest.fixture(autouse=True)
def leak_bundle() -> Iterator[None]:
    collector = _Collector()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(collector)
    threads_before = set(threading.enumerate())
    try:
        yield
        gc.collect()
    finally:
        asyncio_logger.removeHandler(collector)
    problems = [record.getMessage() for record in collector.records]
    assert not problems, f"asyncio reported: {problems}"
    leaked = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    # A thread whose work is done may still be returning (asyncio's `waitpid` thread
    # wakes the loop, which can run the test on before that thread has exited): give
    # each a bounded moment to end. One that runs on is a leak.
    deadline = time.monotonic() + THREAD_EXIT_WAIT
    for thread in leaked:
        thread.join(max(0.0, deadline - time.monotonic()))
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture(autouse=True)
async def async_leak_bundle(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """For async tests: no task left pending on the test's loop.

    It runs in a task of its own, not the test's: the test's `cancelling()`
    count is checked by `pytest_runtest_call`.
    """
    if not asyncio.iscoroutinefunction(getattr(request, "function", None)):
        yield
        return
    yield
    me = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    assert not pending, f"tasks left pending: {pending}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Run an async test so that it fails if it leaves its own task's `cancelling()` above 0.

    pytest-asyncio runs the test's coroutine in a task of its own, and each async
    fixture in another one, so `async_leak_bundle` cannot see the test's count. The
    test function is wrapped here, before pytest-asyncio's `runtest` hands it to
    the loop, and put back afterwards.
    """
    test = getattr(item, "obj", None)
    if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(test):
        yield
        return
    item.obj = _checking_own_cancelling(test, item.nodeid)
    try:
        yield
    finally:
        item.obj = test


def _checking_own_cancelling(
    test: Callable[..., Coroutine[Any, Any, object]], nodeid: str
) -> Callable[..., Coroutine[Any, Any, None]]:
    @functools.wraps(test)
    async def checked(*args: Any, **kwargs: Any) -> None:
        await test(*args, **kwargs)
        # Only once the test has passed: a failing test's own error says more.
        me = asyncio.current_task()
        left = me.cancelling() if me is not None else 0
        if left:
            pytest.fail(
                f"{nodeid} left its own task's cancelling() at {left}, not 0: a cancellation "
                "of the test's task was requested (task.cancel(), or a cancel flowsdk or "
                "asyncio.timeout delivered to it) and then absorbed without uncancel(); "
                "an asyncio.timeout or TaskGroup that runs on in that task would misbehave",
                pytrace=False,
            )

    return checked


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (each xdist worker has its own), on first use.

    It is stopped at the session's end. Per worker, not shared: tests stop and
    restart it (tests/test_store_postgres.py), which must not cut another worker's.
    """
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        # Only when run outside `make test`, which installs the binaries first.
        pytest.skip(f"{exc}; `make test` installs PostgreSQL (scripts/ensure-postgres.sh)")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty PostgreSQL database (one per test)."""
    return postgres_server.new_database()


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str | Store:
    """A new, empty store of each kind: memory, a SQLite file, a PostgreSQL database.

    The memory store is an object (a URL would make a new one per use); the
    others are URLs. A module may define its own `store`.
    """
    if request.param == "postgresql":
        pg: str = request.getfixturevalue("pg_url")
        return pg
    from flowsdk.testing import new_store  # imports flowsdk: only when used

    return new_store(request.param, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new store: a SQLite file, then a PostgreSQL database (a module may define its own)."""
    if request.param == "postgresql":
        pg: str = request.getfixturevalue("pg_url")
        return pg
    from tests.runners.harness import sqlite_url  # imports flowsdk: only when used

    return sqlite_url(tmp_path / "s.db")
