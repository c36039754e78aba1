"""Console live-stream latency and server memory while browsers follow a large run.

A runner subprocess (this script with `--runner`) records a run of 10,000
finished actions on a SQLite store, then starts `STEPS` more actions one
after another (each sleeps 20 ms). A real `flowsdk ui` subprocess serves the
store. This process follows the run with `GET /api/runs/RUN/stream`, the
page's own stream, and for every `event: event` that records a phase change
after it connected takes the time it arrived minus the event's `at` (the
runner's clock when the change happened, before it was even written: so the
latency includes the store's write batching). Target (issue 11): p99 <= 200 ms.

Then `FOLLOWERS` streams follow a second such run at once, and the console's
resident memory (VmRSS) is sampled before, during and after: it should stay
flat (the stream reads only what changed; it keeps no copy of the run).

The script reports and always exits 0. `--quick`: 2,000 actions, 50 steps.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

FOLLOWERS = 10


def runner(store: str, name: str, size: int, steps: int) -> None:
    import flowsdk

    env = flowsdk.TaskEnvironment("bench")

    @env.task
    async def filler(i: int) -> int:
        return i

    @env.task
    async def step(i: int) -> int:
        await asyncio.sleep(0.02)
        return i

    @env.task
    async def root(size: int, steps: int) -> None:
        for start in range(0, size, 500):
            await asyncio.gather(*(filler(i) for i in range(start, min(start + 500, size))))
        print("FILLED", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the follower is connected
        for i in range(steps):
            await step(i)

    flowsdk.run(root, size, steps, name=name, store=store)


def start_runner(store: str, name: str, size: int, steps: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--runner", store, name, str(size), str(steps)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("FILLED"), line
    return proc


def follow(url: str, run: str, on_event: object, stop: threading.Event) -> None:
    with urllib.request.urlopen(f"{url}/api/runs/{run}/stream", timeout=120) as stream:
        kind = ""
        for raw in stream:
            line = raw.decode()
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: "):
                if callable(on_event):
                    on_event(kind, line[6:], time.time())
                if kind == "end" or stop.is_set():
                    return


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main(quick: bool) -> None:
    size, steps = (2_000, 50) if quick else (10_000, 100)
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/bench.db"
        ui = subprocess.Popen(
            [sys.executable, "-m", "flowsdk", "ui", "--store", store, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert ui.stdout is not None
        url = ui.stdout.readline().strip().removeprefix("flowsdk console: ").rstrip("/")
        try:
            # 1. Latency of each phase change, one follower.
            proc = start_runner(store, "big", size, steps)
            latencies: list[float] = []
            connected = time.time()
            state_in = threading.Event()
            actions_seen = 0

            def on_event(kind: str, data: str, now: float) -> None:
                nonlocal actions_seen
                if kind in ("action", "actions") and not state_in.is_set():
                    actions_seen += len(json.loads(data)) if kind == "actions" else 1
                    if actions_seen > size:  # the root and every filler: the first state is in
                        state_in.set()
                if kind != "event":
                    return
                event = json.loads(data)
                at = datetime.fromisoformat(event["at"]).timestamp()
                if event["kind"] == "action" and at > connected and state_in.is_set():
                    latencies.append(now - at)

            stop = threading.Event()
            reader = threading.Thread(target=follow, args=(url, "big", on_event, stop))
            reader.start()
            state_in.wait(timeout=120)  # changes are measured once the first state is in
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            reader.join(timeout=300)
            proc.wait(timeout=60)
            latencies.sort()
            p50 = statistics.median(latencies) * 1000
            p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
            print(f"run of {size:,} actions, {len(latencies)} phase changes followed live:")
            print(f"  from the change to the stream: p50 {p50:.0f} ms, p99 {p99:.0f} ms,")
            print(f"  max {latencies[-1] * 1000:.0f} ms (target p99 <= 200 ms)")

            # 2. Memory with FOLLOWERS streams at once.
            proc = start_runner(store, "big2", size, steps * 2)
            before = rss_kib(ui.pid)
            stop = threading.Event()
            readers = [
                threading.Thread(target=follow, args=(url, "big2", None, stop))
                for _ in range(FOLLOWERS)
            ]
            for r in readers:
                r.start()
            time.sleep(3.0)  # every stream has sent its first state (10,000 actions each)
            settled = rss_kib(ui.pid)
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            samples = []
            while proc.poll() is None:
                samples.append(rss_kib(ui.pid))
                time.sleep(0.25)
            for r in readers:
                r.join(timeout=120)
            after = rss_kib(ui.pid)
            print(f"{FOLLOWERS} streams following a run of {size:,} actions at once:")
            print(
                f"  console RSS before {before / 1024:.1f} MiB; with the first states sent "
                f"{settled / 1024:.1f} MiB;\n  while the run goes on: max "
                f"{max(samples) / 1024:.1f} MiB; after {after / 1024:.1f} MiB"
            )
        finally:
            ui.terminate()
            ui.wait(timeout=30)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--runner":
        runner(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main("--quick" in sys.argv)
