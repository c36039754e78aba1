"""The test side of a subprocess runner: start it, read its lines, write its gates, reap it.

Every `Runner` is a context manager: leaving it kills the process if it is
still alive, waits for it (with a timeout) and joins the thread that reads its
output, so no test leaks a process or a thread whatever it asserts.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import flowsdk
from flowsdk.errors import ActionNotFoundError

__all__ = ["RUNNERS", "Runner", "sqlite_url", "sync"]

RUNNERS = Path(__file__).resolve().parent
ROOT = RUNNERS.parent.parent
# How long a test waits for a line, or for a runner to exit, before it fails.
WAIT = 30.0


def sqlite_url(path: Path) -> str:
    """Return the store URL of an absolute path (`sqlite:////abs/path.db`)."""
    return "sqlite:///" + str(path)


def sync(client: flowsdk.Client, run: str) -> None:
    """Wait until the store shows everything the live runner did before this call.

    A control request is applied on the runner's loop after whatever the loop
    did before, and its answer is committed in the same transaction as those
    changes or a later one. Asking about a group that does not exist is such a
    request, and one that changes nothing.
    """
    try:
        client.abort(run, group="no-such-group")
    except ActionNotFoundError:
        return
    raise AssertionError("the barrier request found a group named 'no-such-group'")


class Runner:
    """A workflow script from tests/runners run as a subprocess runner.

    Args:
        script: The script's file name in tests/runners.
        store: The store URL, passed as argv[1] and as `FLOWSDK_STORE`.
        run: The run's name, argv[2].
        *args: More arguments for the script.
    """

    def __init__(self, script: str, store: str, run: str, *args: str) -> None:
        env = {**os.environ, "FLOWSDK_STORE": store, "PYTHONPATH": str(ROOT)}
        self.run = run
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNERS / script), store, run, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, name=f"runner-{run}", daemon=True)
        self._reader.start()

    def __enter__(self) -> Runner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def output(self) -> str:
        """Everything the runner printed so far (its log lines included)."""
        return "\n".join(self.lines)

    def expect(self, *words: str) -> list[str]:
        """Read lines until one starts with `words`; return that line's words.

        Raises:
            AssertionError: the runner exited, or printed nothing more for `WAIT` s.
        """
        return self._until(lambda parts: parts[: len(words)] == list(words), " ".join(words))

    def expect_any(self, *first: str) -> list[str]:
        """Read lines until one's first word is one of `first`; return that line's words."""
        return self._until(lambda parts: parts[:1] != [] and parts[0] in first, " or ".join(first))

    def expect_text(self, text: str) -> str:
        """Read lines until one contains `text` (a log line); return it."""
        return " ".join(self._until(lambda parts: text in " ".join(parts), text))

    def _until(self, match: Callable[[list[str]], bool], what: str) -> list[str]:
        while True:
            try:
                line = self._queue.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(
                    f"runner {self.run}: no line {what!r} after {WAIT:g} s; "
                    f"output so far:\n{self.output}"
                ) from None
            if line is None:
                self._queue.put(None)  # later calls see the end too
                raise AssertionError(
                    f"runner {self.run} ended before printing {what!r}; output:\n{self.output}"
                )
            parts = line.split()
            if match(parts):
                return parts

    def started(self, count: int) -> dict[str, str]:
        """Read `count` `STARTED` lines; return action name -> function name."""
        names = {}
        for _ in range(count):
            _, action, function = self.expect("STARTED")
            names[action] = function
        return names

    def send(self, line: str = "go") -> None:
        """Write one line to the runner's stdin (opens one gate)."""
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def finish(self) -> int:
        """Close stdin (every gate opens), wait for the runner to exit; return its code."""
        stdin = self.proc.stdin
        if stdin is not None and not stdin.closed:
            stdin.close()
        code = self.proc.wait(timeout=WAIT)
        self._reader.join(timeout=WAIT)
        return code

    def close(self) -> None:
        """Kill the runner if it is still alive, reap it, and join the reader thread."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        self._reader.join(timeout=WAIT)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()
