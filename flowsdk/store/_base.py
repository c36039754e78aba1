"""The store protocol: what the runtime, the Client and the CLI need from a store.

A store keeps runs (every attempt), their actions and events, and carries
control requests from any process to the runner of a live run. The runtime
talks to it only through a `RunRecorder` (one per run), which must never block
the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from flowsdk._phases import RunPhase
from flowsdk._records import ActionRecord, ControlRequest, Event, RunRecord

if TYPE_CHECKING:
    from flowsdk._run import Run

__all__ = ["ControlAnswer", "RequestHandler", "RunRecorder", "Store", "StoredRun"]


class StoredRun:
    """One attempt of a run as read from a store."""

    __slots__ = ("actions", "events", "payloads", "record")

    def __init__(
        self,
        record: RunRecord,
        actions: list[ActionRecord],
        events: list[Event],
        payloads: dict[str, tuple[bytes | None, bytes | None]] | None = None,
    ) -> None:
        self.record = record
        self.actions = actions
        self.events = events
        # action name -> (recorded inputs, recorded output), MessagePack
        self.payloads = payloads or {}


class ControlAnswer:
    """The runner's answer to a control request (or the store's, for a run that has ended)."""

    __slots__ = ("message", "outcome", "phase")

    def __init__(self, outcome: str, phase: str, message: str) -> None:
        self.outcome = outcome
        self.phase = phase
        self.message = message


# Called on the runner's event loop with each control request addressed to its run;
# returns the answer to send back to the requester.
RequestHandler = Callable[[ControlRequest], ControlAnswer]


class RunRecorder(Protocol):
    """Receives every change of one live run, in order; never blocks the event loop."""

    def action(self, row: tuple[Any, ...]) -> None:
        """Record an action's current state (a row built by the runtime on the loop)."""

    def event(self, row: tuple[Any, ...]) -> None:
        """Append one event (seq, at, kind, action, phase, cause, reason, requested_by, message)."""

    def run(self, record: RunRecord) -> None:
        """Record the run's current state (phase, stop, end)."""

    def finished(self, run: Run[Any]) -> None:
        """Receive the run's final picture (a store that does not stream keeps it)."""

    def congested(self) -> bool:
        """Whether the store is far behind the run, so new actions should wait."""

    async def relieved(self) -> None:
        """Wait until the store has caught up enough to go on."""

    async def cache_get(self, task: str, version: str, digest: str) -> bytes | None:
        """Return a cached output of `task` at `version` for inputs with `digest`, if any."""

    def cache_put(self, task: str, version: str, digest: str, output: bytes) -> None:
        """Remember an output for `cache=True` tasks (never blocks)."""

    async def close(self) -> None:
        """Flush everything and release the recorder's resources (thread, connection).

        Raises:
            StoreError: a write failed during the run.
        """


class Store(Protocol):
    """Where runs are kept: memory (one process) or SQLite (shared by processes)."""

    url: str
    supports_control: bool

    async def open_run(
        self, record: RunRecord, loop: asyncio.AbstractEventLoop, handler: RequestHandler
    ) -> RunRecorder:
        """Create the run (or its next attempt) and return its recorder.

        Raises:
            RunExistsError: a run (attempt) of that name exists already.
        """

    def list_runs(
        self, *, phase: RunPhase | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Return the latest attempt of each run, newest first."""

    def load_run(self, name: str, attempt: int | None = None) -> StoredRun:
        """Return one attempt of a run (default: the latest).

        Raises:
            RunNotFoundError: no such run (or attempt); the message suggests close names.
        """

    def request(self, request: ControlRequest, *, timeout: float) -> ControlAnswer:
        """Deliver a control request to the run's live runner and return its answer."""

    def close(self) -> None:
        """Release the store's connections."""
