"""Crash campaign: SIGKILL real runners at random moments, then check the store.

Usage: `python soak/crash_campaign.py [KILLS] [--seed N]` (`make soak` runs 120).

Each round starts a runner process on one shared SQLite store, running a
workflow of sequential steps and fan-outs, and kills it (SIGKILL) after a
random delay, from before its run is created to after it has ended. Then:

- every run is finished or `CRASHED` (nothing left `RUNNING` or `STOPPING`),
  and every action of a crashed run is terminal;
- `PRAGMA integrity_check` is ok;
- every `CRASHED` run is retried and succeeds (its recorded inputs exist).

It prints the figures and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flowsdk
import flowsdk.errors

env = flowsdk.TaskEnvironment("campaign")


@env.task
async def step(i: int) -> int:
    await asyncio.sleep(0.01 * (i % 7))
    return i


@env.task
async def campaign(seed: int) -> int:
    rng = random.Random(seed)
    total = 0
    for _ in range(rng.randint(5, 15)):
        total += await step(rng.randint(0, 100))
        total += sum(await asyncio.gather(*(step(j) for j in range(rng.randint(1, 120)))))
    return total


def _runner(store: str, name: str, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, "--run", store, name, str(seed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kills", type=int, nargs="?", default=120)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    print(f"crash campaign: {args.kills} rounds, seed {seed}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "campaign.db"
        store = f"sqlite:///{path}"
        killed_at = collections.Counter[str]()
        started = time.monotonic()
        for i in range(args.kills):
            proc = _runner(store, f"r{i}", rng.randrange(10**6))
            delay = rng.uniform(0.2, 2.5)  # from before its run exists to after it ended
            try:
                proc.wait(timeout=delay)
                killed_at["ended before the kill"] += 1
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                killed_at["killed"] += 1
        problems = []
        with flowsdk.Client(store) as client:
            runs = client.runs(limit=None)
            phases = collections.Counter(r.phase.value for r in runs)
            for record in runs:
                if not record.phase.terminal:
                    problems.append(f"{record.name} is {record.phase.value}")
                run = client.get_run(record.name)
                problems += [
                    f"{record.name}/{a.name} is {a.phase.value}"
                    for a in run.actions
                    if not a.phase.terminal
                ]
            with contextlib.closing(sqlite3.connect(path)) as conn:
                integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if integrity != "ok":
                problems.append(f"integrity_check: {integrity}")
            crashed = [r.name for r in runs if r.phase is flowsdk.RunPhase.CRASHED]
            retried = collections.Counter[str]()
            for name in crashed:
                try:
                    retried[client.retry(name).phase.value] += 1
                except flowsdk.errors.FlowError as exc:
                    problems.append(f"retry of {name}: {type(exc).__name__}: {exc}")
                    retried["refused"] += 1
        never = args.kills - len(runs)
        print(
            f"{args.kills} runners in {time.monotonic() - started:.0f} s: "
            f"{killed_at['killed']} SIGKILLed, {killed_at['ended before the kill']} ended first; "
            f"{len(runs)} runs recorded ({never} killed before recording their run)"
        )
        print("phases: " + ", ".join(f"{k} {v}" for k, v in sorted(phases.items())))
        print(f"integrity_check: {integrity}")
        shown = ", ".join(f"{k} {v}" for k, v in retried.items()) or "none"
        print(f"retries of CRASHED runs: {shown}")
        for problem in problems:
            print(f"PROBLEM: {problem}")
        print("ok" if not problems else f"{len(problems)} problems")
        return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        store, name, run_seed = sys.argv[2], sys.argv[3], int(sys.argv[4])
        flowsdk.run(campaign, run_seed, name=name, store=store)
        sys.exit(0)
    sys.exit(main())
