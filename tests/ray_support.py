"""One local Ray cluster for the whole test session, and helpers for the Ray tests.

The cluster is started by flowsdk's own code (loopback only, no dashboard, no
usage report), once, on first use by a test that asks for `ray_cluster`, and
shut down at the end of the session with every process it started. Under
pytest-xdist the tests that use it are in `xdist_group("ray")`, so one worker
starts it.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest


def start_cluster() -> None:
    """Start the session's cluster through flowsdk's executor (as a first Ray task would)."""
    with warnings.catch_warnings():
        # Ray's own imports may warn; they are not this suite's warnings.
        warnings.simplefilter("ignore")
        from flowsdk.executors._ray import RAY

        RAY.connect()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster for this session, stopped at the end (no process left behind)."""
    pytest.importorskip("ray")
    start_cluster()
    import ray

    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.shutdown()


async def wait_for_file(path: Path, within: float = 60.0) -> str:
    """Return the text of `path` once a remote body has written it (polled, with a deadline)."""
    deadline = time.monotonic() + within
    while not path.exists() or not path.read_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} was not written within {within} s")
        await asyncio.sleep(0.01)  # polling a file another process writes
    return path.read_text()


def wait_for_file_sync(path: Path, within: float = 60.0) -> str:
    """The same, outside an event loop."""
    return asyncio.run(wait_for_file(path, within))
