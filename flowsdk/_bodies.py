"""The threads of this process running plain `def` task bodies (a thread cannot be stopped).

`_execute_thread` adds each body's thread while it runs; a SQLite runner that lets
its run go keeps holding the run's lock while one still runs (`store/_sqlite_holds`).
No import: `@env.task` on a `def` loads this, and `import flowsdk` stays light.
"""

from __future__ import annotations

__all__ = ["AT_REPORT", "BODY_THREADS", "bodies_running"]

BODY_THREADS: set[int] = set()
"""The idents of the threads running a plain `def` body now."""

AT_REPORT: set[int] = set()
"""The idents of the threads waiting in `flowsdk.report_sync` now (its point of cancellation)."""


def bodies_running() -> bool:
    """Whether a plain `def` task body still runs in a thread of this process."""
    return bool(BODY_THREADS)
