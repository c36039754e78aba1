"""Race campaigns: runners contending for one SQLite file (P14), abort racing completion (X3).

Usage: `python soak/races.py [--seed N] [--runners 20] [--leaves 5000] [--rounds 3]
[--x3 1000] [--x3-thread 1000] [--x3-process 1000]` (`make soak` runs the defaults;
`0` skips a campaign). tests/test_scenarios_races.py runs small versions of each.

- P14: each round starts `--runners` runner processes on one SQLite file, released
  together by a barrier file, each running a fan-out of `--leaves` leaves. Every
  runner exits 0 with the right result, and the store shows every run `SUCCEEDED`
  with `leaves + 1` actions, each with exactly one terminal event: contention alone
  never fails a run's first or last write, and no run is left `RUNNING`.
- X3: a child returns 7 as an abort of it arrives. Exactly one of: `ABORTED`, the
  parent got `ActionAbortedError`, the abort was `applied`, no output stored; or
  `SUCCEEDED`, the parent got 7, the abort said "already finished: SUCCEEDED", 7
  stored. One terminal event, in memory and in the store. Three ways the abort comes:
  `RunHandle.abort` after 0 to 9 loop steps (`--x3`); `Client.abort` through the
  store from another thread, the body returning after a random delay (`--x3-thread`;
  one run in five ends as soon as its child has, so the abort also races the run's
  end); `Client.abort` from this process to a runner process (`--x3-process`).

The seed (printed) fixes every random choice; the timing of threads and processes
still varies between campaigns. It prints the figures and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import os
import queue
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

import flowsdk
from flowsdk import ActionPhase, EventKind, Outcome, RunPhase
from flowsdk.errors import ActionAbortedError
from flowsdk.testing import Gate

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {p.value for p in ActionPhase if p.terminal}
WAIT = 120.0  # seconds a campaign waits for a runner's line or exit before it gives up

env = flowsdk.TaskEnvironment("races")


def say(*words: object) -> None:
    """Print one line for the campaign process, at once."""
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _one_terminal_event(events: list[flowsdk.Event], action: str) -> list[str]:
    return [
        e.phase
        for e in events
        if e.kind is EventKind.ACTION and e.action == action and e.phase in TERMINAL
    ]


# -- P14: runners fanning out on one SQLite file ---------------------------------------------


@env.task
async def leaf(i: int) -> int:
    return 2 * i


@env.task
async def fan_out(n: int) -> int:
    return sum(await asyncio.gather(*(leaf(i) for i in range(n))))


def fan_out_runner(store: str, name: str, n: int, folder: Path) -> int:
    """Say ready (a file), wait for the campaign's go (a file), run the fan-out."""
    (folder / f"ready-{name}").touch()
    deadline = time.monotonic() + WAIT
    while not (folder / "go").exists():
        if time.monotonic() > deadline:
            say("NO-GO")
            return 1
        time.sleep(0.001)  # polling the campaign's go file, bounded by the deadline
    run = flowsdk.run(fan_out, n, name=name, store=store)
    say("RESULT", run.phase.value, run.result())
    return 0


