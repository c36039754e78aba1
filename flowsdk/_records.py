"""The recorded shape of runs, actions, events and control requests.

Records are frozen msgspec Structs: new fields get defaults and stored fields
are never retyped, so a store written by an older flowsdk stays readable.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import msgspec

from flowsdk._phases import AbortCause, ActionPhase, RunPhase

__all__ = [
    "AbortInfo",
    "AbortRequest",
    "ActionInfo",
    "ActionRecord",
    "ControlRequest",
    "ErrorInfo",
    "Event",
    "EventKind",
    "MarkFailedRequest",
    "RunRecord",
    "StopInfo",
    "StopMode",
    "StopRequest",
    "action_from_row",
    "event_from_row",
    "to_datetime",
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
    requested_at: datetime | None


class StopMode(enum.StrEnum):
    """How a run is stopped: wait for in-progress actions, or abandon them."""

    WAIT = "wait"
    ABANDON = "abandon"


class StopInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's stop request for a run."""

    mode: StopMode
    reason: str | None
    requested_by: str | None
    requested_at: datetime


class ActionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One action of a run, as recorded (SPEC §4)."""

    run: str
    name: str
    parent: str | None
    task: str
    group: str | None
    phase: ActionPhase
    attempt: int
    started_at: datetime | None
    ended_at: datetime | None
    error: ErrorInfo | None
    abort: AbortInfo | None
    cleanup_incomplete: bool = False
    key: str = ""
    replayed: bool = False


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One run, as recorded."""

    name: str
    phase: RunPhase
    started_at: datetime
    ended_at: datetime | None
    attempt: int = 1
    stop: StopInfo | None = None
    task: str = ""


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
    at: datetime
    kind: EventKind
    action: str | None = None
    phase: str | None = None
    cause: str | None = None
    reason: str | None = None
    requested_by: str | None = None
    message: str | None = None


def action_from_row(run: str, row: tuple[Any, ...]) -> ActionRecord:
    """Build an `ActionRecord` from its row, as the runtime makes it and the store keeps it.

    The row is (name, seq, parent, task, group, phase, attempt, started_at,
    ended_at, error type, message, traceback, abort reason, cause, requested_by,
    requested_at, cleanup_incomplete, key, replayed, inputs, output), times in
    epoch seconds.
    """
    (
        name,
        _seq,
        parent,
        task,
        grp,
        phase,
        attempt,
        started,
        ended,
        etype,
        emsg,
        etb,
        areason,
        acause,
        aby,
        aat,
        incomplete,
        key,
        replayed,
        _inputs,
        _output,
    ) = row
    return ActionRecord(
        run=run,
        name=name,
        parent=parent,
        task=task,
        group=grp,
        phase=ActionPhase(phase),
        attempt=attempt,
        started_at=to_datetime(started),
        ended_at=to_datetime(ended),
        error=ErrorInfo(type=etype, message=emsg or "", traceback=etb or "") if etype else None,
        abort=AbortInfo(
            reason=areason,
            cause=AbortCause(acause),
            requested_by=aby,
            requested_at=to_datetime(aat),
        )
        if acause
        else None,
        cleanup_incomplete=bool(incomplete),
        key=key,
        replayed=bool(replayed),
    )


def to_datetime(at: float | None) -> datetime | None:
    """Turn epoch seconds (how times are kept and stored) into an aware UTC datetime."""
    return None if at is None else datetime.fromtimestamp(at, UTC)


def event_from_row(row: tuple[Any, ...]) -> Event:
    """Build an `Event` from its stored row.

    The row is (seq, at in epoch seconds, kind, action, phase, cause, reason,
    requested_by, message), as the runtime keeps it and the SQLite store writes it.
    """
    seq, at, kind, action, phase, cause, reason, by, message = row
    return Event(
        seq=seq,
        at=datetime.fromtimestamp(at, UTC),
        kind=EventKind(kind),
        action=action,
        phase=phase,
        cause=cause,
        reason=reason,
        requested_by=by,
        message=message,
    )


class ActionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What `flowsdk.current_action()` tells a running body about itself."""

    run: str
    name: str
    task: str
    attempt: int
    group: str | None


class AbortRequest(msgspec.Struct, frozen=True, kw_only=True, tag="abort"):
    """Abort a run (no action), one action's subtree, or a group's actions."""

    run: str
    action: str | None = None
    group: str | None = None
    reason: str | None = None
    requested_by: str | None = None


class StopRequest(msgspec.Struct, frozen=True, kw_only=True, tag="stop"):
    """Stop a run: wait for in-progress actions, or abandon them."""

    run: str
    abandon: bool = False
    reason: str | None = None
    requested_by: str | None = None


class MarkFailedRequest(msgspec.Struct, frozen=True, kw_only=True, tag="mark_failed"):
    """Mark one action as failed."""

    run: str
    action: str
    reason: str | None = None
    requested_by: str | None = None


ControlRequest = AbortRequest | StopRequest | MarkFailedRequest
