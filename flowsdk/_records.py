"""The recorded shape of runs, actions, events and control requests.

Records are frozen msgspec Structs: new fields get defaults and stored fields
are never retyped, so a store written by an older flowsdk stays readable.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec

from flowsdk._phases import AbortCause, ActionPhase, RunPhase
from flowsdk._roles import Actor, Role, TokenRecord, UTCDateTime
from flowsdk.errors import ActionNotFoundError

__all__ = [
    "ACTION_FIELDS",
    "EVENT_FIELDS",
    "AbortInfo",
    "AbortRequest",
    "ActionInfo",
    "ActionOutline",
    "ActionRecord",
    "ActionRow",
    "Actor",
    "ControlReply",
    "ControlRequest",
    "ControlResult",
    "ErrorInfo",
    "Event",
    "EventKind",
    "EventRow",
    "LogEntry",
    "LogRow",
    "MAX_LOGS",
    "MarkFailedRequest",
    "Outcome",
    "Progress",
    "ProgressRow",
    "Role",
    "RefusedRequest",
    "PruneReport",
    "RunRecord",
    "StopInfo",
    "StopMode",
    "StopRequest",
    "TokenRecord",
    "UTCDateTime",
    "action_from_row",
    "action_records",
    "describe_target",
    "event_from_row",
    "log_from_row",
    "progress_from_row",
    "to_datetime",
    "whole_keys",
]


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An exception as recorded: its type name, message and traceback text."""

    type: str
    message: str
    traceback: str


class AbortInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Why and by whom an action was stopped by cancellation."""

    reason: str | None
    cause: AbortCause
    requested_by: str | None
    requested_at: UTCDateTime | None


class StopMode(enum.StrEnum):
    """How a run is stopped: wait for in-progress actions, or abandon them."""

    WAIT = "wait"
    ABANDON = "abandon"


class StopInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's stop request for a run."""

    mode: StopMode
    reason: str | None
    requested_by: str | None
    requested_at: UTCDateTime


class ActionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One action of a run, as recorded (SPEC §4)."""

    run: str
    name: str
    parent: str | None
    task: str
    group: str | None
    phase: ActionPhase
    attempt: int
    started_at: UTCDateTime | None
    ended_at: UTCDateTime | None
    error: ErrorInfo | None
    abort: AbortInfo | None
    cleanup_incomplete: bool = False
    key: str = ""
    replayed: bool = False
    executor: str = "local"
    """Where its body ran: `"local"` (the run's process) or `"ray"` (SPEC §9)."""


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One run, as recorded."""

    name: str
    phase: RunPhase
    started_at: UTCDateTime
    ended_at: UTCDateTime | None
    attempt: int = 1
    stop: StopInfo | None = None
    task: str = ""
    workdir: str = ""
    """The working directory the run was started in (where a detached retry runs)."""


class PruneReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `flowsdk prune` (`Client.prune`) did (SPEC §6)."""

    deleted: list[RunRecord]
    """The deleted runs (each one's latest attempt), newest first; every attempt went."""
    attempts: int
    """How many attempts were deleted in all."""
    live: list[RunRecord]
    """Runs that matched but are live (never deleted), newest first."""
    freed_bytes: int | None = None
    """The bytes given back to the file system (a SQLite file); None where the store's
    server manages its own space (PostgreSQL) or there is no file (memory)."""
    note: str | None = None
    """Anything else the user should know (a file that could not be compacted yet)."""
    dry_run: bool = False
    """True for a dry run: nothing was deleted, `deleted` and `attempts` say what a prune
    with the same options would delete now, and `freed_bytes` is None."""


class EventKind(enum.StrEnum):
    """What an event records."""

    ACTION = "action"
    """An action changed phase."""
    RUN = "run"
    """The run changed phase."""
    REQUEST = "request"
    """A control request (abort, stop, mark-failed) reached the runner."""
    WARNING = "warning"
    """Something an operator should know: a body that ignored cancellation, a failed cleanup."""


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a run's append-only event log."""

    seq: int
    at: UTCDateTime
    kind: EventKind
    action: str | None = None
    phase: str | None = None
    """An action's phase (kind `action`) or the run's (kind `run`): the two enums share no type."""
    cause: AbortCause | None = None
    reason: str | None = None
    requested_by: str | None = None
    message: str | None = None


class ActionOutline(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """One action as an outline of a run's tree holds it: enough to choose what to draw.

    Not tracked by the garbage collector, so an outline of a million actions
    costs no collections to build.
    """

    name: str
    parent: str | None
    phase: str  # an `ActionPhase` value


class ActionRow(msgspec.Struct, array_like=True, gc=False):
    """One action's state as the runtime sends it to a store and a store keeps it.

    Positional (`array_like`), so it costs what a tuple costs; a store derives
    its column list from the field names (`ACTION_FIELDS`). Never reorder the
    fields: new ones are appended at the end. Times are epoch seconds. Not
    tracked by the garbage collector: it holds only strings, numbers and bytes.
    """

    name: str
    seq: int
    parent: str | None
    task: str
    group: str | None
    phase: str
    attempt: int
    started_at: float | None
    ended_at: float | None
    error_type: str | None
    error_message: str | None
    error_traceback: str | None
    abort_reason: str | None
    abort_cause: str | None
    abort_by: str | None
    abort_at: float | None
    cleanup_incomplete: bool
    key: str
    """The call key's last segment: `a0` for the root, else what follows the parent's key
    (`/3`, or `@2/3` under a later attempt). A store keeps only this, so its size does not
    grow with the depth of the tree; `action_records` rebuilds the whole key (SPEC §6)."""
    replayed: bool
    inputs: bytes | None
    output: bytes | None
    executor: str = "local"


class EventRow(msgspec.Struct, array_like=True, gc=False):
    """One event as the runtime appends it to the log and a store keeps it (times in epoch s)."""

    seq: int
    at: float
    kind: str
    action: str | None
    phase: str | None
    cause: str | None
    reason: str | None
    requested_by: str | None
    message: str | None


class ProgressRow(msgspec.Struct, array_like=True, gc=False):
    """One `flowsdk.report` of an action, as the runtime sends it to a store (epoch s).

    `n` counts the action's reports from 0, across its attempts.
    """

    action: str
    n: int
    at: float
    name: str
    step: int | None
    value: float


class LogRow(msgspec.Struct, array_like=True, gc=False):
    """One log record emitted in an action's body, as a store keeps it (epoch s).

    `seq` orders the run's records (a follower's cursor); `n` counts the
    action's own records from 0, so the first kept `n` is how many were dropped.
    """

    seq: int
    action: str
    n: int
    at: float
    level: str
    logger: str
    message: str


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """One progress value reported by an action (`show RUN ACTION --json`: `progress`)."""

    action: str
    name: str
    step: int | None
    value: float
    at: UTCDateTime


class LogEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One captured log record of an action (`show RUN ACTION --json`: `logs`).

    `n` is the record's number among its action's records (from 0): an
    action's first kept `n` is how many older records were dropped.
    """

    seq: int
    action: str
    n: int
    at: UTCDateTime
    level: str
    logger: str
    message: str


def progress_from_row(row: ProgressRow) -> Progress:
    """Build the public `Progress` of a `ProgressRow`."""
    return Progress(
        action=row.action,
        name=row.name,
        step=row.step,
        value=row.value,
        at=datetime.fromtimestamp(row.at, UTC),
    )


def log_from_row(row: LogRow) -> LogEntry:
    """Build the public `LogEntry` of a `LogRow`."""
    return LogEntry(
        seq=row.seq,
        action=row.action,
        n=row.n,
        at=datetime.fromtimestamp(row.at, UTC),
        level=row.level,
        logger=row.logger,
        message=row.message,
    )


MAX_LOGS = 1000
"""Log records kept per action (the oldest are dropped first, and counted)."""


ACTION_FIELDS: tuple[str, ...] = ActionRow.__struct_fields__
"""The fields of `ActionRow`, in order: what a store's column list is derived from."""
EVENT_FIELDS: tuple[str, ...] = EventRow.__struct_fields__
"""The fields of `EventRow`, in order."""


def action_records(
    run: str, rows: Iterable[ActionRow], known: dict[str, str] | None = None
) -> list[ActionRecord]:
    """Build the public `ActionRecord`s of rows in start order, with their whole keys.

    A row keeps only its key's last segment; the whole key is the parent's key
    followed by it. Parents start before their children, so one pass in start
    order rebuilds every key. `known` holds the whole keys of ancestors that
    are not among `rows` (a keyed lookup reads them separately).
    """
    keys: dict[str, str] = dict(known) if known else {}
    records = []
    for row in rows:
        parent = row.parent
        key = row.key if parent is None else keys.get(parent, "") + row.key
        keys[row.name] = key
        records.append(action_from_row(run, row, key))
    return records


def whole_keys(rows: Iterable[tuple[str, str | None, str]]) -> dict[str, str]:
    """Map action names to their whole keys from `(name, parent, segment)` rows in any order."""
    by_name = {name: (parent, segment) for name, parent, segment in rows}
    keys: dict[str, str] = {}
    for name in by_name:
        chain = []
        at: str | None = name
        while at is not None and at not in keys and at in by_name:
            chain.append(at)
            at = by_name[at][0]
        key = keys.get(at, "") if at is not None else ""
        for link in reversed(chain):
            key += by_name[link][1]
            keys[link] = key
    return keys


def _lookup(kind: type[enum.Enum]) -> Callable[[str], Any]:
    """`kind(value)` for a stored value: a dictionary probe, not the enum's Python-level call.

    An unknown value still raises the enum's own `ValueError`.
    """
    members = kind._value2member_map_

    def member(value: str) -> Any:
        found = members.get(value)
        return found if found is not None else kind(value)

    return member


_action_phase = _lookup(ActionPhase)
_abort_cause = _lookup(AbortCause)
_event_kind = _lookup(EventKind)


def action_from_row(run: str, row: ActionRow, key: str | None = None) -> ActionRecord:
    """Build the public `ActionRecord` of an `ActionRow` (`key`: its whole key, if rebuilt)."""
    cause = row.abort_cause
    return ActionRecord(
        run=run,
        name=row.name,
        parent=row.parent,
        task=row.task,
        group=row.group,
        phase=_action_phase(row.phase),
        attempt=row.attempt,
        started_at=to_datetime(row.started_at),
        ended_at=to_datetime(row.ended_at),
        error=ErrorInfo(
            type=row.error_type,
            message=row.error_message or "",
            traceback=row.error_traceback or "",
        )
        if row.error_type
        else None,
        abort=AbortInfo(
            reason=row.abort_reason,
            cause=_abort_cause(cause),
            requested_by=row.abort_by,
            requested_at=to_datetime(row.abort_at),
        )
        if cause
        else None,
        cleanup_incomplete=bool(row.cleanup_incomplete),
        key=row.key if key is None else key,
        replayed=bool(row.replayed),
        executor=row.executor,
    )


def to_datetime(at: float | None) -> datetime | None:
    """Turn epoch seconds (how times are kept and stored) into an aware UTC datetime."""
    return None if at is None else datetime.fromtimestamp(at, UTC)


def event_from_row(row: EventRow) -> Event:
    """Build the public `Event` of an `EventRow`."""
    return Event(
        seq=row.seq,
        at=datetime.fromtimestamp(row.at, UTC),
        kind=_event_kind(row.kind),
        action=row.action,
        phase=row.phase,
        cause=_abort_cause(row.cause) if row.cause else None,
        reason=row.reason,
        requested_by=row.requested_by,
        message=row.message,
    )


class ActionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What `flowsdk.current_action()` tells a running body about itself."""

    run: str
    name: str
    task: str
    attempt: int
    group: str | None
    abort: AbortInfo | None = None
    """`None` until a cancellation is delivered to this action; then why, and who asked."""


class AbortRequest(msgspec.Struct, frozen=True, kw_only=True, tag="abort"):
    """Abort a run (no action), one action's subtree, or a group's actions."""

    run: str
    action: str | None = None
    group: str | None = None
    reason: str | None = None
    requested_by: str | None = None
    requested_at: UTCDateTime | None = None  # when asked (set by `ControlService.send`)


class StopRequest(msgspec.Struct, frozen=True, kw_only=True, tag="stop"):
    """Stop a run: wait for in-progress actions, or abandon them."""

    run: str
    abandon: bool = False
    reason: str | None = None
    requested_by: str | None = None
    requested_at: UTCDateTime | None = None  # when asked (set by `ControlService.send`)


class MarkFailedRequest(msgspec.Struct, frozen=True, kw_only=True, tag="mark_failed"):
    """Mark one action as failed."""

    run: str
    action: str
    reason: str | None = None
    requested_by: str | None = None
    requested_at: UTCDateTime | None = None  # when asked (set by `ControlService.send`)


class RefusedRequest(msgspec.Struct, frozen=True, kw_only=True, tag="refused"):
    """A control request the requester's side refused (its role lacks the permission).

    It changes nothing: the runner only writes it to the run's event log, so
    the log shows who tried what, and why it was refused.
    """

    run: str
    action: str | None = None
    message: str
    requested_by: str | None = None


ControlRequest = AbortRequest | StopRequest | MarkFailedRequest | RefusedRequest


def describe_target(run: str, action: str | None, group: str | None) -> str:
    """Name a control request's target for a person: an action, a group, or the run."""
    if action is not None:
        return f"action {action} of run {run!r}"
    if group is not None:
        return f"group {group!r} of run {run!r}"
    return f"run {run!r}"


class Outcome(enum.StrEnum):
    """What a control request did (SPEC §6)."""

    APPLIED = "applied"
    """The live runner applied it (or an identical request was already under way)."""
    ALREADY_ENDED = "already_ended"
    """The target had ended (or its runner was gone): nothing to do."""
    REFUSED = "refused"
    """The target's phase refuses it (e.g. a second stop-and-wait)."""
    QUEUED = "queued"
    """The runner has not answered in time (its loop is blocked): applied when it reads it."""


class ControlResult(msgspec.Struct, frozen=True, kw_only=True):
    """The one answer to a control request, from the runner or the store, end to end.

    Attributes:
        outcome: What happened.
        phase: The named action's phase, or the run's when no action was named.
        message: One sentence for a person.
    """

    outcome: Outcome
    phase: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """Return the `--json` shape: outcome, phase, message."""
        return {"outcome": self.outcome.value, "phase": self.phase, "message": self.message}


class ControlReply(msgspec.Struct, frozen=True, array_like=True):
    """How a runner's answer travels through a store: a result, or "no such target".

    The runner resolves targets in its live run (an action the store has not
    seen yet included), so "not found" comes back from it too; `unwrap()` turns
    that into `ActionNotFoundError` on the requester's side.
    """

    result: ControlResult | None = None
    not_found: str | None = None

    def unwrap(self) -> ControlResult:
        """Return the result, or raise `ActionNotFoundError` with the runner's message."""
        if self.result is None:
            raise ActionNotFoundError(self.not_found or "no such action")
        return self.result
