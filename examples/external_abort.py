"""An operator aborts one action of a live run from another process, with a reason.

The root starts 10 long sleepers. While they run, an operator aborts one of
them from a second process, with the command line:

    python -m flowsdk abort RUN a3 --reason "diverging loss" --store URL

The aborted sleeper's body gets `CancelledError`; the root sees an
`ActionAbortedError` carrying `.action` and `.reason` -- an ordinary exception,
so `gather(..., return_exceptions=True)` hands it back as a value. The root
reports it and returns normally; the nine other sleepers are then ended by the
root's exit (cause `root_exit`).

Run it: `python examples/external_abort.py` (it starts the operator's command
itself). With `--operator-outside`, it prints `READY <run> a3 <store>` (for a
test to parse), then the abort command to paste into another terminal, and
waits for you (or the test) to run it.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import flowsdk
from flowsdk.errors import ActionAbortedError

env = flowsdk.TaskEnvironment("abort")

SLEEPERS = 10
TARGET = "a3"
# Set (from the loop) once every sleeper runs; the operator acts then, not after a sleep.
all_running = threading.Event()
_running: set[int] = set()


@env.task
async def sleeper(i: int) -> int:
    _running.add(i)
    if len(_running) == SLEEPERS:
        all_running.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        if flowsdk.current_action().name == TARGET:
            print(f"{TARGET}: cancelled, cleaning up")
        raise
    return i


@env.task
async def main() -> list[str]:
    sleepers = [asyncio.create_task(sleeper(i)) for i in range(SLEEPERS)]
    # The first sleeper to end is the aborted one: the others sleep for an hour.
    done, _ = await asyncio.wait(sleepers, return_when=asyncio.FIRST_COMPLETED)
    results = await asyncio.gather(*done, return_exceptions=True)
    aborted = [r for r in results if isinstance(r, ActionAbortedError)]
    for err in aborted:
        print(f"main: {err.action} was aborted: {err.reason}")
    return [err.action for err in aborted]


def operator(run: str, store: str) -> None:
    """The operator's whole part: one command, from another process."""
    all_running.wait()
    command = [sys.executable, "-m", "flowsdk", "abort", run, TARGET]
    command += ["--reason", "diverging loss", "--store", store]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    print(f"operator: {done.stdout.strip()}")


def announce(run: str, store: str) -> None:
    all_running.wait()
    print(f"READY {run} {TARGET} {store}", flush=True)  # for a script: one line to parse
    # This interpreter, by its full path: a plain `python` in another terminal may not
    # be the environment flowsdk is installed in.
    command = [sys.executable, "-m", "flowsdk", "abort", run, TARGET, "--store", store]
    command += ["--reason", "diverging loss"]
    print(f"now, in another terminal: {shlex.join(command)}", flush=True)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'runs.db'}"
        name = "abort-demo"
        outside = "--operator-outside" in sys.argv[1:]
        helper = threading.Thread(target=announce if outside else operator, args=(name, store))
        helper.start()
        run = flowsdk.run(main, name=name, store=store)
        helper.join()
    print(f"run {run.name}: {run.phase.value}, aborted {run.result()}")
    print(f"{'name':<4} {'phase':<10} {'cause':<10} reason")
    for action in run.actions:
        abort = action.abort
        cause = abort.cause.value if abort else "-"
        reason = abort.reason if abort and abort.reason else "-"
        print(f"{action.name:<4} {action.phase.value:<10} {cause:<10} {reason}")
