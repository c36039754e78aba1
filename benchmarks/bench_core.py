"""Core overhead of flowsdk against bare asyncio, in the same process (SPEC section 10).

Each measure runs the same shape twice, once with bare asyncio and once with
flowsdk on the memory store, interleaved, each sample on a fresh event loop,
and reports the median of the repetitions and the ratio flowsdk / bare:

- (a) sequential awaited calls: bare `await asyncio.create_task(child())` (one
  Task per call) against `await child()` inside a root task; the whole run is
  timed, so recording and building the `Run` are included. Per action, in us.
- (b) fan-out: `asyncio.gather` of 1,000 and 10,000 children, whole run timed.
- (c) memory per in-flight action: 10,000 children suspended on an event; the
  `tracemalloc` difference while all of them wait, divided by 10,000, in KB; on
  the memory store and on a SQLite file (whose writer also holds the rows it has
  not written yet). A note gives the design's floor: the same sleepers in bare
  asyncio with only the two Tasks a call in a task of its own has.
- (d) cancel 1,000 running children: from the first `t.cancel()` until a
  `gather(..., return_exceptions=True)` over them has returned.
- (e) abort at the root of a chain of depth 2,000 where each level awaits
  `asyncio.create_task(next level)`: from `RunHandle.abort()` until the run
  has ended. Bare asyncio cannot cancel the top of such a chain (Task.cancel()
  recurses down the await chain and breaks near depth 1,000 on 3.11),
  so its column cancels the leaf and lets the cancel unwind to the top.
- (f) `import flowsdk` against `import asyncio` alone: wall time of each in a
  fresh subprocess minus `python -c "pass"`, interleaved.
- (g) a whole short run: `flowsdk.run` of a task that returns at once (a fresh
  loop, its signal handling, the run recorded and its `Run` built) against
  `asyncio.run` of a coroutine that does, per run, in ms (informational).

Samples (a), (b) and (d) are CPU time of this process (`time.process_time`),
so that other processes on a shared machine do not add their noise. What noise
is left shows in the `spread` column: the lowest and highest ratio of the
interleaved pairs (a bare sample, then flowsdk's); the verdict reads the medians.

The targets are SPEC section 10's. The machines are shared and noisy: read the
ratios, not the absolute times. The script always exits 0; it reports, it does
not gate. `--quick` uses smaller sizes and fewer repetitions (for the smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _sleepers import Gate, traced_kb_per_item, two_task_floor

import flowsdk

STORE = "memory://"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """The shapes of one benchmark run."""

    reps: int
    seq: int
    fan: tuple[int, ...]
    sleepers: int
    cancel: int
    depth: int


FULL = Sizes(reps=5, seq=1_000, fan=(1_000, 10_000), sleepers=10_000, cancel=1_000, depth=2_000)
QUICK = Sizes(reps=3, seq=200, fan=(200, 1_000), sleepers=1_000, cancel=200, depth=200)


@dataclass
class Row:
    """One line of the report: medians of both sides and the verdict against the target."""

    measure: str
    unit: str
    bare: float | None = None
    flow: float | None = None
    max_ratio: float | None = None
    max_value: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    # The ratio of each interleaved pair (a bare sample, then flowsdk's), for the spread.
    pairs: list[float] = field(default_factory=list)

    @property
    def spread(self) -> str:
        """The lowest and highest ratio of the interleaved pairs, or `-` with fewer than two."""
        if len(self.pairs) < 2:
            return "-"
        return f"{min(self.pairs):.2f}-{max(self.pairs):.2f}x"

    @property
    def ratio(self) -> float | None:
        """Flowsdk's median over bare asyncio's, when both exist."""
        if self.bare is None or self.flow is None or self.bare <= 0:
            return None
        return self.flow / self.bare

    @property
    def target(self) -> str:
        """SPEC section 10's target, as printed."""
        if self.max_ratio is not None:
            return f"<= {self.max_ratio:g}x"
        if self.max_value is not None:
            return f"<= {self.max_value:g} {self.unit}"
        return "-"

    @property
    def verdict(self) -> str:
        """`ok`, `MISS`, `info` (no target), `n/a` or the error that stopped the measure."""
        if self.error is not None:
            return f"error: {self.error}"
        if self.max_ratio is not None:
            ratio = self.ratio
            if ratio is None:
                return "n/a"
            return "ok" if ratio <= self.max_ratio else "MISS"
        if self.max_value is not None:
            if self.flow is None:
                return "n/a"
            return "ok" if self.flow <= self.max_value else "MISS"
        return "info"


# CPU time of this process (every thread: a store's writer thread is counted): on
# a shared machine, time other processes take from it does not count against
# either side. Wall time would add their noise.
_clock = time.process_time


