"""The JSON API of SPEC §8: a thin layer over `ControlService`.

Each request is made by the actor its bearer token names (`token:NAME`, with
the token's role), or by the local console user when the store has never had
a token. The service checks the permission; this module only decodes the
request, calls the service in a worker thread (store calls block) and turns
its answer or error into a status code and a JSON body.
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from flowsdk._records import Actor, ControlResult, Outcome, Role
from flowsdk._service import ControlService, Permission
from flowsdk._tokens import Tokens, token_actor
from flowsdk.errors import (
    ActionNotFoundError,
    FlowError,
    InvalidStateError,
    PermissionDeniedError,
    RunExistsError,
    RunNotFoundError,
    StoreLockedError,
)
from flowsdk.store import Store
from flowsdk.ui._bodies import (
    MAX_BODY,
    AbortBody,
    ErrorBody,
    FailBody,
    LogsAnswer,
    ProgressAnswer,
    RetryAnswer,
    RunDetail,
    RunQuery,
    RunsQuery,
    StartAnswer,
    StartBody,
    StopBody,
    TraceQuery,
    WhoAmI,
)

__all__ = [
    "ApiError",
    "api_errors",
    "authenticate",
    "error_response",
    "flow_error",
    "json_response",
    "local_actor",
    "routes",
]

logger = logging.getLogger("flowsdk.ui")
S = TypeVar("S", bound=msgspec.Struct)
_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """An answer other than success: a status, an error name and a message."""

    def __init__(
        self, status: int, error: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers or {}


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Encode `value` (builtins or msgspec records) as a JSON answer."""
    return Response(_encoder.encode(value), status, headers, media_type="application/json")


def error_response(exc: ApiError) -> Response:
    """The `{"error": NAME, "message": TEXT}` answer of an `ApiError`."""
    return json_response(ErrorBody(error=exc.error, message=exc.message), exc.status, exc.headers)


def local_actor() -> Actor:
    """The actor of a console without tokens: `console USER@HOST`, an operator."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor(name=f"console {user}@{socket.gethostname()}", role=Role.OPERATOR)


def authenticate(store: Store, authorization: str | None) -> Actor:
    """Return who makes a request, from its `Authorization` header (blocking: a store read).

    Raises:
        ApiError: 401 when the store is in token mode and the token is missing,
            unknown or revoked.
    """
    if not store.token_mode():
        return local_actor()
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(
            401,
            "AuthenticationError",
            "this console needs a token: send 'Authorization: Bearer TOKEN' "
            "(create one with: flowsdk token create NAME --role viewer)",
            {"WWW-Authenticate": "Bearer"},
        )
    token = Tokens(store).authenticate(secret.strip())
    if token is None:
        raise ApiError(
            401,
            "AuthenticationError",
            "unknown or revoked token",
            {"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return token_actor(token)


Handler = Callable[[Request, ControlService], Awaitable[Response]]


def api_errors(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap an API handler: authenticate, then turn every expected error into its answer."""

    async def endpoint(request: Request) -> Response:
        store: Store = request.app.state.store
        actor: Actor | None = None
        try:
            actor = await run_in_threadpool(
                authenticate, store, request.headers.get("authorization")
            )
            return await handler(request, ControlService(store, actor))
        except ApiError as exc:
            if exc.status == 401:
                logger.warning(
                    "refused %s %s: 401 %s", request.method, request.url.path, exc.message
                )
            return error_response(exc)
        except FlowError as exc:
            answer = flow_error(exc)
            if answer.status == 403:
                logger.warning("refused %s %s: 403 %s", request.method, request.url.path, exc)
            return error_response(answer)

    return endpoint


def flow_error(exc: FlowError) -> ApiError:
    """The answer to an expected `FlowError`: its status, its class name and its message."""
    name = type(exc).__name__
    if isinstance(exc, PermissionDeniedError):
        return ApiError(403, name, str(exc))
    if isinstance(exc, RunNotFoundError | ActionNotFoundError):
        return ApiError(404, name, str(exc))
    if isinstance(exc, InvalidStateError | RunExistsError):
        return ApiError(409, name, str(exc))
    if isinstance(exc, StoreLockedError):
        return ApiError(503, name, str(exc), {"Retry-After": "1"})
    return ApiError(500, name, str(exc))


async def _body(request: Request, kind: type[S], *, required: bool) -> S:
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY:
        raise ApiError(413, "BadRequestError", f"the body is over {MAX_BODY} bytes")
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise ApiError(413, "BadRequestError", f"the body is over {MAX_BODY} bytes")
    if not data.strip() and not required:
        data = b"{}"
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "ValidationError", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "BadRequestError", f"the body is not valid JSON: {exc}") from None


def _query(request: Request, kind: type[S]) -> S:
    try:
        return msgspec.convert(dict(request.query_params), kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "ValidationError", f"query: {exc}") from None


def _control_answer(result: ControlResult) -> Response:
    # A request the current phase refuses answers the outcome itself, with 409.
    return json_response(result, 409 if result.outcome is Outcome.REFUSED else 200)


# -- the paths -----------------------------------------------------------------------------


async def list_runs(request: Request, service: ControlService) -> Response:
    """`GET /api/runs?phase=P&name=TEXT&limit=N`."""
    query = _query(request, RunsQuery)
    limit = query.limit or None
    phase = query.phase if query.phase is not msgspec.UNSET else None
    records = await run_in_threadpool(
        partial(service.runs, phase=phase, limit=None if query.name else limit)
    )
    if query.name:
        records = [r for r in records if query.name in r.name][:limit]
    return json_response(records)


