"""What `flowsdk.report` costs (SPEC §10: reporting every step slows a run by <= 20%).

Two measures, each the median of several interleaved repetitions, memory store,
in CPU time of this process:

- one `await flowsdk.report(value, step=i)` in a body, against one bare
  `await asyncio.sleep(0)` (the cheapest await there is);
- a run of 10,000 concurrent actions, each taking 20 steps, reporting every
  step, against the same run that does not report. A step is one loop step
  (`asyncio.sleep(0)`) and 200 multiply-adds (a few microseconds: far less
  than any real training epoch); the target row is this one. The same run
  with empty steps (a loop step alone) is shown too, for information: there
  the report's own few microseconds are the whole difference.

    python benchmarks/bench_report.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence

from bench_core import Row, render

import flowsdk
from flowsdk.store import MemoryStore

env = flowsdk.TaskEnvironment("bench_report")
# CPU time of this process, as bench_core samples it: time other processes take from
# a shared machine counts against neither side (the memory store has no second thread).
_clock = time.process_time
CALLS = 100_000
ACTIONS = 10_000
STEPS = 20


@env.task
async def per_call(calls: int, reporting: bool) -> float:
    started = _clock()
    if reporting:
        for i in range(calls):
            await flowsdk.report(i, step=i)
    else:
        for _ in range(calls):
            await asyncio.sleep(0)
    return (_clock() - started) / calls


@env.task
async def trial(seed: int, reporting: bool, work: int) -> float:
    loss = float(seed)
    for step in range(STEPS):
        for _ in range(work):
            loss = loss * 0.999 + 0.001
        loss += 1.0 / (step + 1)
        await asyncio.sleep(0)
        if reporting:
            await flowsdk.report(loss, step=step)
    return loss


@env.task
async def search(actions: int, reporting: bool, work: int) -> int:
    await asyncio.gather(*(trial(i, reporting, work) for i in range(actions)))
    return actions


def _run_seconds(actions: int, reporting: bool, work: int) -> float:
    started = _clock()
    flowsdk.run(search, actions, reporting, work, store=MemoryStore())
    return _clock() - started


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, and return 0 (benchmarks report, never gate)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 5
    bare = [
        flowsdk.run(per_call, CALLS, False, store=MemoryStore()).result() for _ in range(repeats)
    ]
    flow = [
        flowsdk.run(per_call, CALLS, True, store=MemoryStore()).result() for _ in range(repeats)
    ]
    runs: dict[tuple[int, bool], list[float]] = {}
    for _ in range(repeats):  # interleaved: a noisy neighbour slows both alike
        for work in (200, 0):
            for reporting in (False, True):
                runs.setdefault((work, reporting), []).append(
                    _run_seconds(ACTIONS, reporting, work)
                )
    rows = [
        Row(
            "one report vs one `await asyncio.sleep(0)`",
            "µs",
            bare=statistics.median(bare) * 1e6,
            flow=statistics.median(flow) * 1e6,
            notes=["no observer: a report records and returns without a loop step"],
        ),
        Row(
            f"{ACTIONS:,} actions x {STEPS} steps, reporting every step vs not",
            "s",
            bare=statistics.median(runs[200, False]),
            flow=statistics.median(runs[200, True]),
            max_ratio=1.2,
            notes=["'bare' is the same flowsdk run without reports; a step: 200 multiply-adds"],
            pairs=[f / b for b, f in zip(runs[200, False], runs[200, True], strict=True)],
        ),
        Row(
            "the same with empty steps (a loop step alone)",
            "s",
            bare=statistics.median(runs[0, False]),
            flow=statistics.median(runs[0, True]),
            pairs=[f / b for b, f in zip(runs[0, False], runs[0, True], strict=True)],
        ),
    ]
    print(f"flowsdk.report, Python {sys.version.split()[0]}, {repeats} repetitions\n")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
