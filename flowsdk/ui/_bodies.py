"""The JSON API's bodies as msgspec Structs, and the OpenAPI 3.1 document generated from them.

Requests are decoded strictly into these Structs (a field of the wrong type,
or a reason over 10,000 characters, is a `422 ValidationError`); answers are
the records of SPEC §6 (`RunRecord`, `ActionRecord`, `Event`,
`ControlResult`). The OpenAPI document is built from the same types with
msgspec's JSON Schema support, so it cannot drift from what is served.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from flowsdk._phases import RunPhase
from flowsdk._records import ActionRecord, ControlResult, Event, LogEntry, Progress, RunRecord
from flowsdk.store import QueuedRequest

__all__ = [
    "MAX_BODY",
    "MAX_REASON",
    "AbortBody",
    "ErrorBody",
    "FailBody",
    "LogsAnswer",
    "ProgressAnswer",
    "RetryAnswer",
    "RunDetail",
    "RunQuery",
    "RunsQuery",
    "StartAnswer",
    "StartBody",
    "StopBody",
    "TraceQuery",
    "WhoAmI",
    "openapi",
]

MAX_REASON = 10_000
"""The longest reason accepted, in characters (SPEC §6)."""
MAX_LOG_PAGE = 5_000
"""The most log records one `GET /api/runs/RUN/logs` answers (page on with `after`)."""
MAX_BODY = 1 << 20
"""The largest request body accepted, in bytes."""

Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON)] | None
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class AbortBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /api/runs/RUN/abort`: the run (neither field), one action's subtree, or a group."""

    action: Name | None = None
    group: Name | None = None
    reason: Reason = None


class StopBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /api/runs/RUN/stop`: stop and wait, or stop and abandon."""

    abandon: bool = False
    reason: Reason = None


class FailBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /api/runs/RUN/fail`: mark an action as failed."""

    action: Name
    reason: Reason = None


class StartBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /api/runs`: start a run of a task already recorded as a root task in this store."""

    task: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    name: Name | None = None


# A query string has no null: an absent parameter is UNSET (so `phase=null` is refused).
class RunsQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`GET /api/runs` query: filter by phase and by a substring of the name."""

    phase: RunPhase | msgspec.UnsetType = msgspec.UNSET
    name: Annotated[str, msgspec.Meta(max_length=200)] = ""
    limit: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 50


class RunQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`GET /api/runs/RUN` query: an earlier attempt, and the event log."""

    attempt: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | msgspec.UnsetType = msgspec.UNSET
    events: bool = False


class TraceQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`GET /api/runs/RUN/progress` and `/logs` query: an attempt, one action, a cursor."""

    attempt: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | msgspec.UnsetType = msgspec.UNSET
    action: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | msgspec.UnsetType = (
        msgspec.UNSET
    )
    after: Annotated[int, msgspec.Meta(ge=-1)] = -1
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LOG_PAGE)] = MAX_LOG_PAGE


class ProgressAnswer(msgspec.Struct, kw_only=True):
    """The progress reports of a run's actions, oldest first."""

    run: str
    progress: list[Progress]


class LogsAnswer(msgspec.Struct, kw_only=True):
    """The kept log records of a run's actions with `seq` after the cursor, oldest first."""

    run: str
    logs: list[LogEntry]


class RunDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One run: `{"run": RUN, "actions": [...], "queued_requests": [...]}`, plus `"events"`.

    `queued_requests` is `show --json`'s, encoded from the same `QueuedRequest`s: the
    control requests the live runner has not answered yet, oldest first (`[]` for a
    run that has ended). `events` only when asked for.
    """

    run: RunRecord
    actions: list[ActionRecord]
    queued_requests: list[QueuedRequest]
    events: list[Event] | None = None


class RetryAnswer(msgspec.Struct, kw_only=True):
    """`202` to a retry: the run and the attempt being started."""

    run: str
    attempt: int


class StartAnswer(msgspec.Struct, kw_only=True):
    """`202` to a start: the new run's name."""

    run: str


class WhoAmI(msgspec.Struct, kw_only=True):
    """The caller: its token's name (or the local console user) and role."""

    name: str
    role: str


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer: the error's name (`NotFoundError`, ...) and a message for a person."""

    error: str
    message: str


# -- the OpenAPI document -------------------------------------------------------------------

_ERRORS = {
    "400": "malformed JSON; without tokens, a Host header that names no loopback address "
    "(BadRequestError)",
    "401": "no or unknown token while tokens are configured (AuthenticationError)",
    "403": "the token's role lacks the permission (PermissionDeniedError), or the request "
    "came from a page of another origin (CrossOriginError)",
    "404": "run, action or path not found",
    "409": "refused by the run's current phase",
    "413": "request body too large",
    "415": "a request body that is not sent as application/json (UnsupportedMediaTypeError)",
    "422": "a field of the wrong type or value (ValidationError)",
    "503": "store locked (StoreLockedError)",
}


