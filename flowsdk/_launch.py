"""Detached runners: a `flowsdk run` or `flowsdk retry` process that outlives its starter.

`ControlService.launch_run` and `launch_retry` (the console's Run and Retry)
start one with `launch`: the store travels in the environment (never on the
command line, where `ps` would show a PostgreSQL password), the runner's
output goes to a file in the temporary directory, and `launch` returns once
the runner has recorded what it was started for. A runner that dies first is
reported with what it said: its error line when it refused its command line
(an argument that does not convert), else the end of its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit

from flowsdk._liveness import (
    RUNNER_LOG,
    RUNNER_LOG_PREFIX,
    Owner,
    host_identity,
    is_alive,
    process_start,
)
from flowsdk.errors import InvalidStateError, RunNotFoundError, StoreError
from flowsdk.store import Store

__all__ = ["LAUNCH_TIMEOUT", "attempt_recorded", "launch", "portable_url", "spawn_detached"]

LAUNCH_TIMEOUT = 60.0
"""How long a detached runner may take to record its run before the launch is reported failed."""

_TAIL = 2000  # characters of a failed runner's output given in the error, at most


def launch(
    store: Store,
    options: list[str],
    positional: list[str],
    workdir: str,
    recorded: Callable[[], bool],
    what: str,
) -> None:
    """Start `flowsdk OPTIONS -- POSITIONAL` detached, in `workdir`; return once `recorded()`.

    Raises:
        InvalidStateError: the runner exited (or is still starting after
            `LAUNCH_TIMEOUT`) before `recorded()` said yes; the message has its
            error, or the end of its output, and names its log file.
    """
    cwd = workdir if workdir and os.path.isdir(workdir) else None
    import tempfile  # here: it imports shutil and the compressors, which flowsdk does not need

    fd, log = tempfile.mkstemp(prefix=RUNNER_LOG_PREFIX, suffix=".log")
    os.close(fd)
    # `--` before the positional values: a value such as -3 is not an option.
    argv = [sys.executable, "-m", "flowsdk", *options, "--", *positional]
    env = {**os.environ, "FLOWSDK_STORE": portable_url(store.url), RUNNER_LOG: log}
    pid = spawn_detached(argv, cwd, log, env)
    owner = Owner(host=host_identity(), pid=pid, started=process_start(pid))
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not recorded():
        alive = is_alive(owner, None)
        if not alive or time.monotonic() > deadline:
            with open(log, errors="replace") as f:
                output = f.read()
            state = "is still starting" if alive else "exited"
            raise InvalidStateError(
                f"the runner for {what} {state} before recording it (pid {pid}, log {log})"
                + _said(output)
            )
        time.sleep(0.02)  # polls the store until the runner has recorded, up to the deadline


def _said(output: str) -> str:
    """What a failed runner said: its usage error alone (not its usage), else its output's end."""
    errors = [
        line for line in output.splitlines() if line.startswith("flowsdk") and ": error: " in line
    ]
    if errors:
        return ": " + errors[-1].partition(": error: ")[2]
    tail = output[-_TAIL:]
    return f":\n{tail}" if tail else ""


def attempt_recorded(store: Store, run: str, attempt: int) -> bool:
    """Say whether the store has `attempt` (or a later one) of `run`."""
    try:
        return store.run_state(run).attempt >= attempt
    except RunNotFoundError:
        return False
    except StoreError:
        return False  # being created or locked by the new runner: ask again


_DETACH = (
    "import subprocess, sys\n"
    "log = open(sys.argv[1], 'ab')\n"
    "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log,"
    " stderr=subprocess.STDOUT, start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
)


def portable_url(url: str) -> str:
    """Return `url` as a process in another working directory must see it.

    A SQLite path relative to this process's directory becomes absolute: a
    detached runner starts in the run's own working directory.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        return url
    path = unquote(parts.path)
    path = path[1:] if path.startswith("/") else path
    # Quoted again: a `#`, `?` or `%` in a file name must reach the runner as part of it.
    absolute = "sqlite:///" + quote(os.path.abspath(path))
    return absolute + (f"?{parts.query}" if parts.query else "")


def spawn_detached(
    argv: list[str], cwd: str | None, log: str, env: dict[str, str] | None = None
) -> int:
    """Start `argv` in a session of its own, not as a child of this process; return its pid.

    A short-lived intermediate process starts it and exits at once, so the
    runner is re-parented to init: it outlives this process, receives none of
    its terminal's signals, and this process never has to reap it.
    """
    helper = subprocess.run(
        [sys.executable, "-c", _DETACH, log, *argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if helper.returncode != 0 or not helper.stdout.strip().isdigit():
        raise InvalidStateError(f"could not start a runner process: {helper.stderr.strip()}")
    return int(helper.stdout.strip())
