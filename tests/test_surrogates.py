"""Text that is not valid Unicode, from a workflow, is recorded with it made visible.

A lone surrogate is what `os.fsdecode` (and `surrogateescape`) makes of a file
name's bytes that are not UTF-8, so it reaches error messages, log records,
cancel messages and report names. UTF-8 cannot hold it, so a SQL store could
not write the text, which stopped the run's writer and failed the run. Each
store now records such text with the character as an escape (a backslash, `u`, four hex digits); the
memory store keeps it as it is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import flowsdk
from flowsdk import ActionPhase, RunPhase
from flowsdk.store import Store

env = flowsdk.TaskEnvironment("surrogates")
BAD = "file-\udc80.txt"  # what os.fsdecode(b"file-\x80.txt") gives
SHOWN = "file-\\udc80.txt"


@contextmanager
def _out_of_pytests_report() -> Iterator[None]:
    """Keep a record out of pytest's own log capture: xdist cannot send a lone surrogate."""
    root = logging.getLogger()
    hidden = [h for h in root.handlers if type(h).__module__ == "_pytest.logging"]
    for handler in hidden:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in hidden:
            root.addHandler(handler)


@env.task
async def fails() -> None:
    with _out_of_pytests_report():
        logging.getLogger("surrogates").warning("cannot read %s", BAD)
    await flowsdk.report(1.0, name=BAD)
    raise FileNotFoundError(BAD)


@env.task
async def sleeps() -> None:
    await asyncio.Event().wait()


@env.task
async def main() -> None:
    cancelled = asyncio.create_task(sleeps())
    await asyncio.sleep(0)  # the child starts
    cancelled.cancel(f"gave up on {BAD}")
    await asyncio.gather(cancelled, fails(), return_exceptions=True)


async def test_text_that_is_not_valid_unicode_is_recorded_made_visible(
    store: str | Store,
) -> None:
    """An error, a log record, a report name and a cancel message with a lone surrogate."""
    run = await flowsdk.run_async(main, name="surrogates", store=store)
    assert run.phase is RunPhase.SUCCEEDED
    expected = BAD if not isinstance(store, str) else SHOWN  # the memory store keeps it
    client = flowsdk.Client(store)
    pool = concurrent.futures.ThreadPoolExecutor(1)  # store calls block: not on the loop
    loop = asyncio.get_running_loop()
    try:
        stored = await loop.run_in_executor(pool, partial(client.get_run, "surrogates"))
        cancelled, failed = stored.action("a1"), stored.action("a2")
        assert cancelled.phase is ActionPhase.ABORTED
        assert cancelled.abort is not None
        assert cancelled.abort.reason == f"gave up on {expected}"
        assert failed.phase is ActionPhase.FAILED
        assert failed.error is not None
        assert failed.error.message == expected
        logs = await loop.run_in_executor(pool, partial(client.logs, "surrogates"))
        assert [entry.message for entry in logs] == [f"cannot read {expected}"]
        progress = await loop.run_in_executor(pool, partial(client.progress, "surrogates"))
        assert [p.name for p in progress] == [expected]
    finally:
        pool.shutdown()
        client.close()