def p14(path: Path, runners: int, leaves: int, rounds: int) -> list[str]:
    problems: list[str] = []
    store = f"sqlite:///{path}"
    expected = sum(2 * i for i in range(leaves))
    for r in range(rounds):
        folder = path.parent / f"p14-round-{r}"
        folder.mkdir()
        names = [f"p14-{r}-{i}" for i in range(runners)]
        started = time.monotonic()
        procs = [_spawn("--fan-out-runner", store, n, str(leaves), str(folder)) for n in names]
        try:
            deadline = time.monotonic() + WAIT
            while len(list(folder.glob("ready-*"))) < runners:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    problems.append(f"round {r}: the runners did not all reach the barrier")
                    break
                time.sleep(0.01)  # polling the runners' ready files, bounded by the deadline
            (folder / "go").touch()
            released = time.monotonic()
            outputs = [p.communicate(timeout=WAIT)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        for name, proc, out in zip(names, procs, outputs, strict=True):
            last = out.strip().splitlines()[-1:] or [""]
            if proc.returncode != 0 or last[0] != f"RESULT SUCCEEDED {expected}":
                problems.append(f"{name}: exit {proc.returncode}: {out.strip()[-2000:]}")
        with flowsdk.Client(store) as client:
            for name in names:
                run = client.get_run(name)
                if run.phase is not RunPhase.SUCCEEDED:
                    problems.append(f"{name} is {run.phase.value}")
                    continue
                if run.result() != expected:
                    problems.append(f"{name}: result {run.result()} != {expected}")
                phases = collections.Counter(a.phase.value for a in run.actions)
                if phases != {"SUCCEEDED": leaves + 1}:
                    problems.append(f"{name}: actions {dict(phases)}")
                ended = collections.Counter(
                    e.action
                    for e in run.events
                    if e.kind is EventKind.ACTION and e.phase in TERMINAL
                )
                if set(ended.values()) != {1} or len(ended) != leaves + 1:
                    problems.append(f"{name}: not one terminal event per action")
            left = [r.name for r in client.runs(limit=None) if not r.phase.terminal]
            if left:
                problems.append(f"round {r}: runs left live: {left}")
        print(
            f"P14 round {r}: {runners} runners x {leaves:,} leaves: "
            f"{time.monotonic() - released:.1f} s after the barrier "
            f"({released - started:.1f} s to start)",
            flush=True,
        )
    with contextlib.closing(sqlite3.connect(path)) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    if integrity != "ok":
        problems.append(f"P14 integrity_check: {integrity}")
    return problems


# -- X3: an abort racing a child's return -------------------------------------------------------


class Race:
    """What one iteration's child and root share with the campaign."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, delay: float = 0.0, hold: bool = True) -> None:
        """Start over, for the next run."""
        self.gate = Gate("x3")
        self.delay = delay  # how long the released body waits before it returns 7
        self.hold = hold  # whether the root waits for `answered` before it returns
        self.answered = asyncio.Event()
        self.seen: list[int | ActionAbortedError] = []


race = Race()


@env.task
async def child() -> int:
    await race.gate.enter()
    if race.delay:
        await asyncio.sleep(race.delay)  # the race under test: returns after a random delay
    return 7


@env.task
async def root() -> None:
    try:
        race.seen.append(await child())
    except ActionAbortedError as exc:
        race.seen.append(exc)
    if race.hold:
        await race.answered.wait()


def saw(seen: list[int | ActionAbortedError]) -> str:
    """What the parent saw, in words: `7`, or `aborted ACTION CAUSE`."""
    words = [
        f"aborted {s.action} {s.cause}" if isinstance(s, ActionAbortedError) else str(s)
        for s in seen
    ]
    return "; ".join(words)


def check_outcome(
    where: str,
    action: str,
    phase: ActionPhase,
    result: flowsdk.ControlResult,
    seen: str,
    run_live: bool,
) -> list[str]:
    """Whichever side won, the abort's answer and what the parent saw agree with `phase`."""
    if phase is ActionPhase.SUCCEEDED:
        if seen != "7":
            return [f"{where}: SUCCEEDED but the parent saw {seen!r}"]
        if result.outcome is not Outcome.ALREADY_ENDED:
            return [f"{where}: SUCCEEDED but the abort was {result.outcome.value}: {result}"]
        if run_live and "already finished: SUCCEEDED" not in result.message:
            return [f"{where}: the abort said {result.message!r}"]
        return []
    if phase is not ActionPhase.ABORTED:
        return [f"{where}: {action} is {phase.value}"]
    if seen != f"aborted {action} external":
        return [f"{where}: ABORTED but the parent saw {seen!r}"]
    if result.outcome is not Outcome.APPLIED:
        return [f"{where}: ABORTED but the abort was {result.outcome.value}: {result}"]
    return []


def check_stored(client: flowsdk.Client, run: str, action: str, phase: ActionPhase) -> list[str]:
    """The store holds `phase`, one terminal event, and the output iff SUCCEEDED (7)."""
    stored = client.get_action(run, action)
    where = f"{run}/{action}"
    problems = []
    if stored.action.phase is not phase:
        problems.append(f"{where}: stored {stored.action.phase.value}, ran {phase.value}")
    if _one_terminal_event(stored.events, action) != [phase.value]:
        problems.append(f"{where}: terminal events {_one_terminal_event(stored.events, action)}")
    output = None if stored.output is None else msgspec.msgpack.decode(stored.output)
    if output != (7 if phase is ActionPhase.SUCCEEDED else None):
        problems.append(f"{where}: {phase.value} with stored output {output!r}")
    return problems


def _abort_through_store(store: str, run: str) -> flowsdk.ControlResult:
    with flowsdk.Client(store) as client:
        return client.abort(run, "a1")


async def x3_local(folder: Path, iterations: int, rng: random.Random, thread: bool) -> list[str]:
    """X3 in this process: `RunHandle.abort` after loop steps, or `Client.abort` from a thread."""
    problems: list[str] = []
    outcomes: collections.Counter[str] = collections.Counter()
    loop = asyncio.get_running_loop()
    kind = "thread" if thread else "handle"
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="abort") as pool:
        for first in range(0, iterations, 100):
            path = folder / f"x3-{kind}-{first}.db"
            store = f"sqlite:///{path}"
            ran: dict[str, ActionPhase] = {}
            for i in range(first, min(first + 100, iterations)):
                name = f"x3-{kind}-{i}"
                yields = rng.randrange(10)
                if thread:
                    # The abort takes 1 to 20 ms to arrive; one run in five ends at once.
                    race.reset(delay=rng.uniform(0, 0.03), hold=rng.random() < 0.8)
                else:
                    race.reset()
                handle = await flowsdk.start(root, name=name, store=store)
                await race.gate.wait_running()
                race.gate.release()
                if thread:
                    result = await loop.run_in_executor(pool, _abort_through_store, store, name)
                else:
                    for _ in range(yields):
                        await asyncio.sleep(0)
                    result = await handle.abort("a1")
                race.answered.set()
                run = await handle.wait()
                phase = run.action("a1").phase
                problems += check_outcome(name, "a1", phase, result, saw(race.seen), race.hold)
                if _one_terminal_event(run.events, "a1") != [phase.value]:
                    problems.append(f"{name}: in memory, not one terminal event for a1")
                if run.phase is not RunPhase.SUCCEEDED:
                    problems.append(f"{name}: the run is {run.phase.value}")
                ran[name] = phase
                outcomes[phase.value] += 1
            with flowsdk.Client(store) as client:
                for name, phase in ran.items():
                    problems += check_stored(client, name, "a1", phase)
    shown = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    print(f"X3 {kind}: {iterations} races in {time.monotonic() - started:.0f} s: {shown}")
    problems += _both_sides_won(f"X3 {kind}", outcomes, iterations)
    return problems


