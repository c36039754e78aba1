"""Cost of recording runs in the SQLite and PostgreSQL stores, against bare asyncio (SPEC §10).

The core shapes of bench_core.py, run three ways in the same process and
interleaved, each sample on a fresh event loop after a full collection:

- (a) sequential awaited calls: a root awaits N children one after another
  (bare asyncio: `await asyncio.create_task(child())`, one Task per call);
  per action, in us;
- (b) fan-out: a root gathers 10,000 children; in ms;
- (c) replay on retry: a run records N succeeded children, then its root
  fails; `Client.retry` replays the N children. The "bare" column is the cost
  of recording one succeeded action in the first attempt, the flowsdk column
  the cost of replaying it in the retry (target: replay <= 2x recording);
- (d) payloads: N sequential children each taking and returning a payload of
  1 KiB or 1 MiB (bytes), SQLite store, against bare asyncio passing the same
  bytes; per action.

Each flowsdk sample times the whole `flowsdk.run_async`, so creating the run,
recording every action and event, flushing the last write and closing the
recorder are included. The SQLite store is a file in a temporary directory;
every sample is a new run in that same file, so the history grows as it does
in use. The table shows the median of the repetitions (at least 5) and the
ratio to bare asyncio; the targets are SPEC §10's. The machines are shared and
noisy: read the ratios, not the absolute times. The script reports and always
exits 0. `--quick` uses smaller sizes (for the smoke test).

The PostgreSQL column (SPEC §9): (a) and (b) on a new database of a
throwaway server this script starts (as the tests do; or the server at
$FLOWSDK_TEST_POSTGRES), against the SQLite store (target <= 2x). Its samples
add the CPU time of the server's processes (read from /proc: the postmaster,
its live children and the children it has reaped), since the SQLite store's
work is all in this process; a server this script cannot see (another host)
is said so in a note, and its rows count this process alone. Also
`Client.abort` called in this process -> `CancelledError` in a runner
process's body (bench_abort.py's measure on that server), p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_core import (
    Row,
    Sample,
    bare_fan_out,
    bare_sample,
    bare_sequential,
    child,
    fan_out_root,
    flow_sample,
    render,
    sequential_root,
)

import flowsdk
from flowsdk.store import MemoryStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's tests/ helpers
import bench_abort
import psycopg

from tests.pg_server import PostgresServer


@dataclass(frozen=True)
class Sizes:
    """The shapes of one benchmark run."""

    reps: int
    seq: int
    fan: int


FULL = Sizes(reps=7, seq=1_000, fan=10_000)
QUICK = Sizes(reps=5, seq=100, fan=1_000)
KIB, MIB = 1024, 1024 * 1024

env = flowsdk.TaskEnvironment("bench_store")


@env.task
async def replayable(n: int) -> int:
    total = 0
    for _ in range(n):
        total += await child()
    raise RuntimeError(f"fails after {total} children, so that the run can be retried")


@env.task
async def echo(payload: bytes) -> bytes:
    return payload


@env.task
async def payloads(n: int, size: int) -> int:
    data = bytes(size)
    for _ in range(n):
        data = await echo(data)
    return len(data)


async def _bare_echo(payload: bytes) -> bytes:
    return payload


async def _bare_payloads(n: int, size: int) -> int:
    data = bytes(size)
    for _ in range(n):
        data = await asyncio.create_task(_bare_echo(data))
    return len(data)


def _sample(make: Sample, samples: list[float]) -> None:
    gc.collect()
    samples.append(asyncio.run(make()))


def _pairs(bare: list[float], flow: list[float]) -> list[float]:
    """The ratio of each interleaved pair of samples (for the table's spread)."""
    return [f / b for b, f in zip(bare, flow, strict=False) if b > 0]


def measure(
    title: str,
    unit: str,
    scale: float,
    targets: tuple[float, float],
    sides: dict[str, Sample],
    reps: int,
) -> list[Row]:
    """Interleave `reps` samples of each side; return the memory, SQLite (and PostgreSQL) rows."""
    samples: dict[str, list[float]] = {side: [] for side in sides}
    error = None
    try:
        for _ in range(reps):
            for side, make in sides.items():
                _sample(make, samples[side])
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:120]
    bare = statistics.median(samples["bare"]) * scale if samples["bare"] else None
    rows = []
    for side, target in zip(("memory", "sqlite"), targets, strict=True):
        row = Row(f"{title}, {side} store", unit, bare=bare, max_ratio=target, error=error)
        if samples[side] and error is None:
            row.flow = statistics.median(samples[side]) * scale
            row.pairs = _pairs(samples["bare"], samples[side])
        rows.append(row)
    if "postgresql" in sides:
        # SPEC §10 sets PostgreSQL against SQLite: its "bare" column is the SQLite median.
        row = Row(
            f"{title}, postgresql store (bare column: sqlite store)",
            unit,
            bare=rows[1].flow,
            max_ratio=2,
            error=error,
        )
        if samples["postgresql"] and error is None:
            row.flow = statistics.median(samples["postgresql"]) * scale
            row.pairs = _pairs(samples["sqlite"], samples["postgresql"])
            row.notes.append(
                f"{title}, postgresql store: {row.flow / bare:.2f}x bare asyncio"
                if bare
                else "no bare asyncio median"
            )
        rows.append(row)
    return rows


