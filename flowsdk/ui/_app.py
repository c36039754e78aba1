"""The console's Starlette application: the JSON API, the stream, and the static pages.

Pages are static shells from files inside the package; they hold no data and
are served to anyone. `Guard` (`_guard.py`) first refuses what another web
page could make a browser send. Every answer carries `Content-Security-Policy:
default-src 'self'`, so a page runs no inline script and loads nothing from
another origin, whatever text a workflow recorded.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowsdk.store import Store
from flowsdk.ui._api import ApiError, api_errors, error_response, json_response, routes
from flowsdk.ui._bodies import openapi
from flowsdk.ui._guard import Guard
from flowsdk.ui._stream import stream

__all__ = ["create_app"]

_SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
}


class _SecurityHeaders:
    """Add the CSP and its companions to every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _static(name: str) -> bytes:
    return (resources.files("flowsdk.ui") / "static" / name).read_bytes()


def _page(name: str) -> Any:
    async def endpoint(request: Request) -> Response:
        return Response(_static(name), media_type=_STATIC_TYPES[".html"])

    return endpoint


async def _asset(request: Request) -> Response:
    name = request.path_params["name"]
    suffix = "." + name.rpartition(".")[2]
    if "/" in name or name.startswith(".") or suffix not in _STATIC_TYPES or suffix == ".html":
        raise HTTPException(404)
    try:
        data = _static(name)
    except (FileNotFoundError, IsADirectoryError):
        raise HTTPException(404) from None
    return Response(data, media_type=_STATIC_TYPES[suffix], headers={"Cache-Control": "no-cache"})


async def _openapi(request: Request) -> Response:
    return json_response(openapi())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = ApiError(404, "NotFoundError", f"no such path: {request.url.path}")
    elif exc.status_code == 405:
        error = ApiError(
            405,
            "MethodNotAllowedError",
            f"{request.method} is not allowed here",
            dict(exc.headers or {}),  # `Allow`: the methods that are
        )
    else:
        error = ApiError(exc.status_code, "BadRequestError", str(exc.detail))
    return error_response(error)


def create_app(store: Store) -> Starlette:
    """Return the console application serving `store`."""
    api = [Route(path, api_errors(h), methods=methods) for path, h, methods in routes()]
    app = Starlette(
        routes=[
            *api,
            Route("/api/runs/{run}/stream", api_errors(stream), methods=["GET"]),
            Route("/api/openapi.json", api_errors(lambda r, s: _openapi(r)), methods=["GET"]),
            Route("/", _page("index.html"), methods=["GET"]),
            Route("/runs/{run}", _page("run.html"), methods=["GET"]),
            Route("/static/{name}", _asset, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.store = store
    app.add_middleware(Guard, store=store)  # before routing: a refused request reaches nothing
    app.add_middleware(_SecurityHeaders)  # the outermost: refusals carry the headers too
    return app
