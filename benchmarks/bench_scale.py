"""One run of many actions in waves: time against bare asyncio, and memory per wave (SPEC §10).

A root gathers `--wave` children at a time, `--actions` in all (default
1,000,000 in waves of 10,000), on the SQLite store (or `--store`). After each
wave it collects garbage and prints the process's resident memory, so that a
run whose memory grows with the actions it has finished shows it wave by
wave. Not part of `make test` (minutes, not seconds): `make bench-scale`.

Bare asyncio runs the same waves, with the same collection after each, in a
worker process of its own (a fresh interpreter that imports asyncio alone),
one of its waves after each of flowsdk's: the two take turns through the whole
run, so that this machine's slow and fast spells fall on both alike. Each
flowsdk wave's CPU time is the runner process's, from the wave's start to the
end of the bare wave after it (the store's writer thread catching up meanwhile
is counted for flowsdk); each bare wave's is the worker's own. The verdict is
the ratio of the sums; the median and quartiles of the per-wave ratios show the
spread. flowsdk's CPU time is split into the garbage collector's and the
writer thread's; the worker's RSS growth is printed too.

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
from asyncio.subprocess import PIPE
from collections.abc import Sequence
from pathlib import Path

import msgspec

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

# The bare-asyncio worker: runs a wave of the given size for each line it reads,
# collects garbage, and answers with its CPU seconds for the wave and its RSS.
BARE_WORKER = """
import asyncio, gc, sys, time

async def child(i):
    await asyncio.sleep(0)
    return i

async def main():
    for line in sys.stdin:
        start = time.process_time()
        await asyncio.gather(*(child(i) for i in range(int(line))))
        gc.collect()
        took = time.process_time() - start
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * 4096 / 1e6
        print(took, rss, flush=True)

gc.collect()
asyncio.run(main())
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


class Waves(msgspec.Struct):
    """What the run measured, wave by wave."""

    rss: list[float]  # flowsdk's RSS after each wave, MB
    cpu: list[float]  # flowsdk's CPU seconds for each wave
    bare_cpu: list[float]  # the bare worker's, for the wave after each
    bare_rss: list[float]
    took: list[float]  # each control request, ms
    writer: float | None  # the store's writer thread's CPU seconds for the waves


@env.task
async def waves(total: int, wave: int, store: str, controls: int) -> Waves:
    bare = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BARE_WORKER, stdin=PIPE, stdout=PIPE
    )
    assert bare.stdin is not None
    assert bare.stdout is not None
    seen = Waves([], [], [], [], [], None)
    try:
        for w in range(total // wave):
            start = time.process_time()
            await asyncio.gather(*(child(i) for i in range(wave)))
            gc.collect()
            seen.rss.append(rss_mb())
            bare.stdin.write(b"%d\n" % wave)
            bare_cpu, bare_rss = map(float, (await bare.stdout.readline()).split())
            seen.cpu.append(time.process_time() - start)
            seen.bare_cpu.append(bare_cpu)
            seen.bare_rss.append(bare_rss)
            print(
                f"  wave {w + 1:>4}: {(w + 1) * wave:>10,} actions, RSS {seen.rss[-1]:7.1f} MB, "
                f"CPU {seen.cpu[-1] / bare_cpu:.2f}x the bare wave's",
                flush=True,
            )
    finally:
        bare.stdin.close()
        await bare.wait()
    seen.writer = thread_cpu(f"flowsdk-run-{RUN_NAME}")  # the store's writer thread, if any
    if controls == 0:
        return seen
    ALL_HELD.append(asyncio.Event())
    waiting = [asyncio.create_task(held(controls)) for _ in range(controls)]
    await ALL_HELD[0].wait()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONTROLLER, store, RUN_NAME, *HELD, stdout=PIPE
    )
    out, _ = await proc.communicate()
    await asyncio.gather(*waiting, return_exceptions=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the controlling process failed (exit {proc.returncode})")
    seen.took = json.loads(out)
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
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
        store = args.store or "sqlite:///" + str(Path(folder) / "flowsdk.db")
        print(
            f"{args.actions:,} actions in waves of {args.wave:,} on "
            f"{store.split('://')[0]}, each wave followed by the same wave in bare asyncio "
            "(a worker process):"
        )
        gc.collect()
        with Collections() as flow_gc:
            run = flowsdk.run(
                waves, args.actions, args.wave, store, args.controls, name=RUN_NAME, store=store
            )
        seen: Waves = run.result()
        read_line = reads(store, args.actions)
    flow, bare = sum(seen.cpu), sum(seen.bare_cpu)
    ratios = sorted(f / b for f, b in zip(seen.cpu, seen.bare_cpu, strict=True))
    quarter = len(ratios) // 4
    verdict = "ok" if flow <= 3 * bare else "MISS"
    print(
        f"flowsdk: {run.phase.value}, its waves {flow:.1f} s CPU against bare asyncio's "
        f"{bare:.1f} s: {flow / bare:.2f}x (target <= 3x): {verdict}; per wave: median "
        f"{statistics.median(ratios):.2f}x, quartiles {ratios[quarter]:.2f}-"
        f"{ratios[-1 - quarter]:.2f}x"
    )
    parts = f"  of which the garbage collector {flow_gc.seconds:.1f} s"
    if seen.writer is not None:
        parts += f", the store's writer thread {seen.writer:.1f} s (its waves)"
    print(parts)
    if len(seen.rss) > 1:
        first, most, grew = growth(seen.rss)
        verdict = "ok" if abs(grew) <= 0.10 else "MISS"
        print(
            f"RSS after the first wave {first:.1f} MB, at most {most:.1f} MB later "
            f"({grew:+.1%}; target +-10%): {verdict}; median {statistics.median(seen.rss):.1f} MB"
        )
        first, most, grew = growth(seen.bare_rss)
        print(
            f"  bare asyncio's worker: {first:.1f} MB after its first wave, then at most "
            f"{most:.1f} MB: {grew:+.1%}"
        )
    print(read_line)
    if seen.took:
        took, worst = seen.took, max(seen.took)
        print(
            f"control: {len(took)} aborts from another process on a run of {args.actions:,} "
            f"recorded actions: median {statistics.median(took):.1f} ms, max {worst:.1f} ms "
            f"(target <= 30 ms): {'ok' if worst <= 30 else 'MISS'}"
            + f"; each: {', '.join(f'{t:.1f}' for t in took)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