def replay_rows(url: str, n: int, reps: int) -> Row:
    """(c): the cost per action of replaying a recorded success, against recording it."""
    row = Row(
        f"(c) replay on retry, N={n:,}, per action (bare column: recording it)",
        "us",
        max_ratio=2,
    )
    recorded: list[float] = []
    replayed: list[float] = []
    try:
        with flowsdk.Client(url) as client:
            for rep in range(reps):
                name = f"replay-{os.getpid()}-{rep}"
                gc.collect()
                start = time.perf_counter()
                first = flowsdk.run(replayable, n, name=name, store=url)
                recorded.append(time.perf_counter() - start)
                gc.collect()
                start = time.perf_counter()
                second = client.retry(name)
                replayed.append(time.perf_counter() - start)
                if sum(a.replayed for a in second.actions) != n or len(first.actions) != n + 1:
                    raise RuntimeError("the retry did not replay every child")
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:120]
        return row
    row.bare = statistics.median(recorded) * 1e6 / n
    row.flow = statistics.median(replayed) * 1e6 / n
    row.pairs = _pairs(recorded, replayed)
    return row


def payload_row(url: str, size: int, n: int, reps: int) -> Row:
    """(d): a payload of `size` bytes in and out of each of N actions, SQLite store."""
    label = f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"
    row = Row(f"(d) {label} payload in and out, N={n}, per action, sqlite store", "us")
    bare: list[float] = []
    flow: list[float] = []

    async def bare_sample() -> float:
        start = time.perf_counter()
        await asyncio.create_task(_bare_payloads(n, size))
        return time.perf_counter() - start

    try:
        for _ in range(reps):
            _sample(bare_sample, bare)
            gc.collect()
            start = time.perf_counter()
            run = flowsdk.run(payloads, n, size, store=url)
            flow.append(time.perf_counter() - start)
            if run.result() != size:
                raise RuntimeError("the payload came back changed")
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:120]
        return row
    row.bare = statistics.median(bare) * 1e6 / n
    row.flow = statistics.median(flow) * 1e6 / n
    row.pairs = _pairs(bare, flow)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, print the table, and return 0 (benchmarks report, never gate)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    print(
        f"flowsdk {flowsdk.__version__}: memory, SQLite and PostgreSQL stores vs bare asyncio | "
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs | median of {sizes.reps} "
        f"({'quick' if args.quick else 'full'} mode)",
        flush=True,
    )
    started = time.perf_counter()
    server, pg = _postgres()
    try:
        rows, recorded = _measure_all(sizes, args.quick, pg)
    finally:
        if server is not None:
            server.stop()
    print()
    print(render(rows))
    elapsed = time.perf_counter() - started
    print(f"\n(SQLite store: {recorded} runs recorded in one file; total {elapsed:.1f} s)")
    return 0


def _postgres() -> tuple[PostgresServer | None, str | Exception]:
    """Start a throwaway PostgreSQL server (or use $FLOWSDK_TEST_POSTGRES); return a new database.

    Returns the error instead when there is no server to be had: the PostgreSQL rows say so.
    """
    try:
        server = PostgresServer()
    except Exception as exc:
        return None, exc
    try:
        return server, server.new_database()
    except Exception as exc:
        server.stop()
        return None, exc


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # the fields after the command's name


