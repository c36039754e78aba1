"""What the console's tests share: a real `flowsdk ui` subprocess, HTTP calls, tokens, runs.

`Console` starts `python -m flowsdk ui --port 0` on a store, reads its first
stdout line for the address, and on close sends SIGTERM and checks it exits
0 without a traceback. Its stderr (the log, refused requests included) goes
to a file the tests read.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import flowsdk
import flowsdk._service as service
from tests.runners.harness import ROOT, Runner

__all__ = [
    "WAIT",
    "Console",
    "Reply",
    "create_token",
    "queue_abort",
    "start_held",
    "start_stuck",
    "wait_for",
]

WAIT = 30.0
ANSWER_WITHIN = 0.5  # how long `queue_abort` waits for a blocked runner's answer


def create_token(store: str, name: str, role: str) -> str:
    """Create a token with the CLI; return its secret."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowsdk",
            "token",
            "create",
            name,
            "--role",
            role,
            "--store",
            store,
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class Reply:
    """One HTTP answer: status, headers (lower-case names), the body and its JSON (or None)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.body = body
        try:
            self.json: Any = json.loads(body)
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:300]!r})"


class Console:
    """A `flowsdk ui` subprocess serving `store` on a free loopback port."""

    def __init__(self, store: str, log: Path, *extra: str) -> None:
        self.store = store
        self.log = log
        self._stderr = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowsdk", "ui", "--store", store, "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(WAIT):
                self.close()
                raise AssertionError(f"the console printed nothing in {WAIT} s")
        first = self.proc.stdout.readline().strip()
        if not first.startswith("flowsdk console: http://"):
            self.close()
            raise AssertionError(f"unexpected first line {first!r}: {log.read_text()}")
        self.url = first.removeprefix("flowsdk console: ").rstrip("/")

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Make one HTTP request; `body` is sent as JSON, `raw` as it is.

        A body goes with `Content-Type: application/json` unless `headers` says
        otherwise; `headers` may also set `Host`, `Origin` and the like.
        """
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as answer:
                return Reply(answer.status, dict(answer.headers), answer.read())
        except urllib.error.HTTPError as error:
            with error:
                return Reply(error.code, dict(error.headers), error.read())

    def logged(self) -> str:
        """Return what the console has logged so far."""
        self._stderr.flush()
        return self.log.read_text()

    def close(self) -> int:
        """Stop the console with SIGTERM; return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=WAIT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._stderr.close()
        return code


def start_held(store: str, run: str) -> Runner:
    """Start tests/runners/console.py's `held` run in another process; wait until a3 holds."""
    runner = Runner("console.py", store, run, "held")
    runner.expect("STARTED", "a3")
    return runner


def start_stuck(store: str, run: str, released: Path) -> Runner:
    """Start tests/runners/control.py's `one_stuck` run; return once a1 blocks its event loop.

    a1's body blocks the runner's loop (sync code in an `async def`) until the file
    `released` exists: a control request to the run waits in the store meanwhile.
    """
    os.environ["FLOWSDK_TEST_RELEASE"] = str(released)  # read by the runner, at a1
    try:
        runner = Runner("control.py", store, run, "one_stuck")
    finally:
        del os.environ["FLOWSDK_TEST_RELEASE"]
    runner.started(2)
    return runner


def queue_abort(store: str, run: str, action: str, reason: str) -> int:
    """Abort `action` of a run whose runner's loop is blocked; return the queued request's id.

    The requester waits `ANSWER_WITHIN` s for the runner's answer (10 s for a person),
    then leaves the request queued, as `flowsdk abort` does with exit 7.
    """
    with flowsdk.Client(store) as client:
        patient = service.ANSWER_TIMEOUT
        service.ANSWER_TIMEOUT = ANSWER_WITHIN
        try:
            answer = client.abort(run, action, reason=reason)
        finally:
            service.ANSWER_TIMEOUT = patient
        assert answer.outcome is flowsdk.Outcome.QUEUED, answer
        [queued] = client.queued_requests(run)
    return queued.id


def wait_for(client: flowsdk.Client, run: str, check: Any, what: str) -> flowsdk.Run[Any]:
    """Poll the store until `check(run)` is true (deadline `WAIT`)."""
    deadline = time.monotonic() + WAIT
    while True:
        current = client.get_run(run)
        if check(current):
            return current
        assert time.monotonic() < deadline, f"run {run}: {what} not seen in {WAIT} s"
        time.sleep(0.05)  # polling another process's store, bounded by the deadline above


CHROMIUM = "/usr/bin/chromium"  # Debian's package: Playwright cannot download its own here
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium(worker: ThreadPoolExecutor) -> Iterator[Any]:
    """Playwright and the system Chromium, started and stopped on `worker`.

    Playwright's sync API keeps to the thread that started it, and the tests'
    event loops must not be that thread: every call goes through `worker`.
    """
    sync_api = importlib.import_module("playwright.sync_api")
    pw = worker.submit(lambda: sync_api.sync_playwright().start()).result(timeout=60)
    browser = None
    try:
        browser = worker.submit(
            lambda: pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ).result(timeout=60)
        yield browser
    finally:
        if browser is not None:
            worker.submit(browser.close).result(timeout=60)
        worker.submit(pw.stop).result(timeout=60)


@contextlib.contextmanager
def console_and_browser(
    store: str, log: Path, thread_name: str
) -> Iterator[tuple[Console, ThreadPoolExecutor, Any]]:
    """A console on `store` and Chromium on a worker thread of its own; both stopped at the end.

    The console must have exited cleanly (0) once the browser is gone.
    """
    console = Console(store, log)
    worker = ThreadPoolExecutor(1, thread_name_prefix=thread_name)
    try:
        with chromium(worker) as browser:
            yield console, worker, browser
    finally:
        worker.shutdown()
        assert console.close() == 0
