"""The store's small protocols: a reader, a per-run recorder, and a control channel.

- `RunReader`: the history, one run, a cheap run phase and target lookup, the
  events of a run since a cursor (so `watch` and the console follow a run
  without reloading it), and the control requests its runner has not answered.
- `RunRecorder`: one per live run; the runtime hands it typed rows
  (`ActionRow`, `EventRow`) and run records, in order. It never blocks the
  event loop.
- `ControlChannel`: carries a control request to the live runner of a run
  and brings back its `ControlReply`.
- `TokenStore`: the console's tokens (SPEC §8), kept as hashes beside the runs.

A `Store` is all four plus `open_run`. Nothing here knows the runtime: a
store sees records and rows, never a live run's objects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from flowsdk._phases import ActionPhase, RunPhase
from flowsdk._records import (
    AbortRequest,
    ActionOutline,
    ActionRecord,
    ActionRow,
    ControlReply,
    ControlRequest,
    ControlResult,
    Event,
    EventRow,
    LogEntry,
    LogRow,
    MarkFailedRequest,
    Outcome,
    Progress,
    ProgressRow,
    PruneReport,
    RunRecord,
    StopRequest,
    TokenRecord,
    UTCDateTime,
)
from flowsdk.errors import ActionNotFoundError

__all__ = [
    "ControlChannel",
    "InProcessChannel",
    "QueuedRequest",
    "RequestHandler",
    "RowBuilder",
    "RunReader",
    "RunRecorder",
    "RunState",
    "Store",
    "StoredAction",
    "StoredRun",
    "TokenStore",
    "dropped_reply",
]

Lazy = list[Any] | Callable[[], list[Any]]


class StoredRun:
    """One attempt of a run as read from a store (lists built on first use)."""

    __slots__ = ("_actions", "_events", "_payloads", "record")

    def __init__(
        self,
        record: RunRecord,
        actions: list[ActionRecord] | Callable[[], list[ActionRecord]],
        events: list[Event] | Callable[[], list[Event]],
        payloads: dict[str, tuple[bytes | None, bytes | None]]
        | Callable[[], dict[str, tuple[bytes | None, bytes | None]]]
        | None = None,
    ) -> None:
        self.record = record
        # A run of 10,000 actions should not pay for 40,000 datetime conversions
        # that nobody reads: each list is built when first asked for.
        self._actions = actions
        self._events = events
        self._payloads = payloads if payloads is not None else {}

    @property
    def actions(self) -> list[ActionRecord]:
        """The attempt's actions, in start order."""
        if callable(self._actions):
            self._actions = self._actions()
        return self._actions

    @property
    def events(self) -> list[Event]:
        """The attempt's event log, oldest first."""
        if callable(self._events):
            self._events = self._events()
        return self._events

    @property
    def payloads(self) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Action name -> (recorded inputs, recorded output), MessagePack."""
        if callable(self._payloads):
            self._payloads = self._payloads()
        return self._payloads


class StoredAction:
    """One action of a run in full, as read from a store by keyed lookups."""

    __slots__ = ("action", "events", "inputs", "output", "record")

    def __init__(
        self,
        record: RunRecord,
        action: ActionRecord,
        inputs: bytes | None,
        output: bytes | None,
        events: list[Event],
    ) -> None:
        self.record = record  # the run's attempt
        self.action = action
        self.inputs = inputs  # MessagePack, as `StoredRun.payloads` holds them
        self.output = output
        self.events = events  # the events naming the action, oldest first


class RunState:
    """What a cheap keyed lookup tells about a run's latest attempt (and one target)."""

    __slots__ = ("attempt", "phase", "run", "target_phase")

    def __init__(
        self, run: str, attempt: int, phase: RunPhase, target_phase: ActionPhase | None = None
    ) -> None:
        self.run = run
        self.attempt = attempt
        self.phase = phase
        self.target_phase = target_phase


class QueuedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A control request made to a live run that its runner has not answered yet.

    What a `queued` answer (exit 7) left behind: the request waits until the
    runner's event loop runs again (a body blocks it, or the process is paused),
    and is applied then. A store lists it until it is answered, and never for a
    run that has ended or whose runner is gone (nothing will apply it).

    Attributes:
        id: The request's number in the store (the `#N` of its `queued` answer).
        at: When it was made (the requester's clock).
        taken: True once the runner has taken it from the store and handed it to
            its event loop, which has not applied it yet; False while no runner
            has taken it (its process is paused, or overloaded).
        request: The request as it was sent, with its `requested_by` and `reason`.
    """

    id: int
    at: UTCDateTime
    taken: bool
    request: AbortRequest | StopRequest | MarkFailedRequest


# Called on the runner's event loop with each control request addressed to its
# run; returns the result, or raises `ActionNotFoundError` for an unknown target.
RequestHandler = Callable[[ControlRequest], ControlResult]


class RowBuilder(Protocol):
    """How a recorder turns a changed action into its row."""

    def build(self, action: Any) -> ActionRow:
        """The action's row, on the run's event loop."""

    def build_at_once(self, action: Any) -> ActionRow:
        """The action's row from any thread, read as the action was at one instant."""


class RunRecorder(Protocol):
    """Receives every change of one live run, in order; never blocks the event loop."""

    streams: bool
    """Whether it wants every action and event as it happens (else only the end)."""

    lease_until: float
    """Until when (epoch seconds) the runner may start new bodies: its heartbeat's last
    renewal plus `HOLD_AFTER`, well before another host may take it for dead."""

    async def renewed(self) -> None:
        """Wait until the runner's heartbeat has been renewed (`lease_until` moved on)."""

    def changed(self, action: Any, rows: RowBuilder) -> None:
        """Record that an action changed: its current state is `rows.build(action)`.

        A streaming recorder may build the row later, on the event loop, so
        that an action that changes several times in a moment is sent once;
        it sends it before any later event, run change or control reply.
        """

    def routine(self, seq: int, at: float, action: str, phase: str) -> None:
        """Append a routine `ACTION` event (no cause, reason, by or message).

        Sent with (after) the rows of the actions that changed before it.
        """

    def event(self, row: EventRow) -> None:
        """Append one event."""

    def run(self, record: RunRecord) -> None:
        """Record the run's current state (phase, stop, end); called on every run change."""

    def progress(self, row: ProgressRow) -> None:
        """Record one progress report (any thread; never blocks)."""

    def log(self, row: LogRow) -> None:
        """Record one captured log record (any thread; never blocks).

        The store keeps an action's last `MAX_LOGS` records.
        """

    def finished(self, stored: StoredRun) -> None:
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


class RunReader(Protocol):
    """Reads the history; every call is short and never waits for a runner."""

    url: str

    def list_runs(
        self, *, phase: RunPhase | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Return the latest attempt of each run, newest first."""

    def load_run(self, name: str, attempt: int | None = None) -> StoredRun:
        """Return one attempt of a run (default: the latest).

        Raises:
            RunNotFoundError: no such run (or attempt); the message suggests close names.
        """

    def load_record(self, name: str, attempt: int | None = None) -> RunRecord:
        """Return one attempt's run record alone (default: the latest), without its actions.

        Raises:
            RunNotFoundError: no such run (or attempt).
        """

    def load_actions(self, name: str, attempt: int, actions: list[str]) -> list[ActionRecord]:
        """Return the records of the named actions of one attempt (unknown names are skipped).

        Keyed lookups: a follower re-reads only the actions its new events name.
        """

    def load_tree(self, name: str, attempt: int) -> list[ActionOutline]:
        """Return every action of one attempt in outline (name, parent, phase), in start order.

        What choosing the part of a big tree to draw needs, without the rest of
        each record (a few percent of a whole-run read).
        """

    def load_payloads(
        self, name: str, attempt: int, actions: list[str]
    ) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Return the recorded inputs and output of the named actions (keyed lookups)."""

    def load_action(self, name: str, attempt: int | None, action: str) -> StoredAction:
        """Return one action of one attempt (default: the latest) in full, by keyed lookups.

        Its record, recorded inputs and output, and the events naming it: what
        `load_run` gives for that action, without reading the others.

        Raises:
            RunNotFoundError: no such run (or attempt).
            ActionNotFoundError: the attempt has no such action.
        """

    def run_state(self, name: str, action: str | None = None) -> RunState:
        """Return the latest attempt's phase (and `action`'s) by keyed lookups only.

        Its cost does not grow with the run's size: a control request on a run
        of a million actions costs what it costs on a run of ten.

        Raises:
            RunNotFoundError: no such run.
            ActionNotFoundError: the run has no action `action` (recorded so far).
        """

    def group_phases(self, name: str, attempt: int, group: str) -> list[ActionPhase]:
        """Return the phases of the actions of `group` in one attempt (empty: no such group)."""

    def groups(self, name: str, attempt: int) -> list[str]:
        """Return the group names of one attempt, sorted (for "no such group" messages)."""

    def root_task_workdir(self, task: str) -> str | None:
        """Return the working directory of the latest run whose root task is `task`.

        None when no run of this store has that root task (`""` when one has,
        but its directory was not recorded).
        """

    def events_since(self, name: str, cursor: int, *, attempt: int | None = None) -> list[Event]:
        """Return the events of a run (latest attempt by default) with `seq > cursor`.

        Pass the last `seq` seen as the next cursor (start with -1).

        Raises:
            RunNotFoundError: no such run.
        """

    def queued_requests(self, name: str) -> list[QueuedRequest]:
        """Return the control requests to a run that its runner has not answered, oldest first.

        Empty once the run has ended, or when its runner is gone. Keyed
        lookups: what `watch` may read every poll, on a run of any size.

        Raises:
            RunNotFoundError: no such run.
        """

    def load_progress(self, name: str, attempt: int, action: str | None = None) -> list[Progress]:
        """Return the progress reports of one attempt (or of one action), oldest first."""

    def latest_progress(self, name: str, attempt: int) -> dict[str, Progress]:
        """Return each action's latest progress report in one attempt (keyed by action)."""

    def load_logs(
        self,
        name: str,
        attempt: int,
        action: str | None = None,
        cursor: int = -1,
        limit: int | None = None,
    ) -> list[LogEntry]:
        """Return the kept log records of one attempt (or one action) with `seq > cursor`.

        Oldest first, the first `limit` of them; pass the last `seq` seen as the
        next cursor to follow a run (or to read the next page).
        """


class ControlChannel(Protocol):
    """Carries control requests to the live runner of a run."""

    in_process: bool
    """True when requests are applied in this process (no store lookup needed first)."""

    def request(self, request: ControlRequest, *, timeout: float) -> ControlReply:
        """Deliver a request to the run's live runner and return its reply.

        Returns an `already_ended` result when the runner is gone, and a
        `queued` one when it has not answered within `timeout` (the request
        stays recorded and is applied when the runner reads it).
        """


class TokenStore(Protocol):
    """Keeps the console's tokens: a name, a role and the hash of the secret, never the secret.

    A store that has ever held a token is in token mode for good: revoked
    tokens stay listed (with `revoked_at`), so `token_mode()` stays true.
    """

    def create_token(self, token: TokenRecord) -> None:
        """Add a token (replacing a revoked one of the same name).

        Raises:
            InvalidStateError: a token of that name exists and is not revoked.
        """

    def list_tokens(self) -> list[TokenRecord]:
        """Return every token ever created (revoked ones included), by name."""

    def revoke_token(self, name: str, at: datetime) -> bool:
        """Revoke a token from now on; False when no unrevoked token has that name."""

    def token_mode(self) -> bool:
        """Return whether a token was ever created in this store."""

    def token_used(self, name: str, at: datetime) -> None:
        """Record that a request presented the token `name` at `at` (best effort)."""


class Store(RunReader, ControlChannel, TokenStore, Protocol):
    """Where runs are kept: a reader, a control channel, and recorders for live runs."""

    async def open_run(
        self,
        record: RunRecord,
        loop: asyncio.AbstractEventLoop,
        handler: RequestHandler,
        *,
        actions: Sequence[ActionRow] = (),
        events: Sequence[EventRow] = (),
        on_lost: Callable[[str], None] | None = None,
    ) -> RunRecorder:
        """Create the run (or its next attempt) with its first rows, and return its recorder.

        The run's record, `actions` (its root, with its recorded inputs) and
        `events` are written in one transaction: a run is never recorded in part.
        `on_lost` is called on the run's loop (with why) when the recorder stops
        recording while the run goes on: the store found the run recorded
        `CRASHED` (by a reader on another host), or it could not be written for
        longer than its busy timeout. The recorder then writes nothing more, and
        its `close()` raises `StoreError`.

        Raises:
            RunExistsError: a run (attempt) of that name exists already.
        """

    def prune(
        self, *, before: datetime | None, keep: int | None, phase: RunPhase | None
    ) -> PruneReport:
        """Delete ended runs, every attempt of each (SPEC §6 `flowsdk prune`).

        In scope: the runs whose latest attempt is in `phase` (default: all);
        of those, all but the `keep` newest, that ended before `before`. A
        live run is never deleted, even if it matched: it is in `live`. A
        SQLite file gives the freed space back to the file system.
        """

    def note_request(self, name: str, action: str | None, message: str, requested_by: str) -> None:
        """Append a `request` event to the latest attempt of an ended run (a refused request).

        A live run's log is written by its runner only; this is for runs that
        have ended, whose log no runner writes any more.
        """

    def close(self) -> None:
        """Release the store's connections."""


def dropped_reply(run: str) -> ControlReply:
    """The answer to a request dropped unanswered: its attempt ended before its runner answered.

    A store drops the requests still unanswered for a run (pending, or taken by
    a runner that never answered) when it records the run's next attempt (the
    one before was recorded CRASHED): a request is never applied to an attempt
    other than the one it was made for.
    """
    return ControlReply(
        ControlResult(
            outcome=Outcome.ALREADY_ENDED,
            phase=RunPhase.CRASHED.value,
            message=f"the attempt of run {run!r} this request was for ended (its runner gone) "
            "before answering it; nothing was applied. A new attempt has started: send the "
            "request again to act on it",
        )
    )


class InProcessChannel:
    """A control channel to a runner in this process: applies requests on its loop.

    Called on the runner's own loop thread (`RunHandle`, or code in a task
    body), it applies the request at once; from any other thread it hands the
    request to the loop and waits for the answer, up to `timeout`. A request
    handed over and not applied yet (the loop is blocked) is in `queued()`.
    """

    in_process = True

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: RequestHandler) -> None:
        self.loop = loop
        self.handler = handler
        # Requests handed to the loop and not applied yet, by id (any thread adds
        # and removes one: single dict operations, atomic under the GIL).
        self._handed: dict[int, QueuedRequest] = {}
        self._ids = itertools.count(1)

    def request(self, request: ControlRequest, *, timeout: float) -> ControlReply:
        """Apply `request` on the runner's loop and return the reply."""
        if _running_loop() is self.loop:
            return self._apply(request)
        answer: concurrent.futures.Future[ControlReply] = concurrent.futures.Future()
        handed = None
        if isinstance(request, AbortRequest | StopRequest | MarkFailedRequest):
            handed = QueuedRequest(
                id=next(self._ids), at=datetime.now(UTC), taken=True, request=request
            )
            self._handed[handed.id] = handed

        def apply() -> None:
            # Applied even after the requester stopped waiting: a queued
            # request is applied when the loop runs again (SPEC §6).
            try:
                answer.set_result(self._apply(request))
            finally:
                if handed is not None:
                    self._handed.pop(handed.id, None)

        try:
            self.loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the loop is closed: the run has ended meanwhile
            if handed is not None:
                self._handed.pop(handed.id, None)
            return ControlReply(
                ControlResult(
                    outcome=Outcome.ALREADY_ENDED,
                    phase="",
                    message=f"run {request.run!r} has ended",
                )
            )
        try:
            return answer.result(timeout)
        except concurrent.futures.TimeoutError:
            return ControlReply(
                ControlResult(
                    outcome=Outcome.QUEUED,
                    phase="",
                    message=f"the runner of run {request.run!r} did not answer within "
                    f"{timeout:g} s; the request will be applied when its loop runs again",
                )
            )

    def queued(self) -> list[QueuedRequest]:
        """Return the requests handed to the loop from other threads and not applied yet."""
        return sorted(self._handed.copy().values(), key=lambda q: q.id)

    def _apply(self, request: ControlRequest) -> ControlReply:
        try:
            return ControlReply(self.handler(request))
        except ActionNotFoundError as exc:
            return ControlReply(not_found=str(exc))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