def _sample(make: Callable[[], Coroutine[Any, Any, float]]) -> float:
    """Run one sample on a fresh event loop after a full collection."""
    gc.collect()
    return asyncio.run(make())


def _measure(
    row: Row,
    bare: Callable[[], Coroutine[Any, Any, float]] | None,
    flow: Callable[[], Coroutine[Any, Any, float]],
    reps: int,
    scale: float,
) -> Row:
    """Fill `row` with the medians of `reps` interleaved samples, multiplied by `scale`."""
    bare_samples: list[float] = []
    flow_samples: list[float] = []
    try:
        for _ in range(reps):
            if bare is not None:
                bare_samples.append(_sample(bare))
            flow_samples.append(_sample(flow))
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:120]
        return row
    if bare_samples:
        row.bare = statistics.median(bare_samples) * scale
        row.pairs = [f / b for b, f in zip(bare_samples, flow_samples, strict=True) if b > 0]
    row.flow = statistics.median(flow_samples) * scale
    return row


def _check(run: flowsdk.Run[Any], phase: flowsdk.RunPhase, actions: int) -> None:
    """Make sure a flowsdk sample measured the shape it claims to."""
    if run.phase is not phase or len(run.actions) != actions:
        raise RuntimeError(f"unexpected run: {run.phase.value} with {len(run.actions)} actions")


# -- the shapes of (a) and (b), shared with bench_store.py --------------------------------

env = flowsdk.TaskEnvironment("bench")


@env.task
async def child() -> int:
    await asyncio.sleep(0)
    return 1


@env.task
async def sequential_root(n: int) -> int:
    total = 0
    for _ in range(n):
        total += await child()
    return total


@env.task
async def fan_out_root(n: int) -> int:
    return sum(await asyncio.gather(*(child() for _ in range(n))))


async def bare_child() -> int:
    await asyncio.sleep(0)
    return 1


async def bare_sequential(n: int) -> int:
    total = 0
    for _ in range(n):
        total += await asyncio.create_task(bare_child())
    return total


async def bare_fan_out(n: int) -> int:
    return sum(await asyncio.gather(*(bare_child() for _ in range(n))))


Sample = Callable[[], Coroutine[Any, Any, float]]


def bare_sample(shape: Callable[[int], Coroutine[Any, Any, int]], n: int) -> Sample:
    """A sample timing bare asyncio's `shape(n)` in a task of its own."""

    async def sample() -> float:
        start = _clock()
        await asyncio.create_task(shape(n))
        return _clock() - start

    return sample


def flow_sample(task: flowsdk.Task[[int], int], n: int, store: Callable[[], Any]) -> Sample:
    """A sample timing the whole `flowsdk.run_async(task, n)`: creating, recording, closing."""

    async def sample() -> float:
        start = _clock()
        run = await flowsdk.run_async(task, n, store=store())
        elapsed = _clock() - start
        _check(run, flowsdk.RunPhase.SUCCEEDED, n + 1)
        return elapsed

    return sample


def _memory() -> str:
    return STORE


def sequential(sizes: Sizes) -> Row:
    n = sizes.seq
    row = Row(f"(a) sequential awaited calls, N={n:,}, per action", "us", max_ratio=1.5)
    flow = flow_sample(sequential_root, n, _memory)
    return _measure(row, bare_sample(bare_sequential, n), flow, sizes.reps, 1e6 / n)


def fan_out(sizes: Sizes, n: int) -> Row:
    row = Row(f"(b) gather fan-out of {n:,} children", "ms", max_ratio=3)
    flow = flow_sample(fan_out_root, n, _memory)
    return _measure(row, bare_sample(bare_fan_out, n), flow, sizes.reps, 1e3)


NEWER_PYTHON: bool = sys.version_info >= (3, 12)


def fan_out_newer_python(measured: Row, n: int) -> Row:
    """SPEC §10's fan-out target for Python 3.12+ (where tasks can start eagerly).

    The same measure as `measured` (the fan-out of `n`), against 2x; on an older
    Python the row says which interpreter it needs.
    """
    row = Row(f"(b) gather fan-out of {n:,} children, Python 3.12+", "ms", max_ratio=2)
    if not NEWER_PYTHON:
        row.notes.append(
            f"(b) the Python 3.12+ row is measured by this script run with Python 3.12 or "
            f"newer (this is {platform.python_version()})"
        )
        return row
    row.bare, row.flow, row.error = measured.bare, measured.flow, measured.error
    row.pairs = measured.pairs
    return row


# -- (c) memory per in-flight action ------------------------------------------------------


