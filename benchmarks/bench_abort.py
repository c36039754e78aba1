"""External abort latency: from the control call returning to `CancelledError` in the body.

A runner subprocess (this script with `--runner`) runs a workflow on a SQLite
store whose root awaits one target action after another. Each target prints
`STARTED aN` and sleeps; when `CancelledError` reaches it, it takes
`time.time()` first and then prints `CANCELLED aN <time>`. This process aborts
each target by name and takes `time.time()` when the call returns:

- `Client.abort(run, action)` from this process (a second process);
- `python -m flowsdk abort RUN ACTION --store URL` (a third process), until it exits.

Latency = time of `CancelledError` in the body - time the call returned (both
`time.time()` of the same machine). The runner applies a request on its loop
*before* it writes the answer the caller is waiting for, so the body normally
gets `CancelledError` before the call returns: those latencies are negative,
and reported as they are (a negative p99 means every delivery but the slowest
1 % happened before the caller was told). The table also shows the time from
the start of the call to the `CancelledError`, which is the delay an operator
sees from pressing enter; for the CLI it includes starting Python.

Targets (SPEC §10): p50 <= 30 ms and p99 <= 100 ms, measured from the return.
200 trials per mode (`--quick`: fewer).

A second table measures whether a control request costs the same on a large run
(SPEC §10: "a control request on a run of 100 vs 20,000 recorded actions: the
same cost (<= 2x from smallest to largest), <= 30 ms p50"). For each size a
fresh runner subprocess records a run of that many actions: the root, finished
`filler` actions, then one live `target` at a time. This process times
`Client.abort(run, target)` from the call until it returns (the runner has
applied it) and until the body's `except CancelledError` runs (the body prints
its `time.time()`). Each later target adds one aborted action, so the run grows
by one action per trial; one warm-up abort per size (opening the store's
connection) is not counted. 15 trials per size (`--quick`: 5), so the table
stays under half a minute while a large run costs ~1 s per abort; with fewer
than 100 trials p99 is the slowest trial.

The script reports and always exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_core import Row, render

import flowsdk
from flowsdk.errors import ActionAbortedError

env = flowsdk.TaskEnvironment("bench_abort")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@env.task
async def target() -> None:
    name = flowsdk.current_action().name
    _say(f"STARTED {name}")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        at = time.time()
        _say(f"CANCELLED {name} {at:.6f}")
        raise


@env.task
async def trials(n: int) -> int:
    aborted = 0
    for _ in range(n):
        with contextlib.suppress(ActionAbortedError):
            await target()
        aborted += 1
    return aborted


def runner(store: str, run: str, n: int) -> int:
    """The runner process: `n` targets, one after another, each waiting to be aborted."""
    flowsdk.run(trials, n, name=run, store=store)
    return 0


# Fillers are started this many at a time: recording 20,000 one after another
# would take most of the time budget, and all at once would hold 20,000 tasks.
FILL_WAVE = 1_000


@env.task
async def filler() -> None:
    """Finish at once: a recorded action the control request must not have to read."""


@env.task
async def sized_trials(fillers: int, n: int) -> int:
    for start in range(0, fillers, FILL_WAVE):
        await asyncio.gather(*(filler() for _ in range(min(FILL_WAVE, fillers - start))))
    return await trials(n)


def sized_runner(store: str, run: str, size: int, n: int) -> int:
    """The runner process of a sized run: `size` recorded actions when the first target starts.

    They are the root, `size - 3` finished fillers, the `trials` action, and
    the first target; each later target adds one more.
    """
    flowsdk.run(sized_trials, max(0, size - 3), n, name=run, store=store)
    return 0


class Trials:
    """Reads the runner's lines and keeps, for each abort, the call's start, return and delivery."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.from_return: list[float] = []
        self.from_call: list[float] = []
        self.call_to_return: list[float] = []

    def next_target(self) -> str:
        """Wait for the next target to start; return its action name."""
        return self._line("STARTED")[1]

    def delivered(self, action: str, called: float, returned: float) -> None:
        """Wait for `action`'s CancelledError; keep its latencies in ms."""
        _, name, at = self._line("CANCELLED")
        if name != action:
            raise RuntimeError(f"{action} was aborted but {name} was cancelled")
        self.from_return.append((float(at) - returned) * 1e3)
        self.from_call.append((float(at) - called) * 1e3)
        self.call_to_return.append((returned - called) * 1e3)

    def _line(self, word: str) -> list[str]:
        stdout = self.proc.stdout
        assert stdout is not None
        while True:
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"the runner exited before printing {word}")
            parts = line.split()
            if parts and parts[0] == word:
                return parts


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _rows(label: str, trials: Trials) -> list[Row]:
    n = len(trials.from_return)
    rows = []
    for q, limit in ((50, 30.0), (99, 100.0)):
        rows.append(
            Row(
                f"{label} returns -> CancelledError, p{q} ({n} trials)",
                "ms",
                flow=_percentile(trials.from_return, q),
                max_value=limit,
            )
        )
    rows.extend(
        Row(f"{label} called -> CancelledError, p{q}", "ms", flow=_percentile(trials.from_call, q))
        for q in (50, 99)
    )
    negative = sum(v < 0 for v in trials.from_return)
    rows[0].notes.append(
        f"{label}: {negative} of {n} deliveries happened before the call returned "
        f"(min {min(trials.from_return):.1f} ms, max {max(trials.from_return):.1f} ms, "
        f"mean {statistics.mean(trials.from_return):.1f} ms)"
    )
    return rows