async def get_run(request: Request, service: ControlService) -> Response:
    """`GET /api/runs/RUN?attempt=N&events=true`, with the requests the runner has not answered."""
    query = _query(request, RunQuery)
    name = request.path_params["run"]
    attempt = query.attempt if query.attempt is not msgspec.UNSET else None
    run = await run_in_threadpool(partial(service.get_run, name, attempt=attempt))

    def detail() -> RunDetail:
        # As `show --json`: an attempt that has ended (an earlier one included) costs no read.
        queued = [] if run.record.phase.terminal else service.queued_requests(name)
        return RunDetail(
            run=run.record,
            actions=run.actions,
            queued_requests=queued,
            events=run.events if query.events else None,
        )

    return json_response(await run_in_threadpool(detail))


async def abort(request: Request, service: ControlService) -> Response:
    """`POST /api/runs/RUN/abort`."""
    body = await _body(request, AbortBody, required=False)
    if body.action is not None and body.group is not None:
        raise ApiError(422, "ValidationError", "name an action or a group, not both")
    call = partial(
        service.abort,
        request.path_params["run"],
        body.action,
        group=body.group,
        reason=body.reason,
    )
    return _control_answer(await run_in_threadpool(call))


async def stop(request: Request, service: ControlService) -> Response:
    """`POST /api/runs/RUN/stop`."""
    body = await _body(request, StopBody, required=False)
    call = partial(
        service.stop, request.path_params["run"], abandon=body.abandon, reason=body.reason
    )
    return _control_answer(await run_in_threadpool(call))


async def fail(request: Request, service: ControlService) -> Response:
    """`POST /api/runs/RUN/fail`."""
    body = await _body(request, FailBody, required=True)
    call = partial(service.mark_failed, request.path_params["run"], body.action, reason=body.reason)
    return _control_answer(await run_in_threadpool(call))


async def retry(request: Request, service: ControlService) -> Response:
    """`POST /api/runs/RUN/retry`: the next attempt, in a detached runner."""
    run, attempt = await run_in_threadpool(service.launch_retry, request.path_params["run"])
    return json_response(RetryAnswer(run=run, attempt=attempt), 202)


async def start(request: Request, service: ControlService) -> Response:
    """`POST /api/runs`: a new run of a recorded root task, in a detached runner."""
    body = await _body(request, StartBody, required=True)

    def launch() -> str:
        service.authorize(Permission.EXECUTE)
        if service.store.root_task_workdir(body.task) is None:
            raise ApiError(
                422,
                "ValidationError",
                f"unknown task {body.task!r}: only a task already recorded as the root task "
                "of a run in this store can be started here",
            )
        try:
            return service.launch_run(body.task, body.args, body.kwargs, name=body.name)
        except (ValueError, TypeError) as exc:  # an unusable run name or keyword
            raise ApiError(422, "ValidationError", str(exc)) from None
        except InvalidStateError as exc:  # the runner refused the arguments
            raise ApiError(422, "ValidationError", str(exc)) from None

    return json_response(StartAnswer(run=await run_in_threadpool(launch)), 202)


def _trace_query(request: Request) -> tuple[str, int | None, str | None, int, int]:
    query = _query(request, TraceQuery)
    attempt = query.attempt if query.attempt is not msgspec.UNSET else None
    action = query.action if query.action is not msgspec.UNSET else None
    return request.path_params["run"], attempt, action, query.after, query.limit


async def progress(request: Request, service: ControlService) -> Response:
    """`GET /api/runs/RUN/progress?attempt=N&action=A`."""
    name, attempt, action, _, _ = _trace_query(request)
    reports = await run_in_threadpool(partial(service.progress, name, attempt, action))
    return json_response(ProgressAnswer(run=name, progress=reports))


async def logs(request: Request, service: ControlService) -> Response:
    """`GET /api/runs/RUN/logs?attempt=N&action=A&after=SEQ&limit=N` (at most 5,000)."""
    name, attempt, action, after, limit = _trace_query(request)
    records = await run_in_threadpool(partial(service.logs, name, attempt, action, after, limit))
    return json_response(LogsAnswer(run=name, logs=records))


async def whoami(request: Request, service: ControlService) -> Response:
    """`GET /api/whoami`."""
    name = service.actor.name
    return json_response(WhoAmI(name=name.removeprefix("token:"), role=service.actor.role.value))


async def runs(request: Request, service: ControlService) -> Response:
    """`/api/runs`: GET the history, POST a new run (one route, so 405 names both)."""
    return await (list_runs if request.method == "GET" else start)(request, service)


def routes() -> list[tuple[str, Handler, list[str]]]:
    """Return (path, handler, methods) of every JSON path but the stream and the document."""
    return [
        ("/api/runs", runs, ["GET", "POST"]),
        ("/api/runs/{run}", get_run, ["GET"]),
        ("/api/runs/{run}/abort", abort, ["POST"]),
        ("/api/runs/{run}/stop", stop, ["POST"]),
        ("/api/runs/{run}/fail", fail, ["POST"]),
        ("/api/runs/{run}/retry", retry, ["POST"]),
        ("/api/runs/{run}/progress", progress, ["GET"]),
        ("/api/runs/{run}/logs", logs, ["GET"]),
        ("/api/whoami", whoami, ["GET"]),
    ]
