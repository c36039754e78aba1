"""Who runs a run, and whether that process is still alive.

Two rules (SPEC §5): on the runner's own host a runner is alive exactly as long
as its process (pid and start time) is, whatever its heartbeat says, so a
runner paused with SIGSTOP, or whose loop or GIL is held for a long time, is
never taken for dead (and its work never run twice); from another host only
the heartbeat can tell, and a runner is gone once it is older than
`STALE_AFTER`. A host is its host name and Linux boot id (a pid from before a
reboot is never taken for a live one), or `$FLOWSDK_HOST` where that is set.
"""

from __future__ import annotations

import os
import socket
import time

import msgspec

__all__ = [
    "HEARTBEAT_INTERVAL",
    "HOLD_AFTER",
    "RUNNER_LOG",
    "RUNNER_LOG_PREFIX",
    "STALE_AFTER",
    "Owner",
    "alive_here",
    "host_identity",
    "is_alive",
    "process_alive",
    "prior_runner_alive_error",
    "process_start",
    "this_process",
]

HEARTBEAT_INTERVAL = 1.0
# A runner on another host whose heartbeat is older than this is gone (SPEC §5).
STALE_AFTER = 10.0
# A runner whose heartbeat was last renewed longer ago than this starts no new body
# until it is renewed: half the time after which another host may take it for dead
# (SQLite's heartbeat, PostgreSQL's lease: 10 s both), and retry its run there.
HOLD_AFTER = STALE_AFTER / 2
# Set by a detached launch (the console, `Client`): the file the runner's output goes to.
# A runner whose run ended recorded removes it; one that failed itself leaves it.
RUNNER_LOG = "FLOWSDK_RUNNER_LOG"
RUNNER_LOG_PREFIX = "flowsdk-runner-"


class Owner(msgspec.Struct, frozen=True):
    """The process running a run: host, pid and the process's start time (clock ticks)."""

    host: str
    pid: int
    started: int | None


def _stat(pid: int) -> tuple[str, int] | None:
    # /proc/<pid>/stat: field 3 is the state (Z for a zombie: dead, not yet reaped),
    # field 22 the start time in clock ticks since boot, which with the pid
    # identifies a process even after the pid is reused.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def process_start(pid: int) -> int | None:
    """Return when process `pid` started (clock ticks since boot), or None if it is gone."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def this_process() -> Owner:
    """Describe the calling process."""
    pid = os.getpid()
    return Owner(host=host_identity(), pid=pid, started=process_start(pid))


def host_identity() -> str:
    """Name this machine: `$FLOWSDK_HOST`, else its host name and Linux boot id.

    The boot id tells two containers that share a host name apart, and a
    machine from itself before a reboot (whose pids mean nothing any more).
    """
    named = os.environ.get("FLOWSDK_HOST")
    if named:
        return named
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    host = socket.gethostname()
    return f"{host}/{boot}" if boot else host


def process_alive(pid: int, started: int | None) -> bool:
    """Whether process `pid` of this host, started at `started` (clock ticks), still runs.

    A zombie (dead, not yet reaped) is not alive; a pid reused by another
    process (another start time) is not the same process.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _stat(pid)
    if stat is None:
        return True  # no /proc here: the pid exists
    state, start = stat
    return state != "Z" and (started is None or start == started)


def alive_here(owner: Owner) -> bool:
    """Whether the runner `owner` runs on this host and its process is still alive."""
    return owner.host == host_identity() and process_alive(owner.pid, owner.started)


def prior_runner_alive_error(name: str, attempt: int, owner: Owner) -> str:
    """Why attempt `attempt` of `name` may not start: the runner of the one before lives here."""
    return (
        f"run {name!r} cannot be retried yet: its attempt {attempt - 1} is recorded CRASHED, "
        f"but its runner (pid {owner.pid}, on this host) is still alive: stopped, or its "
        "event loop blocked, it was judged gone from another host. Retried now, its work "
        "would run twice once it resumes; end that process first, or wait for it to stop "
        "on its own"
    )


def is_alive(owner: Owner, heartbeat: float | None, *, now: float | None = None) -> bool:
    """Whether the runner `owner` is alive: by its process on this host, else by its heartbeat."""
    if owner.host != host_identity():
        now = time.time() if now is None else now
        return heartbeat is None or now - heartbeat <= STALE_AFTER
    return process_alive(owner.pid, owner.started)
