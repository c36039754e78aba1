"""The row layout both SQL stores share: column lists derived from the row Structs, runs.

SQLite and PostgreSQL keep the same columns in the same order; each dialect
writes its own statements around these lists.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from itertools import islice
from operator import attrgetter, itemgetter
from typing import Any

import msgspec

from flowsdk._phases import RunPhase
from flowsdk._records import (
    ACTION_FIELDS,
    EVENT_FIELDS,
    ActionOutline,
    ControlRequest,
    Event,
    EventKind,
    EventRow,
    RefusedRequest,
    Role,
    RunRecord,
    StopInfo,
    StopMode,
    TokenRecord,
    event_from_row,
    to_datetime,
)
from flowsdk.store._base import QueuedRequest

__all__ = [
    "ACTION_COLUMNS",
    "ACTION_COLUMN_NAMES",
    "EVENT_COLUMNS",
    "NO_DETAIL",
    "ROUTINE_COLUMNS",
    "RUN_COLUMNS",
    "RoutineEvent",
    "TOKEN_COLUMNS",
    "events_from_rows",
    "pack_routine",
    "queued_from_rows",
    "queued_query",
    "run_record",
    "token_record",
    "with_routine",
]

# `group` is a keyword in SQL, so its column is `grp`.
_RENAMED = {"group": "grp"}
ACTION_COLUMN_NAMES = [_RENAMED.get(f, f) for f in ACTION_FIELDS]
"""The actions table's columns after (run, run_attempt), in `ActionRow` order."""
ACTION_COLUMNS = ", ".join(ACTION_COLUMN_NAMES)
EVENT_COLUMNS = ", ".join(EVENT_FIELDS)
ROUTINE_COLUMNS = ", ".join(EVENT_FIELDS[:5])
"""The columns a routine event sets (seq, at, kind, action, phase)."""
NO_DETAIL = (None,) * (len(EVENT_FIELDS) - 5)
"""A routine event's other columns: no cause, reason, by or message."""

# An action's routine events (QUEUED, RUNNING, an ending with no request or
# message: three per action) are most of a run's event log. A store may keep the
# routine events of one write as one packed value, keyed by the last `seq` in
# it, instead of a row each: a `(seq, at, action, phase)` array per event, in
# MessagePack.
_ROUTINE_KIND = EventKind.ACTION.value
_encode_routine = msgspec.msgpack.Encoder().encode
_decode_routine = msgspec.msgpack.Decoder(list[tuple[int, float, str, str]]).decode
_seq = itemgetter(0)


class RoutineEvent(msgspec.Struct, array_like=True, gc=False):
    """One routine event on its way to the store: packed as its `(seq, at, action, phase)` array.

    Not a tuple: the garbage collector neither tracks nor counts it, and a
    run's loop makes three per action (a tuple each made a fan-out of 10,000
    on SQLite run a second full collection).
    """

    seq: int
    at: float
    action: str
    phase: str


_routine_seq = attrgetter("seq")


def pack_routine(routine: list[RoutineEvent]) -> tuple[int, bytes]:
    """The routine events of one write: their last `seq`, and their arrays packed."""
    return max(map(_routine_seq, routine)), _encode_routine(routine)


def with_routine(rows: Iterable[tuple[Any, ...]], cursor: int) -> list[tuple[Any, ...]]:
    """Event rows in `seq` order, with the routine events packed among them unpacked.

    `rows` are read in `EVENT_COLUMNS` order plus one last column: None for an
    event's own row, or a packed value (`pack_routine`), whose events after
    `cursor` are taken.
    """
    events: list[tuple[Any, ...]] = []
    for row in rows:
        pack = row[-1]
        if pack is None:
            events.append(row[:-1])
            continue
        events.extend(
            (seq, at, _ROUTINE_KIND, action, phase, *NO_DETAIL)
            for seq, at, action, phase in _decode_routine(pack)
            if seq > cursor
        )
    events.sort(key=_seq)  # a union comes in no particular order
    return events


def routine_needle(action: str) -> bytes:
    """What a pack holding a routine event of `action` contains: its name, in MessagePack.

    A store finds the packs that may name one action by this byte string, in the
    database (a false match, inside another value, is dropped by `of_action`).
    """
    return _encode_routine(action)


def of_action(rows: Iterable[tuple[Any, ...]], action: str) -> list[tuple[Any, ...]]:
    """The event rows of `action` among rows read as `with_routine` reads them, in order.

    A pack holds thousands of events of other actions: only this one's are made rows.
    """
    events: list[tuple[Any, ...]] = []
    for row in rows:
        pack = row[-1]
        if pack is None:
            if row[3] == action:
                events.append(row[:-1])
            continue
        events.extend(
            (seq, at, _ROUTINE_KIND, action, phase, *NO_DETAIL)
            for seq, at, name, phase in _decode_routine(pack)
            if name == action
        )
    events.sort(key=_seq)
    return events


