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

from flowsdk._bodies import bodies_running
from flowsdk._liveness import Owner, host_identity, is_alive

__all__ = ["RunnerHold", "holds_run", "lock_path", "runner_alive", "sweep_released"]


def lock_path(store: str, name: str, attempt: int, owner: Owner) -> Path:
    """Where the lock of one runner of attempt `attempt` of run `name` of `store` is.

    The runner is part of it: a run pruned and its name used again by another
    runner has a lock of its own. The store's path is made absolute first (a body
    may change the working directory before the lock is let go).
    """
    key = f"{name}\0{attempt}\0{owner.host}\0{owner.pid}\0{owner.started}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return Path(f"{os.path.abspath(store)}-runners") / f"{digest[:32]}.lock"


# Locks let go while a plain `def` body's thread of this process still ran: released
# once no such thread runs (`_release_deferred`), at the latest when the process ends.
_deferred: list[tuple[int, Path]] = []


class RunnerHold:
    """The runner's side: the lock of its run's attempt, taken before the run is recorded."""

    def __init__(self, store: str, name: str, attempt: int, owner: Owner) -> None:
        self.path = lock_path(store, name, attempt, owner)
        self._fd: int | None = None

    def take(self) -> bool:
        """Lock the file (made if needed); return False if it cannot be (judged by pid then)."""
        _release_deferred()
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
        this host to find: the run is CRASHED, and may be retried. While a plain `def`
        body's thread of this process still runs (a thread cannot be stopped), the
        lock is kept until none does: the work it does is not over.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if final:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(fd)
            return
        _deferred.append((fd, self.path))
        _release_deferred()


def _release_deferred() -> None:
    """Release the locks let go while body threads ran, once none runs."""
    if _deferred and not bodies_running():
        while _deferred:
            fd, _ = _deferred.pop()
            os.close(fd)


def holds_run(store: str, name: str, attempt: int, owner: Owner) -> bool | None:
    """Whether a process still holds the run's lock: True, False, or None (no lock file)."""
    _release_deferred()
    path = lock_path(store, name, attempt, owner)
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
    return owner.host != host_identity() or holds_run(store, name, attempt, owner) is not False


def sweep_released(store: str) -> None:
    """Remove the released locks' files beside `store` (`prune`): their runners are gone."""
    folder = Path(f"{os.path.abspath(store)}-runners")
    with contextlib.suppress(OSError):
        for path in folder.glob("*.lock"):
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it
                    path.unlink()
                finally:
                    os.close(fd)