def _postmaster(url: str) -> int | None:
    """The PID of the server behind `url` when it runs on this machine, else None."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    if row is None:
        return None
    try:
        parent = int(_stat(row[0])[1])  # field 4: the backend's parent, the postmaster
        return parent if "postgres" in Path(f"/proc/{parent}/cmdline").read_text() else None
    except (OSError, ValueError):
        return None


def server_cpu(postmaster: int) -> float:
    """CPU seconds of a local PostgreSQL server so far: postmaster, children, reaped children."""
    fields = _stat(postmaster)
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                child = _stat(entry.name)
            except OSError:
                continue  # ended meanwhile: its time is in the postmaster's cutime
            if child[1] == str(postmaster):
                ticks += int(child[11]) + int(child[12])
    return ticks / _TICK


def with_server(make: Sample, postmaster: int) -> Sample:
    """A sample that adds what the server spent meanwhile to this process's CPU time."""

    async def sample() -> float:
        before = server_cpu(postmaster)
        own = await make()
        return own + server_cpu(postmaster) - before

    return sample


def _measure_all(sizes: Sizes, quick: bool, pg: str | Exception) -> tuple[list[Row], int]:
    pg_side: dict[str, Sample] = {}
    pg_fan: dict[str, Sample] = {}
    server_note = None
    if isinstance(pg, str):
        url_pg = pg
        seq = flow_sample(sequential_root, sizes.seq, lambda: url_pg)
        fan = flow_sample(fan_out_root, sizes.fan, lambda: url_pg)
        postmaster = _postmaster(url_pg)
        if postmaster is not None:
            seq, fan = with_server(seq, postmaster), with_server(fan, postmaster)
        else:
            server_note = (
                "PostgreSQL rows: the server is not on this machine; its CPU time is not "
                "counted, only this process's"
            )
        pg_side["postgresql"] = seq
        pg_fan["postgresql"] = fan
    with tempfile.TemporaryDirectory(prefix="bench-store-") as folder:
        url = "sqlite:///" + str(Path(folder) / "flowsdk.db")
        rows = [
            *measure(
                f"(a) sequential awaited calls, N={sizes.seq:,}, per action",
                "us",
                1e6 / sizes.seq,
                (1.5, 3),
                {
                    "bare": bare_sample(bare_sequential, sizes.seq),
                    "memory": flow_sample(sequential_root, sizes.seq, MemoryStore),
                    "sqlite": flow_sample(sequential_root, sizes.seq, lambda: url),
                    **pg_side,
                },
                sizes.reps,
            ),
            *measure(
                f"(b) gather fan-out of {sizes.fan:,} children",
                "ms",
                1e3,
                (3, 4),
                {
                    "bare": bare_sample(bare_fan_out, sizes.fan),
                    "memory": flow_sample(fan_out_root, sizes.fan, MemoryStore),
                    "sqlite": flow_sample(fan_out_root, sizes.fan, lambda: url),
                    **pg_fan,
                },
                sizes.reps,
            ),
        ]
        replay_n = sizes.seq
        rows.append(replay_rows(url, replay_n, sizes.reps))
        rows.append(payload_row(url, KIB, sizes.seq // 5, sizes.reps))
        rows.append(payload_row(url, MIB, 10 if not quick else 3, sizes.reps))
        with flowsdk.Client(url) as client:
            recorded = len(client.runs())
    if isinstance(pg, str):
        # A fresh database: the abort runner's run is the only one in it.
        server_url = pg.rsplit("/", 1)[0]
        with psycopg.connect(server_url + "/postgres", autocommit=True) as conn:
            name = f"bench_abort_{os.getpid()}"
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        abort_rows = bench_abort.measure(20 if quick else 200, 0, f"{server_url}/{name}")
        rows += [r for r in abort_rows if "called -> CancelledError" in r.measure]
        for row in rows[-2:]:
            row.measure = f"PostgreSQL: {row.measure}"
            row.max_value = 30.0 if "p50" in row.measure else 100.0
    else:
        rows.append(Row("PostgreSQL store", "-", error=f"no server: {pg}"[:120]))
    if server_note is not None:
        rows[0].notes.append(server_note)
    return rows, recorded


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