def memory(sizes: Sizes, store: str = STORE, max_ratio: float = 1.5) -> Row:
    n = sizes.sleepers

    async def bare() -> float:
        gate = Gate(n)

        async def sleeper() -> None:
            gate.arrive()
            await gate.release.wait()

        return await traced_kb_per_item(gate, lambda: asyncio.create_task(sleeper()))

    async def flow() -> float:
        env = flowsdk.TaskEnvironment("bench")
        gate = Gate(n)

        @env.task
        async def sleeper() -> None:
            gate.arrive()
            await gate.release.wait()

        @env.task
        async def root() -> float:
            return await traced_kb_per_item(gate, lambda: asyncio.create_task(sleeper()))

        run = await flowsdk.run_async(root, store=store)
        _check(run, flowsdk.RunPhase.SUCCEEDED, n + 1)
        return run.result()

    kind = store.split("://")[0]
    row = Row(
        f"(c) memory per in-flight action, {n:,} sleepers, {kind} store", "KB", max_ratio=max_ratio
    )
    _measure(row, bare, flow, sizes.reps, 1.0)
    if kind == "memory" and row.bare:
        floor = statistics.median(_sample(lambda: two_task_floor(n)) for _ in range(sizes.reps))
        row.notes.append(
            f"(c) the design's floor: {floor:.2f} KB ({floor / row.bare:.2f}x bare), the same "
            "sleepers in bare asyncio with only the structure a call in a task of its own has: "
            "its Task awaiting a future, the body in a second Task that sets a context "
            "variable and resolves that future (one Task would let a body that swallows an "
            "abort keep its caller waiting, SPEC section 2)"
        )
    return row


# -- (d) cancel running children ------------------------------------------------------------


async def _time_cancel(gate: Gate, spawn: Callable[[], asyncio.Task[Any]]) -> float:
    tasks = [spawn() for _ in range(gate.expected)]
    await gate.all_in.wait()
    start = _clock()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return _clock() - start


def cancel(sizes: Sizes) -> Row:
    n = sizes.cancel

    async def bare() -> float:
        gate = Gate(n)

        async def sleeper() -> None:
            gate.arrive()
            await asyncio.sleep(3600)

        return await _time_cancel(gate, lambda: asyncio.create_task(sleeper()))

    async def flow() -> float:
        env = flowsdk.TaskEnvironment("bench")
        gate = Gate(n)

        @env.task
        async def sleeper() -> None:
            gate.arrive()
            await asyncio.sleep(3600)

        @env.task
        async def root() -> float:
            return await _time_cancel(gate, lambda: asyncio.create_task(sleeper()))

        run = await flowsdk.run_async(root, store=STORE)
        _check(run, flowsdk.RunPhase.SUCCEEDED, n + 1)
        return run.result()

    row = Row(f"(d) cancel {n:,} running children", "ms", max_ratio=2.5)
    return _measure(row, bare, flow, sizes.reps, 1e3)


# -- (e) abort a deep chain -----------------------------------------------------------------


def abort_chain(sizes: Sizes) -> Row:
    depth = sizes.depth

    async def bare() -> float:
        bottom: list[asyncio.Task[Any]] = []
        reached = asyncio.Event()

        async def level(n: int) -> None:
            if n == 0:
                task = asyncio.current_task()
                assert task is not None
                bottom.append(task)
                reached.set()
                await asyncio.sleep(3600)
            else:
                await asyncio.create_task(level(n - 1))

        top = asyncio.create_task(level(depth))
        await reached.wait()
        start = time.perf_counter()
        bottom[0].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await top
        return time.perf_counter() - start

    async def flow() -> float:
        env = flowsdk.TaskEnvironment("bench")
        reached = asyncio.Event()

        @env.task
        async def level(n: int) -> None:
            if n == 0:
                reached.set()
                await asyncio.sleep(3600)
            else:
                await asyncio.create_task(level(n - 1))

        handle = await flowsdk.start(level, depth, store=STORE)
        await reached.wait()
        start = time.perf_counter()
        await handle.abort(reason="benchmark")
        run = await handle.wait()
        elapsed = time.perf_counter() - start
        _check(run, flowsdk.RunPhase.ABORTED, depth + 1)
        return elapsed

    row = Row(f"(e) abort the root of a depth-{depth:,} chain", "ms")
    row.notes.append(
        "(e) bare column: the leaf is cancelled and the cancel unwinds to the top. Cancelling "
        "the top task instead recurses through Task.cancel() and raises RecursionError, leaving "
        "the chain pending, so that variant is n/a"
    )
    return _measure(row, bare, flow, sizes.reps, 1e3)


# -- (g) a short run, whole ------------------------------------------------------------------


@env.task
async def returns_at_once() -> int:
    return 1


async def _bare_returns_at_once() -> int:
    return 1