def _both_sides_won(what: str, outcomes: collections.Counter[str], iterations: int) -> list[str]:
    # Not a check of flowsdk: that the campaign raced at all. Too few races may all go one way.
    if iterations >= 100 and not (outcomes["SUCCEEDED"] and outcomes["ABORTED"]):
        return [f"{what}: one side never won ({dict(outcomes)}): the race was not exercised"]
    return []


# The runner of `--x3-process`: its root runs N children one after the other; each
# says where it is, waits for the campaign's go and its delay, then returns 7.
lines: asyncio.Queue[str] | None = None


def _read_stdin(loop: asyncio.AbstractEventLoop, into: asyncio.Queue[str]) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(into.put_nowait, line.strip())


async def _line(prefix: str) -> list[str]:
    """The next line from the campaign starting with `prefix` (older ones are skipped)."""
    assert lines is not None
    while True:
        words = (await lines.get()).split()
        if words[:2] == prefix.split():
            return words


@env.task
async def racer(i: int) -> int:
    say("AT", i, flowsdk.current_action().name)
    go = await _line(f"go {i}")
    await asyncio.sleep(float(go[2]))  # the race under test: returns after the given delay
    return 7


@env.task
async def racers(n: int) -> int:
    global lines
    lines = asyncio.Queue()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_read_stdin, args=(loop, lines), daemon=True).start()
    for i in range(n):
        try:
            say("SEEN", i, await racer(i))
        except ActionAbortedError as exc:
            say("SEEN", i, "aborted", exc.action, exc.cause)
        await _line(f"next {i}")
    return n