def _ref(t: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{t.__name__}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _answers(ok: str, schema: dict[str, Any], *errors: str) -> dict[str, Any]:
    answers: dict[str, Any] = {ok: {"description": "done", **_json(schema)}}
    for code in ("400", "401", "403", *errors, "503"):  # 400: any request, for its Host
        answers[code] = {"description": _ERRORS[code], **_json(_ref(ErrorBody))}
    return answers


def _query(struct: type[msgspec.Struct], components: dict[str, Any]) -> list[dict[str, Any]]:
    schema = components[struct.__name__]
    return [
        {"name": field, "in": "query", "required": False, "schema": prop}
        for field, prop in schema["properties"].items()
    ]


# One server-sent event as a client parses it: its name and its data (a JSON object).
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"enum": ["run", "action", "event", "queued", "end"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["event", "data"],
}
_RUN = {"name": "run", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi() -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of the JSON API (every path, itself included)."""
    types = [
        AbortBody,
        StopBody,
        FailBody,
        StartBody,
        RunsQuery,
        RunQuery,
        RunDetail,
        TraceQuery,
        ProgressAnswer,
        LogsAnswer,
        RetryAnswer,
        StartAnswer,
        WhoAmI,
        ErrorBody,
        ControlResult,
        RunRecord,
    ]
    _, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    outcome = {"oneOf": [_ref(ControlResult), _ref(ErrorBody)]}

    def control(body: type, summary: str, *, required: bool = False) -> dict[str, Any]:
        answers = _answers("200", _ref(ControlResult), "404", "413", "415", "422")
        answers["409"] = {"description": _ERRORS["409"], **_json(outcome)}
        return {
            "post": {
                "summary": summary,
                "parameters": [_RUN],
                "requestBody": {"required": required, **_json(_ref(body))},
                "responses": answers,
            }
        }

    paths: dict[str, Any] = {
        "/api/runs": {
            "get": {
                "summary": "The history, newest first",
                "parameters": _query(RunsQuery, components),
                "responses": _answers(
                    "200", {"type": "array", "items": _ref(RunRecord)}, "404", "422"
                ),
            },
            "post": {
                "summary": "Start a run of a recorded root task in a new process",
                "requestBody": {"required": True, **_json(_ref(StartBody))},
                "responses": _answers("202", _ref(StartAnswer), "404", "413", "415", "422"),
            },
        },
        "/api/runs/{run}": {
            "get": {
                "summary": "One run with its actions (and events)",
                "parameters": [_RUN, *_query(RunQuery, components)],
                "responses": _answers("200", _ref(RunDetail), "404", "422"),
            }
        },
        "/api/runs/{run}/progress": {
            "get": {
                "summary": "The progress reports of the run's actions (or one action's)",
                "parameters": [_RUN, *_query(TraceQuery, components)],
                "responses": _answers("200", _ref(ProgressAnswer), "404", "422"),
            }
        },
        "/api/runs/{run}/logs": {
            "get": {
                "summary": "The captured log records of the run's actions after a cursor",
                "parameters": [_RUN, *_query(TraceQuery, components)],
                "responses": _answers("200", _ref(LogsAnswer), "404", "422"),
            }
        },
        "/api/runs/{run}/stream": {
            "get": {
                "summary": "Live changes as server-sent events, until the run ends",
                "parameters": [_RUN],
                "responses": {
                    "200": {
                        "description": "event: run (then event: queued, the requests the "
                        "runner has not answered, when there are some), then one event: action "
                        "per action and the last 300 events; then event / action / run / "
                        "queued as they change; then end",
                        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                    },
                    **{k: v for k, v in _answers("200", {}, "404").items() if k != "200"},
                },
            }
        },
        "/api/runs/{run}/abort": control(AbortBody, "Abort the run, an action or a group"),
        "/api/runs/{run}/stop": control(StopBody, "Stop and wait, or stop and abandon"),
        "/api/runs/{run}/fail": control(FailBody, "Mark an action as failed", required=True),
        "/api/runs/{run}/retry": {
            "post": {
                "summary": "Start the next attempt in a new, detached runner process",
                "parameters": [_RUN],
                "responses": _answers("202", _ref(RetryAnswer), "404", "409", "415"),
            }
        },
        "/api/whoami": {
            "get": {
                "summary": "The caller's token name and role",
                "responses": _answers("200", _ref(WhoAmI)),
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": _answers("200", {"type": "object"}),
            }
        },
    }
    for item in paths.values():
        for operation in item.values():
            operation["security"] = [{"bearer": []}, {}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "flowsdk console API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
