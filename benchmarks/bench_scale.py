"""One run of many actions in waves: time against bare asyncio, and memory per wave (SPEC §10).

A root gathers `--wave` children at a time, `--actions` in all (default
1,000,000 in waves of 10,000), on the SQLite store (or `--store`). After each
wave it collects garbage and prints the process's resident memory, so that a
run whose memory grows with the actions it has finished shows it wave by
wave. The same shape in bare asyncio is timed first, in the same process, for
the ratio. Not part of `make test` (minutes, not seconds): `make bench-scale`.

Then, with every action recorded, the root starts `--controls` children that
wait, and another process (a real `Client`, as the CLI and the console use)
aborts them one by one: each abort is timed from the call to its answer.

Targets: the run completes; RSS after the first wave stays within +-10% of
its value then; CPU time <= 3x bare asyncio's; a control request on the run
of all those recorded actions is answered in <= 30 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
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


@env.task
async def waves(
    total: int, wave: int, store: str, controls: int
) -> tuple[list[float], list[float]]:
    seen: list[float] = []
    for w in range(total // wave):
        await asyncio.gather(*(child(i) for i in range(wave)))
        gc.collect()
        seen.append(rss_mb())
        done = (w + 1) * wave
        print(f"  wave {w + 1:>4}: {done:>10,} actions, RSS {seen[-1]:7.1f} MB", flush=True)
    if controls == 0:
        return seen, []
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
    return seen, took


async def bare_child(i: int) -> int:
    await asyncio.sleep(0)
    return i


async def bare_waves(total: int, wave: int) -> None:
    for _ in range(total // wave):
        await asyncio.gather(*(bare_child(i) for i in range(wave)))


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
    asyncio.run(bare_waves(args.actions, args.wave))
    bare = time.process_time() - start
    print(f"bare asyncio: {args.actions:,} children in waves of {args.wave:,}: {bare:.1f} s CPU")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
        store = args.store or "sqlite:///" + str(Path(folder) / "flowsdk.db")
        print(f"flowsdk on {store.split('://')[0]}:")
        gc.collect()
        start = time.process_time()
        run = flowsdk.run(
            waves, args.actions, args.wave, store, args.controls, name=RUN_NAME, store=store
        )
        flow = time.process_time() - start
        seen, took = run.result()
    print(f"flowsdk: {run.phase.value} in {flow:.1f} s CPU ({flow / bare:.2f}x bare; target <= 3x)")
    if len(seen) > 1:
        first, rest = seen[0], seen[1:]
        growth = (max(rest) - first) / first
        verdict = "ok" if abs(growth) <= 0.10 else "MISS"
        print(
            f"RSS after the first wave {first:.1f} MB, at most {max(rest):.1f} MB later "
            f"({growth:+.0%}; target +-10%): {verdict}; median {statistics.median(seen):.1f} MB"
        )
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
