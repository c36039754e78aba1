"""A process forked by a task body never runs the rest of the workflow.

`os.fork()` in a body copies the runner, its event loop and every live
action, but not its threads: a child that returns into the workflow would run
the rest of it again, with nothing recorded, then wait forever for a writer
thread that does not exist. So once a run has started, a fork hook
(`os.register_at_fork`, registered when the first run starts, never at
import) puts one callback at the front of the child's event loop: when the
child's code gives control back to the loop (its body awaits or returns), the
child exits at once (status 0, after flushing its standard streams), touching
neither the run nor the store. A child that calls `os._exit` or an `exec`
function first never gets there. A plain `def` body runs in a thread of its
own: a child forked there must end itself (`os._exit`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

__all__ = ["run_ended", "run_started"]

_loops: dict[int, tuple[asyncio.AbstractEventLoop, int]] = {}  # thread id -> (loop, runs)
_lock = threading.Lock()
_hooked = False


def run_started(loop: asyncio.AbstractEventLoop) -> None:
    """Note that a run drives `loop` in this thread (the first call registers the hook)."""
    global _hooked
    with _lock:
        if not _hooked:
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _hooked = True
        ident = threading.get_ident()
        _, runs = _loops.get(ident, (loop, 0))
        _loops[ident] = (loop, runs + 1)


def run_ended(loop: asyncio.AbstractEventLoop) -> None:
    """Note that one run on `loop` (this thread) has ended."""
    with _lock:
        ident = threading.get_ident()
        found = _loops.get(ident)
        if found is None or found[0] is not loop:
            return
        if found[1] <= 1:
            del _loops[ident]
        else:
            _loops[ident] = (loop, found[1] - 1)


def _after_fork_in_child() -> None:
    # The forking thread is the child's only thread; `_lock` may have been held by
    # another thread of the parent, so it is not taken here.
    found = _loops.get(threading.get_ident())
    _loops.clear()
    if found is None:
        return  # not forked from a run's loop thread (a plain def body's thread)
    loop = found[0]
    if loop.is_closed():
        return
    handle = asyncio.Handle(_exit_child, (os.getpid(),), loop)
    ready = getattr(loop, "_ready", None)
    if ready is not None and hasattr(ready, "appendleft"):
        ready.appendleft(handle)  # before anything else the copied loop would run
    else:
        loop.call_soon(_exit_child, os.getpid())


def _exit_child(pid: int) -> None:
    if os.getpid() != pid:
        return
    try:
        sys.stderr.write(
            f"flowsdk: process {pid}, forked by a task body, returned into the workflow; it "
            "exits here without touching the run (end a forked child with os._exit, or use "
            "subprocess or multiprocessing)\n"
        )
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        os._exit(0)