class _Lines:
    """A runner's output lines, read by a thread, taken with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line.strip())
        self._queue.put(None)

    def expect(self, first: str) -> list[str]:
        while True:
            line = self._queue.get(timeout=WAIT)
            if line is None:
                raise EOFError("the runner exited:\n" + "\n".join(self.seen[-40:]))
            self.seen.append(line)
            if line.split()[:1] == [first]:
                return line.split()


def x3_process(folder: Path, iterations: int, rng: random.Random) -> list[str]:
    """X3 across processes: `Client.abort` from here, the child in a runner process."""
    problems: list[str] = []
    outcomes: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    store = f"sqlite:///{folder / 'x3-process.db'}"
    per_runner = 250
    with flowsdk.Client(store) as client:
        for first in range(0, iterations, per_runner):
            n = min(per_runner, iterations - first)
            name = f"x3-process-{first}"
            proc = _spawn("--x3-runner", store, name, str(n))
            out = _Lines(proc)
            ran: dict[str, tuple[flowsdk.ControlResult, str]] = {}
            try:
                assert proc.stdin is not None
                for i in range(n):
                    action = out.expect("AT")[2]
                    proc.stdin.write(f"go {i} {rng.uniform(0, 0.03):.4f}\n")
                    proc.stdin.flush()
                    result = client.abort(name, action)
                    ran[action] = (result, " ".join(out.expect("SEEN")[2:]))
                    proc.stdin.write(f"next {i}\n")
                    proc.stdin.flush()
                proc.stdin.close()
                code = proc.wait(timeout=WAIT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if code != 0:
                problems.append(f"{name}: runner exit {code}: {out.seen[-5:]}")
            # The store decides who won; the abort's answer and the parent must agree.
            for action, (result, seen) in ran.items():
                phase = client.get_action(name, action).action.phase
                where = f"{name}/{action}"
                problems += check_outcome(where, action, phase, result, seen, True)
                problems += check_stored(client, name, action, phase)
                outcomes[phase.value] += 1
    shown = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    print(f"X3 process: {iterations} races in {time.monotonic() - started:.0f} s: {shown}")
    problems += _both_sides_won("X3 process", outcomes, iterations)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--runners", type=int, default=20)
    parser.add_argument("--leaves", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--x3", type=int, default=1000)
    parser.add_argument("--x3-thread", type=int, default=1000)
    parser.add_argument("--x3-process", type=int, default=1000)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    print(f"race campaigns, seed {seed}", flush=True)
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.rounds and args.runners:
            problems += p14(folder / "p14.db", args.runners, args.leaves, args.rounds)
        if args.x3:
            problems += asyncio.run(x3_local(folder, args.x3, rng, thread=False))
        if args.x3_thread:
            problems += asyncio.run(x3_local(folder, args.x3_thread, rng, thread=True))
        if args.x3_process:
            problems += x3_process(folder, args.x3_process, rng)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("ok" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fan-out-runner"]:
        store, name, n, folder = sys.argv[2:6]
        sys.exit(fan_out_runner(store, name, int(n), Path(folder)))
    if sys.argv[1:2] == ["--x3-runner"]:
        store, name, n = sys.argv[2:5]
        run = flowsdk.run(racers, int(n), name=name, store=store)
        say("RESULT", run.phase.value)
        sys.exit(0 if run.phase is RunPhase.SUCCEEDED else 1)
    sys.exit(main())
