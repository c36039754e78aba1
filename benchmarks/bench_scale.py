"""One run of many actions in waves: time against bare asyncio, and memory per wave (SPEC §10).

A root gathers `--wave` children at a time, `--actions` in all (default
1,000,000 in waves of 10,000), on the SQLite store (or `--store`). After each
wave it collects garbage and prints the process's resident memory, so that a
run whose memory grows with the actions it has finished shows it wave by
wave. The same shape in bare asyncio, with the same collection and reading
after each wave, is timed first, in the same process, for the ratio; its RSS
growth is printed too, and flowsdk's CPU time is split into the garbage
collector's and the store's writer thread's. Not part of `make test` (minutes,
not seconds): `make bench-scale`.

Then, with every action recorded, the root starts `--controls` children that
wait, and another process (a real `Client`, as the CLI and the console use)
aborts them one by one: each abort is timed from the call to its answer. Once
the run has ended, the keyed reads of `flowsdk show RUN ACTION` and of
`flowsdk show RUN`'s outline are timed on it (informational).

Targets: the run completes; RSS after the first wave stays within +-10% of
its value then; CPU time <= 3x bare asyncio's; a control request on the run
of all those recorded actions is answered in <= 30 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import flowsdk

env = flowsdk.TaskEnvironment("scale")
RUN_NAME = "bench-scale"

# The other process: aborts each named action of the run, timing call -> answer.
CONTROLLER = """
import json, sys, time
import flowsdk
client = flowsdk.Client(sys.argv[1])
took = []
for action in sys.argv[3:]:
    start = time.perf_counter()
    result = client.abort(sys.argv[2], action, reason="bench-scale control request")
    took.append((time.perf_counter() - start) * 1e3)
    assert result.outcome.value == "applied", result
client.store.close()
print(json.dumps(took))
"""


def rss_mb() -> float:
    """The resident set size of this process, in MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


@env.task
async def child(i: int) -> int:
    await asyncio.sleep(0)
    return i


HELD: list[str] = []  # the names of the waiting children, as they start
ALL_HELD: list[asyncio.Event] = []


@env.task
async def held(count: int) -> None:
    HELD.append(flowsdk.current_action().name)
    if len(HELD) == count:
        ALL_HELD[0].set()
    await asyncio.Event().wait()  # until aborted by the other process


def thread_cpu(name: str) -> float | None:
    """CPU seconds used so far by this process's thread called `name` (Linux), if it exists."""
    for thread in threading.enumerate():
        if thread.name == name and thread.native_id is not None:
            with open(f"/proc/self/task/{thread.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


class Collections:
    """CPU time the garbage collector took while it was active (`gc.callbacks`)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._began = 0.0

    def __enter__(self) -> Collections:
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._note)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._began


@env.task
async def waves(
    total: int, wave: int, store: str, controls: int
) -> tuple[list[float], list[float], float | None]:
    seen: list[float] = []
    for w in range(total // wave):
        await asyncio.gather(*(child(i) for i in range(wave)))
        gc.collect()
        seen.append(rss_mb())
        done = (w + 1) * wave
        print(f"  wave {w + 1:>4}: {done:>10,} actions, RSS {seen[-1]:7.1f} MB", flush=True)
    writer = thread_cpu(f"flowsdk-run-{RUN_NAME}")  # the store's writer thread, if any
    if controls == 0:
        return seen, [], writer
    ALL_HELD.append(asyncio.Event())
    waiting = [asyncio.create_task(held(controls)) for _ in range(controls)]
    await ALL_HELD[0].wait()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONTROLLER, store, RUN_NAME, *HELD, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    await asyncio.gather(*waiting, return_exceptions=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the controlling process failed (exit {proc.returncode})")
    took: list[float] = json.loads(out)
    return seen, took, writer


async def bare_child(i: int) -> int:
    await asyncio.sleep(0)
    return i


async def bare_waves(total: int, wave: int) -> list[float]:
    """The same waves in bare asyncio, with the same collection and RSS reading after each."""
    seen: list[float] = []
    for _ in range(total // wave):
        await asyncio.gather(*(bare_child(i) for i in range(wave)))
        gc.collect()
        seen.append(rss_mb())
    return seen


def growth(seen: list[float]) -> tuple[float, float, float]:
    """RSS after the first wave, the most after it, and how much more that is."""
    first, most = seen[0], max(seen[1:])
    return first, most, (most - first) / first


def reads(store: str, actions: int) -> str:
    """Time keyed reads of the ended run: one action in full, and the tree's outline."""
    with flowsdk.Client(store) as client:
        took = []
        for seq in range(1, actions + 1, max(actions // 20, 1)):
            start = time.perf_counter()
            client.get_action(RUN_NAME, f"a{seq}")
            took.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        _, outline = client.service.get_outline(RUN_NAME)
        whole = time.perf_counter() - start
    return (
        f"reads: one action in full (Client.get_action), {len(took)} of them: median "
        f"{statistics.median(took):.1f} ms, max {max(took):.1f} ms; the outline of all "
        f"{len(outline):,} actions (what `flowsdk show RUN` folds): {whole:.2f} s (info)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bare shape, then the flowsdk run; print the waves and the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--actions", type=int, default=1_000_000)
    parser.add_argument("--wave", type=int, default=10_000)
    parser.add_argument("--store", default=None, help="a store URL (default: a new SQLite file)")
    parser.add_argument(
        "--controls", type=int, default=20, help="aborts sent from another process at the end"
    )
    args = parser.parse_args(argv)
    gc.collect()
    start = time.process_time()
    with Collections() as bare_gc:
        bare_seen = asyncio.run(bare_waves(args.actions, args.wave))
    bare = time.process_time() - start
    print(
        f"bare asyncio: {args.actions:,} children in waves of {args.wave:,}: {bare:.1f} s CPU "
        f"(garbage collector {bare_gc.seconds:.1f} s)"
    )
    if len(bare_seen) > 1:
        first, most, grew = growth(bare_seen)
        print(f"  RSS after its first wave {first:.1f} MB, then at most {most:.1f} MB: {grew:+.1%}")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
        store = args.store or "sqlite:///" + str(Path(folder) / "flowsdk.db")
        print(f"flowsdk on {store.split('://')[0]}:")
        gc.collect()
        start = time.process_time()
        with Collections() as flow_gc:
            run = flowsdk.run(
                waves, args.actions, args.wave, store, args.controls, name=RUN_NAME, store=store
            )
        flow = time.process_time() - start
        seen, took, writer = run.result()
        read_line = reads(store, args.actions)
    print(f"flowsdk: {run.phase.value} in {flow:.1f} s CPU ({flow / bare:.2f}x bare; target <= 3x)")
    parts = f"  of which the garbage collector {flow_gc.seconds:.1f} s"
    if writer is not None:
        parts += f", the store's writer thread {writer:.1f} s (its waves)"
    print(parts)
    if len(seen) > 1:
        first, most, grew = growth(seen)
        verdict = "ok" if abs(grew) <= 0.10 else "MISS"
        print(
            f"RSS after the first wave {first:.1f} MB, at most {most:.1f} MB later "
            f"({grew:+.1%}; target +-10%): {verdict}; median {statistics.median(seen):.1f} MB"
        )
    print(read_line)
    if took:
        worst = max(took)
        print(
            f"control: {len(took)} aborts from another process on a run of {args.actions:,} "
            f"recorded actions: median {statistics.median(took):.1f} ms, max {worst:.1f} ms "
            f"(target <= 30 ms): {'ok' if worst <= 30 else 'MISS'}"
            + f"; each: {', '.join(f'{t:.1f}' for t in took)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