def short_run(sizes: Sizes) -> Row:
    """`flowsdk.run` of a task that returns at once against `asyncio.run` of a coroutine.

    Each is called as a script would, from the main thread: a fresh event loop,
    `flowsdk.run`'s signal handling, the run recorded on the memory store and
    its `Run` built. CPU time per run, interleaved, after a full collection.
    """
    row = Row("(g) a run that returns at once, flowsdk.run vs asyncio.run", "ms")
    bare: list[float] = []
    flow: list[float] = []
    for _ in range(max(sizes.reps, 3) * 6):
        gc.collect()
        start = _clock()
        asyncio.run(_bare_returns_at_once())
        bare.append(_clock() - start)
        gc.collect()
        start = _clock()
        flowsdk.run(returns_at_once, store=STORE)
        flow.append(_clock() - start)
    row.bare = statistics.median(bare) * 1e3
    row.flow = statistics.median(flow) * 1e3
    return row


# -- (f) import time ------------------------------------------------------------------------


def _wall(code: str, *options: str) -> tuple[float, str]:
    # As a user's installed package would: bytecode cached (some shells set
    # PYTHONDONTWRITEBYTECODE, which makes every import compile from source).
    skip = {"FLOWSDK_STORE", "PYTHONDONTWRITEBYTECODE"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *options, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - start, done.stderr


def _importtime_ms(stderr: str) -> float | None:
    """The cumulative time `-X importtime` reports for the `flowsdk` package, in ms."""
    for line in stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == "flowsdk":
            return int(parts[1].strip()) / 1e3
    return None


def import_time(sizes: Sizes) -> Row:
    row = Row("(f) import flowsdk vs import asyncio (fresh subprocess)", "ms", max_ratio=1.3)
    bare: list[float] = []
    flow: list[float] = []
    cumulative: list[float] = []
    try:
        _wall("import flowsdk")  # writes the bytecode cache, as an install would
        for _ in range(max(sizes.reps, 3) * 3):
            empty, _ = _wall("pass")
            alone, _ = _wall("import asyncio")
            full, _ = _wall("import flowsdk")
            bare.append(alone - empty)
            flow.append(full - empty)
        for _ in range(3):
            _, report = _wall("import flowsdk", "-X", "importtime")
            ms = _importtime_ms(report)
            if ms is not None:
                cumulative.append(ms)
    except (OSError, subprocess.CalledProcessError) as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:120]
        return row
    row.bare = statistics.median(bare) * 1e3
    row.flow = statistics.median(flow) * 1e3
    if cumulative:
        row.notes.append(
            f"(f) -X importtime cumulative for flowsdk: {statistics.median(cumulative):.1f} ms "
            "(median); the table shows wall time minus an empty interpreter's, interleaved"
        )
    return row


# -- report ---------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f} {unit}"
    if value >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.2f} {unit}"


def render(rows: Sequence[Row]) -> str:
    """Format the rows as an aligned table, followed by their notes.

    A `spread` column (the lowest and highest ratio of the interleaved pairs)
    is shown when a row has pairs: how far the machine's noise moved the ratio
    the verdict reads as a median.
    """
    spread = any(r.pairs for r in rows)
    header = ("measure", "bare asyncio", "flowsdk", "ratio", *(("spread",) * spread), "target")
    lines = [
        (
            r.measure,
            _fmt(r.bare, r.unit),
            _fmt(r.flow, r.unit),
            "n/a" if r.ratio is None else f"{r.ratio:.2f}x",
            *((r.spread,) * spread),
            r.target,
            r.verdict,
        )
        for r in rows
    ]
    header = (*header, "verdict")
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    right = {1, 2, 3, 4} if spread else {1, 2, 3}

    def fmt(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    out.extend(fmt(line) for line in lines)
    notes = [note for r in rows for note in r.notes]
    if spread:
        notes.append(
            "spread: the lowest and highest ratio of the interleaved pairs (a sample of the "
            "bare column, then flowsdk's); the ratio and the verdict are the medians'"
        )
    if notes:
        out.append("")
        out.extend(f"note {note}" for note in notes)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, print the table, and return 0 (benchmarks report, never gate)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, fewer repetitions (smoke test)"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    print(
        f"flowsdk {getattr(flowsdk, '__version__', '?')} vs bare asyncio | "
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs | store {STORE} | median of {sizes.reps} "
        f"({'quick' if args.quick else 'full'} mode)",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-core-") as folder:
        rows = _rows(sizes, folder)
    print()
    print(render(rows))
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
    return 0


def _rows(sizes: Sizes, folder: str) -> list[Row]:
    fans = [fan_out(sizes, n) for n in sizes.fan]
    return [
        sequential(sizes),
        *fans,
        fan_out_newer_python(fans[-1], sizes.fan[-1]),
        memory(sizes),
        # The SQLite store also holds the rows its writer has not written yet (SPEC §10: 2x).
        memory(sizes, "sqlite:///" + str(Path(folder) / "flowsdk.db"), max_ratio=2.0),
        cancel(sizes),
        abort_chain(sizes),
        import_time(sizes),
        short_run(sizes),
    ]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
