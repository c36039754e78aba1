"""Refuse what another web page could make the operator's browser send to the console.

A browser lets any page it shows send requests to any address, the console's
included: a form, or `fetch(URL, {mode: "no-cors"})` with a "simple" content
type (`text/plain`), goes out without asking the console first; only the
answer is hidden from the page. Without tokens the console asks for no
credentials, so such a request would act as the operator. So, before routing
and authentication, for every request:

- **`Host`**, while the store has no token (the console then listens on
  loopback only): a loopback name or address (`localhost`, `127.0.0.1`,
  `[::1]`), with the listening port or none; otherwise `400`. A page whose own
  host name an attacker re-points at 127.0.0.1 (DNS rebinding) is same-origin
  with the console as far as the browser knows, and could read the answers;
  its requests carry that name, and are refused. With tokens, `Host` stays
  open (the console may be served under any name): a rebinding page has no
  token to send, since tokens are never cookies.
- **Another origin**: a state-changing request (any method but `GET`, `HEAD`
  and `OPTIONS`) whose `Origin` is present and is not the console's own
  (`scheme://host:port` of `Host`), or that says `Sec-Fetch-Site: cross-site`,
  gets `403`.
- **`Content-Type`**: a state-changing request with a body (or a content
  type) must be `application/json` (parameters such as `charset` allowed),
  otherwise `415`. Browsers send that type from another origin only after a
  CORS preflight, which the console never approves: it sends no CORS header.

Each refusal is `{"error": NAME, "message": TEXT}` and is logged on stderr, as
the API's other refusals are.
"""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from flowsdk.errors import FlowError
from flowsdk.store import Store
from flowsdk.ui._api import ApiError, error_response, flow_error

__all__ = ["Guard", "is_loopback"]

logger = logging.getLogger("flowsdk.ui")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
JSON_TYPE = "application/json"


def _authority(scheme: str, netloc: str) -> tuple[str, int | None] | None:
    """Return the host (lower case, IPv6 without brackets) and port of `netloc`, or None.

    `urlsplit` parses the bracketed IPv6 form and the port. None for what names
    no host: `evil:abc`, `a b/c`, `user@host`, an empty one.
    """
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return None
    extra = parts.username is not None or parts.path or parts.query or parts.fragment
    if not parts.hostname or extra:
        return None
    return parts.hostname, port


def _origin(scheme: str, netloc: str) -> tuple[str, str, int | None] | None:
    """Return `(scheme, host, port)` of `scheme://netloc`, the default port filled in."""
    found = _authority(scheme, netloc)
    if found is None:
        return None
    host, port = found
    return scheme.lower(), host, port if port is not None else _DEFAULT_PORTS.get(scheme)


def is_loopback(host: str) -> bool:
    """Return whether `host` names this machine only (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: the three checks of this module, before the application sees a request.

    The store is asked whether it is in token mode while it is not: once it is,
    it stays so (SPEC §8), and that answer is kept.
    """

    def __init__(self, app: ASGIApp, store: Store) -> None:
        self.app = app
        self.store = store
        self._tokens = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            refusal = await self._refusal(scope)
        except FlowError as exc:  # the token-mode read failed (a locked store: 503)
            refusal = flow_error(exc)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        logger.warning(
            "refused %s %s: %d %s", scope["method"], scope["path"], refusal.status, refusal.message
        )
        await error_response(refusal)(scope, receive, send)

    async def _refusal(self, scope: Scope) -> ApiError | None:
        headers = Headers(scope=scope)
        scheme = scope.get("scheme", "http")
        host = headers.get("host", "")
        if not self._tokens:
            self._tokens = await run_in_threadpool(self.store.token_mode)
        if not self._tokens:
            refused = self._foreign_host(scope, scheme, host)
            if refused is not None:
                return refused
        if scope["method"] in SAFE_METHODS:
            return None
        return self._cross_origin(headers, scheme, host) or self._not_json(headers)

    @staticmethod
    def _foreign_host(scope: Scope, scheme: str, host: str) -> ApiError | None:
        server = scope.get("server")
        listening = server[1] if server else None
        found = _authority(scheme, host)
        if found is not None and is_loopback(found[0]):
            port = found[1]
            if port is None or listening is None or port == listening:
                return None
        on = f" on port {listening}" if listening else ""
        return ApiError(
            400,
            "BadRequestError",
            f"the Host header {host!r} does not name this console: without tokens it "
            f"answers only requests addressed to localhost, 127.0.0.1 or [::1]{on} "
            "(a guard against DNS rebinding)",
        )

    @staticmethod
    def _cross_origin(headers: Headers, scheme: str, host: str) -> ApiError | None:
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return ApiError(
                403,
                "CrossOriginError",
                "refused a request sent by a page of another site (Sec-Fetch-Site: "
                "cross-site): the console acts only on requests from its own pages or "
                "from programs",
            )
        origin = headers.get("origin")
        if origin is None:
            return None
        their_scheme, sep, their_netloc = origin.partition("://")
        theirs = _origin(their_scheme, their_netloc) if sep else None  # "null" is no origin
        if theirs is not None and theirs == _origin(scheme, host):
            return None
        return ApiError(
            403,
            "CrossOriginError",
            f"refused a request from the origin {origin!r}: the console acts only on "
            f"requests from its own origin ({scheme}://{host}) or from programs that "
            "send no Origin header",
        )

    @staticmethod
    def _not_json(headers: Headers) -> ApiError | None:
        kind = headers.get("content-type")
        length = headers.get("content-length", "0").strip()
        has_body = "transfer-encoding" in headers or length.lstrip("0") != ""
        if kind is None and not has_body:
            return None  # nothing sent (`curl -X POST .../retry`): nothing to decode
        if kind is not None and kind.partition(";")[0].strip().lower() == JSON_TYPE:
            return None
        said = f"this one says {kind!r}" if kind is not None else "this one has none"
        return ApiError(
            415,
            "UnsupportedMediaTypeError",
            f"a request body must be JSON, sent with 'Content-Type: {JSON_TYPE}' ({said})",
        )
