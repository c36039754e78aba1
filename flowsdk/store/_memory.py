"""`memory://`: runs kept in this process only, in the store object itself."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from flowsdk._phases import ActionPhase, RunPhase
from flowsdk._records import (
    MAX_LOGS,
    ActionOutline,
    ActionRecord,
    ActionRow,
    ControlReply,
    ControlRequest,
    ControlResult,
    Event,
    EventKind,
    EventRow,
    LogEntry,
    LogRow,
    Outcome,
    Progress,
    ProgressRow,
    PruneReport,
    RunRecord,
    TokenRecord,
    log_from_row,
    progress_from_row,
)
from flowsdk.errors import ActionNotFoundError, InvalidStateError, RunExistsError, RunNotFoundError
from flowsdk.store._base import (
    InProcessChannel,
    QueuedRequest,
    RequestHandler,
    RowBuilder,
    RunRecorder,
    RunState,
    StoredAction,
    StoredRun,
)
from flowsdk.store._prune import prune_plan
from flowsdk.store._rows import close_names

__all__ = ["MemoryStore"]


class MemoryStore:
    """Runs kept in this object (`memory://`): fast, private to the process.

    Pass the same instance as `store=` to several runs and to `flowsdk.Client`
    to read them back and to control a live run from this process (another
    thread, or the run's own loop); a new `"memory://"` URL means a new, empty
    store. A live run's actions are kept by its runner and appear here when
    the run ends.
    """

    in_process = True

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._runs: dict[str, list[StoredRun | None]] = {}
        self._live: dict[str, _MemoryRecorder] = {}
        self._cache: dict[tuple[str, str, str], bytes] = {}
        self._tokens: dict[str, TokenRecord] = {}
        # (run, attempt) -> reports in order; (run, attempt) -> action -> its last records.
        self._progress: dict[tuple[str, int], list[ProgressRow]] = {}
        self._logs: dict[tuple[str, int], dict[str, collections.deque[LogRow]]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._runs)} runs)"

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
        """Reserve the run's name (attempt) and return a recorder that keeps its final picture."""
        attempts = self._runs.setdefault(record.name, [])
        if len(attempts) >= record.attempt:
            raise RunExistsError(f"a run named {record.name!r} already exists in this memory store")
        attempts.append(None)
        recorder = _MemoryRecorder(self, record, InProcessChannel(loop, handler))
        self._live[record.name] = recorder
        return recorder

    def _finished(self, recorder: _MemoryRecorder, stored: StoredRun) -> None:
        self._runs[stored.record.name][stored.record.attempt - 1] = stored
        if self._live.get(stored.record.name) is recorder:
            del self._live[stored.record.name]

    # -- reading -----------------------------------------------------------------------

    def list_runs(
        self, *, phase: RunPhase | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Return the latest attempt of each run (live ones included), newest first."""
        latest = []
        for name, attempts in self._runs.items():
            live = self._live.get(name)
            if live is not None:
                latest.append(live.record)
            elif (
                found := next((a for a in reversed(attempts) if a is not None), None)
            ) is not None:
                latest.append(found.record)
        latest = [r for r in latest if phase is None or r.phase is phase]
        latest.sort(key=lambda r: r.started_at, reverse=True)
        return latest[:limit] if limit is not None else latest

    def prune(
        self, *, before: datetime | None, keep: int | None, phase: RunPhase | None
    ) -> PruneReport:
        """Delete ended runs (never a live one) from this object."""
        doomed, live = prune_plan(self.list_runs(phase=phase), before=before, keep=keep)
        deleted = []
        attempts = 0
        for record in doomed:
            slots = self._runs.get(record.name, [])
            if record.name in self._live or any(s is None for s in slots):
                live.append(record)  # retried since it was listed: live again
                continue
            attempts += len(slots)
            del self._runs[record.name]
            for attempt in range(1, len(slots) + 1):  # its reports and logs go with it
                self._progress.pop((record.name, attempt), None)
                self._logs.pop((record.name, attempt), None)
            deleted.append(record)
        return PruneReport(deleted=deleted, attempts=attempts, live=live)

    def load_run(self, name: str, attempt: int | None = None) -> StoredRun:
        """Return one recorded attempt of a run (default: the latest)."""
        slots = self._runs.get(name, [])
        index = len(slots) - 1 if attempt is None else attempt - 1
        if 0 <= index < len(slots) and slots[index] is None:
            raise InvalidStateError(
                f"run {name!r} is still running in this memory:// store, which keeps a run's "
                "actions only once it has ended; control it with its RunHandle or a Client on "
                "this store object, or record it in a sqlite:// store to follow it live"
            )
        found = slots[index] if 0 <= index < len(slots) else None
        if found is None:
            raise self._not_found(name, attempt)
        return found

    def _not_found(self, name: str, attempt: int | None) -> RunNotFoundError:
        if attempt is not None and self._runs.get(name):
            return RunNotFoundError(
                f"run {name!r} has no attempt {attempt}; its latest is {len(self._runs[name])}"
            )
        hint = close_names(name, self._runs)
        return RunNotFoundError(f"no run named {name!r} in this memory store{hint}")

    def load_record(self, name: str, attempt: int | None = None) -> RunRecord:
        """Return one attempt's run record (a live run's current one included)."""
        live = self._live.get(name)
        if live is not None and (attempt is None or attempt == live.record.attempt):
            return live.record
        return self.load_run(name, attempt).record

    def load_actions(self, name: str, attempt: int, actions: list[str]) -> list[ActionRecord]:
        """Return the records of the named actions of one ended attempt."""
        wanted = set(actions)
        return [a for a in self.load_run(name, attempt).actions if a.name in wanted]

    def load_tree(self, name: str, attempt: int) -> list[ActionOutline]:
        """Return every action of one ended attempt in outline, in start order."""
        actions = self.load_run(name, attempt).actions
        return [ActionOutline(a.name, a.parent, a.phase.value) for a in actions]

    def load_payloads(
        self, name: str, attempt: int, actions: list[str]
    ) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Return the recorded inputs and output of the named actions of one ended attempt."""
        payloads = self.load_run(name, attempt).payloads
        return {a: payloads[a] for a in actions if a in payloads}

    def load_action(self, name: str, attempt: int | None, action: str) -> StoredAction:
        """Return one action of one ended attempt (default: the latest) in full."""
        stored = self.load_run(name, attempt)
        record = next((a for a in stored.actions if a.name == action), None)
        if record is None:
            raise ActionNotFoundError.for_action(name, action, [a.name for a in stored.actions])
        inputs, output = stored.payloads.get(action, (None, None))
        events = [e for e in stored.events if e.action == action]
        return StoredAction(stored.record, record, inputs, output, events)

    def run_state(self, name: str, action: str | None = None) -> RunState:
        """Return the latest attempt's phase, and `action`'s once the run has ended."""
        live = self._live.get(name)
        if live is not None:
            # The runner resolves the target itself: its actions are not kept here yet.
            return RunState(name, live.record.attempt, live.record.phase)
        stored = self.load_run(name)
        phase = None
        if action is not None:
            record = next((a for a in stored.actions if a.name == action), None)
            if record is None:
                raise ActionNotFoundError.for_action(name, action, [a.name for a in stored.actions])
            phase = record.phase
        return RunState(name, stored.record.attempt, stored.record.phase, phase)

    def group_phases(self, name: str, attempt: int, group: str) -> list[ActionPhase]:
        """Return the phases of the actions of `group` in one ended attempt."""
        return [a.phase for a in self.load_run(name, attempt).actions if a.group == group]

    def groups(self, name: str, attempt: int) -> list[str]:
        """Return the group names of one ended attempt, sorted."""
        return sorted({a.group for a in self.load_run(name, attempt).actions if a.group})

    def note_request(self, name: str, action: str | None, message: str, requested_by: str) -> None:
        """Append a `request` event to the latest attempt of an ended run."""
        stored = self.load_run(name)
        events = stored.events
        events.append(
            Event(
                seq=len(events),
                at=datetime.now(UTC),
                kind=EventKind.REQUEST,
                action=action,
                requested_by=requested_by,
                message=message,
            )
        )

    def root_task_workdir(self, task: str) -> str | None:
        """Return the working directory of the latest run whose root task is `task`."""
        records = [r for r in self.list_runs() if r.task == task]
        return records[0].workdir if records else None

    def events_since(self, name: str, cursor: int, *, attempt: int | None = None) -> list[Event]:
        """Return the events with `seq > cursor` of an ended attempt (latest by default)."""
        return [e for e in self.load_run(name, attempt).events if e.seq > cursor]

    def queued_requests(self, name: str) -> list[QueuedRequest]:
        """Return the requests handed to a live run's loop from other threads, not applied yet.

        A request from the run's own loop is applied at once, and one from
        another thread as soon as the loop runs: only a blocked loop leaves any.
        """
        live = self._live.get(name)
        if live is not None:
            return live.channel.queued()
        self.load_record(name)  # no such run: RunNotFoundError
        return []

    def load_progress(self, name: str, attempt: int, action: str | None = None) -> list[Progress]:
        """Return the progress reports of one attempt (or of one action), oldest first."""
        rows = self._progress.get((name, attempt), [])
        return [progress_from_row(r) for r in list(rows) if action is None or r.action == action]

    def latest_progress(self, name: str, attempt: int) -> dict[str, Progress]:
        """Return each action's latest progress report in one attempt."""
        latest: dict[str, ProgressRow] = {}
        for row in list(self._progress.get((name, attempt), [])):
            latest[row.action] = row
        return {action: progress_from_row(row) for action, row in latest.items()}

    def load_logs(
        self,
        name: str,
        attempt: int,
        action: str | None = None,
        cursor: int = -1,
        limit: int | None = None,
    ) -> list[LogEntry]:
        """Return the kept log records of one attempt (or one action) with `seq > cursor`."""
        kept = self._logs.get((name, attempt), {})
        if action is not None:
            rows = list(kept.get(action, ()))
        else:
            rows = [row for records in list(kept.values()) for row in list(records)]
            rows.sort(key=lambda r: r.seq)
        return [log_from_row(r) for r in rows if r.seq > cursor][:limit]

    # -- control -----------------------------------------------------------------------

    def request(self, request: ControlRequest, *, timeout: float) -> ControlReply:
        """Apply a request to a live run of this store (in this process)."""
        live = self._live.get(request.run)
        if live is None:
            state = self.run_state(request.run)
            return ControlReply(
                ControlResult(
                    outcome=Outcome.ALREADY_ENDED,
                    phase=state.phase.value,
                    message=f"run {request.run!r} already finished: {state.phase.value}",
                )
            )
        return live.channel.request(request, timeout=timeout)

    # -- tokens ------------------------------------------------------------------------

    def create_token(self, token: TokenRecord) -> None:
        """Add a token (replacing a revoked one of the same name)."""
        known = self._tokens.get(token.name)
        if known is not None and known.revoked_at is None:
            raise InvalidStateError(
                f"a token named {token.name!r} exists already; revoke it first "
                "(flowsdk token revoke) or choose another name"
            )
        self._tokens[token.name] = token

    def list_tokens(self) -> list[TokenRecord]:
        """Return every token ever created (revoked ones included), by name."""
        return [self._tokens[name] for name in sorted(self._tokens)]

    def revoke_token(self, name: str, at: datetime) -> bool:
        """Revoke a token; False when no unrevoked token has that name."""
        known = self._tokens.get(name)
        if known is None or known.revoked_at is not None:
            return False
        self._tokens[name] = msgspec.structs.replace(known, revoked_at=at)
        return True

    def token_mode(self) -> bool:
        """Return whether a token was ever created in this store."""
        return bool(self._tokens)

    def token_used(self, name: str, at: datetime) -> None:
        """Record when a token was last presented."""
        known = self._tokens.get(name)
        if known is not None:
            self._tokens[name] = msgspec.structs.replace(known, last_used_at=at)

    def close(self) -> None:
        """Nothing to release."""


class _MemoryRecorder:
    """Keeps the run's record while it goes on and its final picture when it ends."""

    streams = False
    # No other process can take this run's runner for dead: its bodies never wait.
    lease_until = math.inf

    def __init__(self, store: MemoryStore, record: RunRecord, channel: InProcessChannel) -> None:
        self._store = store
        self.record = record
        self.channel = channel
        self._reports: list[ProgressRow] | None = None

    async def renewed(self) -> None:
        """Never waited for: the lease never ends (`lease_until`)."""

    def changed(self, action: Any, rows: RowBuilder) -> None:
        """Not used: `streams` is false (the runner's own lists are the record)."""

    def routine(self, seq: int, at: float, action: str, phase: str) -> None:
        """Not used: `streams` is false."""

    def event(self, row: EventRow) -> None:
        """Not used: `streams` is false."""

    def progress(self, row: ProgressRow) -> None:
        """Keep one progress report (readable while the run goes on)."""
        reports = self._reports
        if reports is None:
            key = (self.record.name, self.record.attempt)
            reports = self._reports = self._store._progress.setdefault(key, [])
        reports.append(row)

    def log(self, row: LogRow) -> None:
        """Keep one log record; an action keeps its last `MAX_LOGS`."""
        kept = self._store._logs.setdefault((self.record.name, self.record.attempt), {})
        records = kept.get(row.action)
        if records is None:
            records = kept[row.action] = collections.deque(maxlen=MAX_LOGS)
        records.append(row)

    def run(self, record: RunRecord) -> None:
        """Keep the run's current record (its phase answers control requests)."""
        self.record = record

    def finished(self, stored: StoredRun) -> None:
        """Keep the run's final picture in the store."""
        self.record = stored.record
        self._store._finished(self, stored)

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