def measure(client_trials: int, cli_trials: int, url: str | None = None) -> list[Row]:
    """Start a runner, abort its targets through the Client then the CLI; return the rows.

    The store is a new SQLite file, or `url` (an empty store: the PostgreSQL column).
    """
    with tempfile.TemporaryDirectory(prefix="bench-abort-") as folder:
        store = url or "sqlite:///" + str(Path(folder) / "flowsdk.db")
        run = "bench-abort"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--runner", store, run, str(client_trials + cli_trials)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            by_client, by_cli = Trials(proc), Trials(proc)
            with flowsdk.Client(store) as client:
                for _ in range(client_trials):
                    action = by_client.next_target()
                    called = time.time()
                    client.abort(run, action, reason="benchmark")
                    by_client.delivered(action, called, time.time())
            cli = [sys.executable, "-m", "flowsdk", "abort", "--store", store, run]
            for _ in range(cli_trials):
                action = by_cli.next_target()
                called = time.time()
                subprocess.run([*cli, action], check=True, capture_output=True)
                by_cli.delivered(action, called, time.time())
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
            if proc.stdout is not None:
                proc.stdout.close()
    rows = _rows("Client.abort", by_client)
    if cli_trials:
        rows += _rows("python -m flowsdk abort", by_cli)
    return rows


# The run sizes SPEC §10 compares (its 1,000,000-action size would take minutes
# to record, so this benchmark stops at 20,000).
SMALL_RUN, LARGE_RUN = 100, 20_000


def measure_sized(size: int, n: int) -> Trials:
    """Record a run of `size` actions in a runner subprocess; abort `n` live targets in it.

    One more target is aborted first, as a warm-up, and not kept.
    """
    with tempfile.TemporaryDirectory(prefix="bench-abort-sized-") as folder:
        store = "sqlite:///" + str(Path(folder) / "flowsdk.db")
        run = f"bench-abort-{size}"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--sized-runner", store, run, str(size), str(n + 1)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            warm_up, kept = Trials(proc), Trials(proc)
            with flowsdk.Client(store) as client:
                for by in [warm_up] + [kept] * n:
                    action = by.next_target()
                    called = time.time()
                    client.abort(run, action, reason="benchmark")
                    by.delivered(action, called, time.time())
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
            if proc.stdout is not None:
                proc.stdout.close()
    return kept


def sized_rows(small: Trials, large: Trials) -> list[Row]:
    """Rows for the same abort on a small and a large run, and the large/small ratio of p50s."""
    rows: list[Row] = []
    for size, by in ((SMALL_RUN, small), (LARGE_RUN, large)):
        n = len(by.call_to_return)
        label = f"Client.abort on a run of {size:,} actions"
        rows += [
            # SPEC §10's control-request row: <= 30 ms p50, at any size.
            Row(
                f"{label}, called -> returned, p50 ({n} trials)",
                "ms",
                flow=_percentile(by.call_to_return, 50),
                max_value=30.0,
            ),
            Row(f"{label}, called -> returned, p99", "ms", flow=_percentile(by.call_to_return, 99)),
            # SPEC §10's external-abort row: Client.abort called -> CancelledError.
            Row(
                f"{label}, called -> CancelledError, p50",
                "ms",
                flow=_percentile(by.from_call, 50),
                max_value=30.0,
            ),
            Row(
                f"{label}, called -> CancelledError, p99",
                "ms",
                flow=_percentile(by.from_call, 99),
                max_value=100.0,
            ),
        ]
    # The ratio column is flow / bare: the small run stands in the "bare" column.
    rows.append(
        Row(
            f"Client.abort called -> returned, p50, {LARGE_RUN:,} vs {SMALL_RUN:,} actions",
            "ms",
            bare=_percentile(small.call_to_return, 50),
            flow=_percentile(large.call_to_return, 50),
            max_ratio=2.0,
        )
    )
    rows[-1].notes.append(
        f"the {SMALL_RUN:,}-action p50 is in the 'bare asyncio' column of the last row; "
        f"each run grows by one action per trial ({len(small.call_to_return) + 1} trials "
        "with the warm-up)"
    )
    return rows


def _cli_exists() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "flowsdk", "abort", "--help"], capture_output=True, check=False
    )
    return done.returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, and return 0 (benchmarks report, never gate)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--runner"]:
        return runner(args[1], args[2], int(args[3]))
    if args[:1] == ["--sized-runner"]:
        return sized_runner(args[1], args[2], int(args[3]), int(args[4]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer trials (smoke test)")
    options = parser.parse_args(args)
    client_trials = 20 if options.quick else 200
    cli_trials = (5 if options.quick else 200) if _cli_exists() else 0
    print(
        f"flowsdk {flowsdk.__version__}: external abort latency, SQLite store | "
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs ({'quick' if options.quick else 'full'} mode)",
        flush=True,
    )
    started = time.perf_counter()
    rows = measure(client_trials, cli_trials)
    if not cli_trials:
        rows[0].notes.append("python -m flowsdk abort: no CLI in this version; not measured")
    print()
    print(render(rows))
    per_size = 5 if options.quick else 15
    small = measure_sized(SMALL_RUN, per_size)
    large = measure_sized(LARGE_RUN, per_size)
    print(f"\ncontrol request vs run size, SQLite store, {per_size} trials per size\n")
    print(render(sized_rows(small, large)))
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
