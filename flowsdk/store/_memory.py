"""`memory://`: runs kept in this process only, in the store object itself."""

from __future__ import annotations

import asyncio
import difflib
from typing import TYPE_CHECKING, Any

from flowsdk._phases import RunPhase
from flowsdk._records import ControlRequest, RunRecord
from flowsdk.errors import InvalidStateError, RunExistsError, RunNotFoundError
from flowsdk.store._base import ControlAnswer, RequestHandler, RunRecorder, StoredRun

if TYPE_CHECKING:
    from flowsdk._run import Run

__all__ = ["MemoryStore"]


class MemoryStore:
    """Runs kept in this object (`memory://`): fast, private to the process, no external control.

    Pass the same instance as `store=` to several runs and to `flowsdk.Client`
    to read them back; a new `"memory://"` URL means a new, empty store.
    """

    supports_control = False

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._runs: dict[str, list[Run[Any] | None]] = {}
        self._cache: dict[tuple[str, str, str], bytes] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._runs)} runs)"

    async def open_run(
        self, record: RunRecord, loop: asyncio.AbstractEventLoop, handler: RequestHandler
    ) -> RunRecorder:
        """Reserve the run's name (attempt) and return a recorder that keeps its final picture."""
        attempts = self._runs.setdefault(record.name, [])
        if len(attempts) >= record.attempt:
            raise RunExistsError(f"a run named {record.name!r} already exists in this memory store")
        attempts.append(None)
        return _MemoryRecorder(self, record)

    def finished(self, run: Run[Any]) -> None:
        """Keep the final picture of an attempt."""
        self._runs[run.name][run.attempt - 1] = run

    def list_runs(
        self, *, phase: RunPhase | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Return the latest recorded attempt of each run, newest first."""
        latest = [
            run.record
            for attempts in self._runs.values()
            if (run := next((a for a in reversed(attempts) if a is not None), None)) is not None
        ]
        latest = [r for r in latest if phase is None or r.phase is phase]
        latest.sort(key=lambda r: r.started_at, reverse=True)
        return latest[:limit] if limit is not None else latest

    def load_run(self, name: str, attempt: int | None = None) -> StoredRun:
        """Return one recorded attempt of a run (default: the latest)."""
        slots = self._runs.get(name, [])
        index = len(slots) - 1 if attempt is None else attempt - 1
        if 0 <= index < len(slots) and slots[index] is None:
            raise InvalidStateError(
                f"run {name!r} is still running in this memory:// store, which keeps a run's "
                "records only once it has ended and cannot be controlled from outside; use "
                "its RunHandle, or a sqlite:// store"
            )
        attempts = [a for a in slots if a is not None]
        if attempt is not None:
            attempts = [a for a in attempts if a.attempt == attempt]
        if not attempts:
            close = difflib.get_close_matches(name, [n for n in self._runs if n != name], n=3)
            hint = f"; did you mean {', '.join(repr(n) for n in close)}?" if close else ""
            raise RunNotFoundError(f"no run named {name!r} in this memory store{hint}")
        run = attempts[-1]
        return StoredRun(run.record, run.actions, run.events, run.payloads())

    def request(self, request: ControlRequest, *, timeout: float) -> ControlAnswer:
        """Refuse: a memory store cannot reach a run from outside its `RunHandle`."""
        raise InvalidStateError(
            f"run {request.run!r} lives in a memory:// store, which other processes and clients "
            "cannot control; use its RunHandle, or a sqlite:// store"
        )

    def close(self) -> None:
        """Nothing to release."""


class _MemoryRecorder:
    """Keeps nothing while the run goes on; the runtime's own lists are the record."""

    streams = False

    def __init__(self, store: MemoryStore, record: RunRecord) -> None:
        self._store = store
        self._record = record

    def action(self, row: tuple[Any, ...]) -> None:
        """Not used: `streams` is false."""

    def event(self, row: tuple[Any, ...]) -> None:
        """Not used: `streams` is false."""

    def run(self, record: RunRecord) -> None:
        """Not used: `streams` is false."""

    def finished(self, run: Run[Any]) -> None:
        """Keep the run's final picture in the store."""
        self._store.finished(run)

    def congested(self) -> bool:
        """Never: nothing is written while the run goes on."""
        return False

    async def relieved(self) -> None:
        """Nothing to wait for."""

    async def cache_get(self, task: str, version: str, digest: str) -> bytes | None:
        """Look up the store's cache."""
        return self._store._cache.get((task, version, digest))

    def cache_put(self, task: str, version: str, digest: str, output: bytes) -> None:
        """Fill the store's cache."""
        self._store._cache[(task, version, digest)] = output

    async def close(self) -> None:
        """Nothing to flush."""