def outline(cursor: Iterator[tuple[Any, ...]]) -> list[ActionOutline]:
    """Turn a cursor's `(name, parent, phase)` rows into `ActionOutline`s.

    A batch at a time, each in one C call: a million rows never stand as tuples
    all at once beside the outline.
    """
    found: list[ActionOutline] = []
    while batch := list(islice(cursor, _OUTLINE_BATCH)):
        found += msgspec.convert(batch, list[ActionOutline])
    return found


_OUTLINE_BATCH = 20_000


def queued_query(schema: str, mark: str) -> str:
    """The statement reading a run's unanswered requests, behind its latest attempt's phase.

    Rows of (phase, id, at, state, body), oldest request first; one row with no
    request when there is none, and no row at all when there is no such run. One
    statement, so one snapshot, and keyed: the run by its primary key, the
    requests by `requests_pending` (run, state). `schema` prefixes the tables
    (`flowsdk.` or nothing); `mark` is the dialect's placeholder, bound to the run's
    name twice.
    """
    return (
        f"SELECT r.phase, q.id, q.at, q.state, q.body FROM (SELECT phase FROM {schema}runs "
        f"WHERE name = {mark} ORDER BY attempt DESC LIMIT 1) r LEFT JOIN {schema}requests q "
        f"ON q.run = {mark} AND q.state IN ('pending', 'delivered') ORDER BY q.id"
    )


_decode_request = msgspec.msgpack.Decoder(ControlRequest).decode


def queued_from_rows(
    rows: list[tuple[Any, ...]], runner_gone: Callable[[], bool]
) -> list[QueuedRequest] | None:
    """The `QueuedRequest`s of rows read by `queued_query`; None if there is no such run.

    None is listed once the run has ended, nor when some wait but `runner_gone()`
    (the runner is gone: it never answers them). A refused request changes
    nothing, so it is left out; so is a body this flowsdk cannot read (a newer
    one's kind of request: its runner refuses it).
    """
    if not rows:
        return None
    if rows[0][1] is None or RunPhase(rows[0][0]).terminal or runner_gone():
        return []
    found = []
    for _phase, request_id, at, state, body in rows:
        if request_id is None:
            continue
        try:
            request = _decode_request(bytes(body))
        except msgspec.DecodeError:
            continue
        if isinstance(request, RefusedRequest):
            continue
        found.append(
            QueuedRequest(
                id=int(request_id),
                at=datetime.fromtimestamp(at, UTC),
                taken=state == "delivered",
                request=request,
            )
        )
    return found


RUN_COLUMNS = (
    "name, attempt, phase, started_at, ended_at, task, stop_mode, stop_reason, stop_by, stop_at, "
    "owner, heartbeat, workdir"
)
TOKEN_COLUMNS = "name, role, digest, created_at, last_used_at, revoked_at"


def run_record(row: tuple[Any, ...]) -> RunRecord:
    """Build a `RunRecord` from a row of `RUN_COLUMNS` (times in epoch seconds)."""
    name, attempt, phase, started, ended, task, mode, reason, by, at, _owner, _hb, workdir = row
    return RunRecord(
        name=name,
        phase=RunPhase(phase),
        started_at=datetime.fromtimestamp(started, UTC),
        ended_at=to_datetime(ended),
        attempt=attempt,
        stop=StopInfo(
            mode=StopMode(mode),
            reason=reason,
            requested_by=by,
            requested_at=datetime.fromtimestamp(at, UTC),
        )
        if mode
        else None,
        task=task,
        workdir=workdir,
    )


def token_record(row: tuple[Any, ...]) -> TokenRecord:
    """Build a `TokenRecord` from a row of `TOKEN_COLUMNS` (never holds a secret)."""
    name, role, digest, created, used, revoked = row
    return TokenRecord(
        name=name,
        role=Role(role),
        digest=digest,
        created_at=datetime.fromtimestamp(created, UTC),
        last_used_at=to_datetime(used),
        revoked_at=to_datetime(revoked),
    )


def events_from_rows(rows: Iterable[tuple[Any, ...]]) -> list[Event]:
    """The public `Event`s of rows read in `EVENT_COLUMNS` order."""
    return [event_from_row(EventRow(*r)) for r in rows]


def close_names(name: str, names: Iterable[str], n: int = 3) -> str:
    """The `; did you mean ...?` of a run not found: up to `n` of `names` close to `name`.

    Compared without case (`HPO-1` finds `hpo-1`) and with a cutoff low enough
    for short names (`L2` finds `L1`); `""` when none is close.
    """
    by_key: dict[str, list[str]] = {}
    for other in names:
        if other != name:
            by_key.setdefault(other.lower(), []).append(other)
    found = difflib.get_close_matches(name.lower(), list(by_key), n=n, cutoff=0.5)
    close = [other for key in found for other in by_key[key]][:n]
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
