"""Per-action cost in instructions against bare asyncio: SPEC section 10's shapes, no noise.

Time on a shared machine moves by tens of percent from one run to the next;
the number of instructions a program executes does not. Each shape runs in a
fresh interpreter under `valgrind --tool=callgrind` twice, with a small and a
large number of actions; the difference divided by the difference in actions
is the cost of one action, start-up and imports cancelled out. Bare asyncio
and flowsdk (memory store, SQLite store) run the same shape:

- sequential awaited calls: bare `await asyncio.create_task(child())`;
- gather fan-out of the large count of children;
- cancel running children: their creation and `t.cancel()` of each, awaited
  with `gather(..., return_exceptions=True)`.

The count includes every thread (the SQLite writer's too). The SQLite store's
batching depends on timing, so its rows move by a few percent between runs;
the others by well under one. The targets are SPEC section 10's (its time
targets, applied to instructions; the fan-out target is for 10,000 children, and 2x on
the memory store on Python 3.12+).
Without valgrind every row says so. The script always exits 0. `--quick` uses
small counts and only the sequential shape on the memory store (a smoke test: its
ratio is higher than the full run's, the start of a run weighing more).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from bench_core import (
    Row,
    bare_fan_out,
    bare_sequential,
    fan_out_root,
    render,
    sequential_root,
)

import flowsdk

HERE = Path(__file__).resolve()
COUNTS = (200, 2_200)
QUICK_COUNTS = (20, 220)
SIDES = ("bare", "memory", "sqlite")
# (shape, title, targets for the memory and the SQLite store)
SHAPES: dict[str, tuple[str, tuple[float | None, float | None]]] = {
    "sequential": ("(a) sequential awaited calls", (1.5, 3.0)),
    "fan-out": ("(b) gather fan-out", (3.0, 4.0)),
    "cancel": ("(d) cancel running children (their creation too)", (2.5, None)),
}
if sys.version_info >= (3, 12):  # SPEC section 10: a fan-out child within 2x on 3.12+
    SHAPES["fan-out"] = ("(b) gather fan-out, Python 3.12+", (2.0, 4.0))

# -- the cancel shape (sequential and fan-out are bench_core's) --------------------------------

env = flowsdk.TaskEnvironment("bench_instructions")


class _Started:
    """Counts the bodies that started; set once all of them have."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.all_in = asyncio.Event()

    def arrive(self) -> None:
        self.count += 1
        if self.count == self.expected:
            self.all_in.set()


STARTED: list[_Started] = []


async def _cancel_all(spawn: Callable[[], asyncio.Task[Any]], n: int) -> int:
    started = STARTED[0]
    tasks = [spawn() for _ in range(n)]
    await started.all_in.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return n


async def bare_sleeper() -> None:
    STARTED[0].arrive()
    await asyncio.sleep(3600)


async def bare_cancel(n: int) -> int:
    return await _cancel_all(lambda: asyncio.create_task(bare_sleeper()), n)


@env.task
async def sleeper() -> None:
    STARTED[0].arrive()
    await asyncio.sleep(3600)


@env.task
async def cancel_root(n: int) -> int:
    return await _cancel_all(lambda: asyncio.create_task(sleeper()), n)


_BARE: dict[str, Callable[[int], Coroutine[Any, Any, int]]] = {
    "sequential": bare_sequential,
    "fan-out": bare_fan_out,
    "cancel": bare_cancel,
}
_FLOW: dict[str, flowsdk.Task[[int], int]] = {
    "sequential": sequential_root,
    "fan-out": fan_out_root,
    "cancel": cancel_root,
}


def workload(shape: str, side: str, n: int) -> None:
    """Run one shape once, with `n` actions (what the measured child process does)."""
    STARTED.append(_Started(n))
    if side == "bare":
        asyncio.run(_BARE[shape](n))
        return
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as folder:
        store = "memory://" if side == "memory" else f"sqlite:///{folder}/flowsdk.db"
        run = flowsdk.run(_FLOW[shape], n, store=store)
    # Not `run.actions`: building every action's record is not part of running them.
    if run.phase is not flowsdk.RunPhase.SUCCEEDED:
        raise SystemExit(f"unexpected run: {run.phase.value}")
    if run.result() != n:
        raise SystemExit(f"unexpected result: {run.result()!r} instead of {n}")


# -- measuring ---------------------------------------------------------------------------------

_COLLECTED = re.compile(r"Collected : (\d+)")


def _child(shape: str, side: str, n: int, *wrapper: str) -> str:
    # The same hash seed in every child (dictionaries lay out alike), and the
    # bytecode cache written as an installed package has it.
    skip = {"FLOWSDK_STORE", "PYTHONDONTWRITEBYTECODE"}
    child_env = {k: v for k, v in os.environ.items() if k not in skip}
    child_env["PYTHONHASHSEED"] = "0"
    command = [*wrapper, sys.executable, str(HERE), "--child", shape, side, str(n)]
    done = subprocess.run(command, env=child_env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shape} on {side} failed: {done.stderr.strip()[-200:]}")
    return done.stderr


def instructions(shape: str, side: str, n: int, valgrind: str) -> int:
    """Instructions executed by a fresh interpreter that runs `shape` with `n` actions."""
    out = _child(shape, side, n, valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null")
    found = _COLLECTED.search(out)
    if found is None:
        raise RuntimeError(f"callgrind printed no count for {shape} on {side}")
    return int(found.group(1))


def per_action(shape: str, side: str, counts: tuple[int, int], valgrind: str) -> float:
    """Instructions per action: the large run minus the small one, over the difference."""
    _child(shape, side, counts[0])  # warm-up: bytecode cache written, files in the page cache
    small, large = (instructions(shape, side, n, valgrind) for n in counts)
    return (large - small) / (counts[1] - counts[0])


def rows(shapes: Sequence[str], stores: Sequence[str], counts: tuple[int, int]) -> list[Row]:
    """Measure every shape on bare asyncio and on each store; one row per store."""
    valgrind = shutil.which("valgrind")
    out: list[Row] = []
    for shape in shapes:
        title, targets = SHAPES[shape]
        made = {
            store: Row(f"{title}, {store} store", "instr", max_ratio=target)
            for store, target in zip(SIDES[1:], targets, strict=True)
            if store in stores
        }
        out.extend(made.values())
        if valgrind is None:
            for row in made.values():
                row.error = "valgrind is not installed (Debian package valgrind)"
            continue
        try:
            bare = per_action(shape, "bare", counts, valgrind)
            for store, row in made.items():
                row.bare = bare
                row.flow = per_action(shape, store, counts, valgrind)
        except (OSError, RuntimeError) as exc:
            for row in made.values():
                row.error = str(exc)[:120]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, and return 0 (benchmarks report, never gate)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="small counts, sequential calls on memory only"
    )
    parser.add_argument("--child", nargs=3, metavar=("SHAPE", "SIDE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        shape, side, n = args.child
        workload(shape, side, int(n))
        return 0
    counts = QUICK_COUNTS if args.quick else COUNTS
    shapes = ["sequential"] if args.quick else list(SHAPES)
    stores = ["memory"] if args.quick else list(SIDES[1:])
    print(
        f"flowsdk vs bare asyncio, instructions per action ({counts[1]:,} minus {counts[0]:,} "
        f"actions, callgrind) | Python {platform.python_version()} on {platform.system()} "
        f"{platform.machine()}",
        flush=True,
    )
    started = time.perf_counter()
    table = rows(shapes, stores, counts)
    print()
    print(render(table))
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
