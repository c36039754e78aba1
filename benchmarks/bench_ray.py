"""flowsdk on Ray against bare Ray, in the same process and on the same cluster.

Two measures (SPEC §10, §9):

- **Per action.** The same trivial `async def` body, awaited sequentially:
  as a bare async Ray actor method (`await actor.square.remote(i)`, one warm
  actor) and as a flowsdk task with `executor="ray"` (its pool warm), in
  alternating batches inside one run on the memory store (the same loop and
  the same moment of a shared machine's load). Per call: the median over repetitions of
  (batch time / calls). Target: flowsdk <= 1.5x bare.
- **Cancel -> remote `finally`.** A body sleeping on a warm actor is
  cancelled; the body takes `time.time()` in its `except CancelledError`.
  Latency = that time - the time the cancel was issued (`t.cancel()` in the
  parent for flowsdk; `ray.cancel(ref)` for bare Ray, shown for reference).
  The flowsdk body says that it has started, and when the cancel landed, with
  log records the driver receives (the forwarding channel), so each cancel
  lands in a sleeping body.
  Target: p99 <= 100 ms.

A local cluster is started for this process (loopback only). The script
reports and always exits 0. `--quick`: fewer calls and cancels.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
import warnings
from typing import Any

from bench_core import Row, render

import flowsdk

env = flowsdk.TaskEnvironment("bench_ray", executor="ray", grace_period=5)
driver = flowsdk.TaskEnvironment("bench_ray_driver")

SIGNAL = logging.getLogger("bench_ray.signal")


@env.task
async def square(x: int) -> int:
    return x * x


@env.task
async def sleeper() -> None:
    SIGNAL.warning("started")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        SIGNAL.warning("landed %r", time.time())  # forwarded before the outcome
        raise


@driver.task
async def sequential(calls: int, reps: int) -> tuple[list[float], list[float]]:
    """Alternate batches of bare actor calls and flowsdk actions, on the same loop."""
    import ray

    actor: Any = ray.remote(_Bare).options(num_cpus=0).remote()
    await actor.square.remote(0)
    await square(0)  # the pool's actor is warm
    bare_per_call, flow_per_call = [], []
    for _ in range(reps):
        began = time.perf_counter()
        for i in range(calls):
            await actor.square.remote(i)
        bare_per_call.append((time.perf_counter() - began) / calls)
        began = time.perf_counter()
        for i in range(calls):
            await square(i)
        flow_per_call.append((time.perf_counter() - began) / calls)
    ray.kill(actor)
    return bare_per_call, flow_per_call


class _Bare:
    async def square(self, x: int) -> int:
        return x * x

    async def sleeper(self) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.landed = time.time()
            raise

    async def last(self) -> float:
        return self.landed


class _Signals(logging.Handler):
    """Receives the sleeper's records, forwarded from its worker to this process."""

    def __init__(self) -> None:
        super().__init__()
        self.started: asyncio.Event | None = None
        self.landed: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text == "started" and self.started is not None:
            self.started.set()
        elif text.startswith("landed "):
            self.landed = float(text.split()[1])

    def take(self) -> float | None:
        landed, self.landed = self.landed, None
        return landed


_signals = _Signals()


@driver.task
async def cancels(count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        _signals.started = asyncio.Event()
        t = asyncio.create_task(sleeper())
        await _signals.started.wait()
        issued = time.time()
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
        landed = _signals.take()
        assert landed is not None, "the body's cancellation record did not arrive"
        latencies.append((landed - issued) * 1000)
    return latencies


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def bare_cancels(count: int) -> list[float]:
    import ray

    actor: Any = ray.remote(_Bare).options(num_cpus=0).remote()
    await actor.square.remote(0)
    latencies = []
    for _ in range(count):
        ref = actor.sleeper.remote()
        await asyncio.sleep(0.02)  # (a benchmark) let the body reach its sleep
        issued = time.time()
        ray.cancel(ref)
        with contextlib.suppress(Exception):  # RayTaskError(TaskCancelledError)
            await ref
        latencies.append((await actor.last.remote() - issued) * 1000)
    ray.kill(actor)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and cancels")
    args = parser.parse_args()
    calls, reps, count = (100, 3, 30) if args.quick else (300, 5, 200)
    os.environ.setdefault("FLOWSDK_STORE", "memory://")
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from flowsdk.executors._ray import RAY

        RAY.connect()
    SIGNAL.addHandler(_signals)
    SIGNAL.propagate = False
    bare_calls, flow_calls = flowsdk.run(sequential, calls, reps).result()
    bare_cancelled = asyncio.run(bare_cancels(count))
    flow_cancels = flowsdk.run(cancels, count).result()
    rows = [
        Row(
            f"per action, {calls} sequential awaited calls",
            "us",
            bare=statistics.median(bare_calls) * 1e6,
            flow=statistics.median(flow_calls) * 1e6,
            max_ratio=1.5,
        ),
        Row(
            f"t.cancel() -> remote except/finally, p50 ({count} trials)",
            "ms",
            bare=_percentile(bare_cancelled, 50),
            flow=_percentile(flow_cancels, 50),
        ),
        Row(
            f"t.cancel() -> remote except/finally, p99 ({count} trials)",
            "ms",
            bare=_percentile(bare_cancelled, 99),
            flow=_percentile(flow_cancels, 99),
            max_value=100.0,
        ),
    ]
    rows[1].notes.append(
        "the 'bare asyncio' column is bare Ray here: an async actor method awaited from "
        "asyncio, cancelled with ray.cancel(ref)"
    )
    print(f"flowsdk on Ray vs bare Ray, local cluster, python {sys.version.split()[0]}\n")
    print(render(rows))
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
