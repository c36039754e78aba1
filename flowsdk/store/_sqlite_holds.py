"""Whether a runner on this host still holds its run: a file lock, for the SQLite store.

On its own host a runner is alive as long as its process is (SPEC §5). A process
can outlive its run, though: `flowsdk.run` gave up on a store that failed (and
raised) in a service or a notebook that goes on, or a body `exec`ed another
program (same pid, same start time). So a runner also holds a lock for its run's
attempt, `flock` on a file of its own beside the store (`<store>-runners/`),
opened close-on-exec, from before the run is recorded until its last write is
done and its bodies are stopped. A reader on this host that finds the process
alive asks the lock: released, the runner is gone. A lock file that is not
there (a store written before these locks) leaves the judgement to the process.
PostgreSQL needs none of this: each runner's session holds an advisory lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

from flowsdk._liveness import Owner, host_identity, is_alive

__all__ = ["RunnerHold", "forget_hold", "holds_run", "lock_path", "runner_alive"]


def lock_path(store: str, name: str, attempt: int) -> Path:
    """Where the lock of attempt `attempt` of run `name` of the SQLite file `store` is."""
    digest = hashlib.sha256(f"{name}\0{attempt}".encode("utf-8", "surrogatepass")).hexdigest()
    return Path(f"{store}-runners") / f"{digest[:32]}.lock"


class RunnerHold:
    """The runner's side: the lock of its run's attempt, taken before the run is recorded."""

    def __init__(self, store: str, name: str, attempt: int) -> None:
        self.path = lock_path(store, name, attempt)
        self._fd: int | None = None

    def take(self) -> bool:
        """Lock the file (made if needed); return False if it cannot be (judged by pid then).

        Never waits: a lock held already is another runner's, of a run of the same name
        that is live (this one's `insert_run` then refuses, `RunExistsError`).
        """
        try:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self, final: bool) -> None:
        """Let the run go: drop the lock, and remove the file if the run's records are final.

        Otherwise (its last writes failed) the file stays, released, for a reader of
        this host to find and record the run CRASHED (`forget_hold` then removes it).
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if final:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(fd)


def holds_run(store: str, name: str, attempt: int) -> bool | None:
    """Whether a process still holds the run's lock: True, False, or None (no lock file)."""
    path = lock_path(store, name, attempt)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        return False
    finally:
        os.close(fd)


def runner_alive(
    store: str,
    name: str,
    attempt: int,
    owner: Owner,
    heartbeat: float | None,
    now: float | None = None,
) -> bool:
    """Whether the runner of an attempt is alive (`_liveness.is_alive`) and, here, holds it."""
    if not is_alive(owner, heartbeat, now=now):
        return False
    return owner.host != host_identity() or holds_run(store, name, attempt) is not False


def forget_hold(store: str, name: str, attempt: int) -> None:
    """Remove a released lock's file, once its run is recorded CRASHED (never a held one)."""
    if holds_run(store, name, attempt) is False:
        with contextlib.suppress(OSError):
            lock_path(store, name, attempt).unlink()
