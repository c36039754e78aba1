"""`flowsdk ui`: serve the console with uvicorn until Ctrl-C or SIGTERM (exit 0).

The address is bound before uvicorn starts, so that an address in use, not
this machine's or a host name that does not resolve is one `ListenError`
that says what to change, not uvicorn's raw error and `sys.exit(3)`. Once the
port accepts connections, the address is announced once (by default the
line `flowsdk console: http://HOST:PORT/` on stdout, flushed: scripts read
it). The log, refused requests included, goes to stderr, once each, with
control characters made visible (a request's path is anyone's text).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from flowsdk._text import visible
from flowsdk.store import Store
from flowsdk.ui._app import create_app
from flowsdk.ui._guard import is_loopback

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ListenError", "is_loopback", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7410
# Open streams are closed this long after Ctrl-C at the latest.
_SHUTDOWN_GRACE = 1
_BACKLOG = 2048  # uvicorn's default

# Why an address cannot be listened on, and what to change, by errno.
_WHY = {
    errno.EADDRINUSE: "the address is already in use; choose another --port",
    errno.EACCES: "permission denied (a port below 1024 needs privileges); choose another --port",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address; choose another --host",
}


class ListenError(Exception):
    """The console cannot listen on the address it was given; the message says what to change."""


def _listen(host: str, port: int) -> list[socket.socket]:
    """Bind and listen on every address `host` names, as `loop.create_server` would.

    Raises:
        ListenError: the host name does not resolve, or an address cannot be bound.
    """
    where = f"{host}:{port}"
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(
            f"cannot listen on {where}: the host name cannot be resolved ({exc.strerror}); "
            "choose another --host"
        ) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):  # the same one once
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # an IPv6 address serves IPv6 only, as in asyncio
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        why = _WHY.get(exc.errno or 0, f"{exc.strerror or exc}; choose another --host or --port")
        raise ListenError(f"cannot listen on {where}: {why}") from None
    return sockets


def _announce(url: str) -> None:
    sys.stdout.write(f"flowsdk console: {url}\n")
    sys.stdout.flush()


class _LogFormatter(logging.Formatter):
    """`flowsdk ui: warning: refused GET /api/runs: 401 ...`, control characters made visible.

    The level in lower case, as in the CLI's `flowsdk: error: ...` lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        return f"flowsdk ui: {record.levelname.lower()}: {visible(record.getMessage())}"


class _Server(uvicorn.Server):
    """A uvicorn server that announces its address once it accepts connections.

    Ctrl-C and SIGTERM shut it down gracefully and the process exits 0 (uvicorn
    would raise the signal again after shutting down, ending with -15 or 130).
    """

    def __init__(self, config: uvicorn.Config, announce: Callable[[str], None]) -> None:
        super().__init__(config)
        self._announce = announce

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self._announce(f"http://{shown}:{port}/")


def serve(
    store: Store, host: str, port: int, *, announce: Callable[[str], None] | None = None
) -> int:
    """Serve the console of `store` on `host:port` until interrupted; return the exit code.

    The caller has checked that a non-loopback `host` is allowed (tokens exist).
    `announce` is called with the console's URL once it accepts connections
    (default: print `flowsdk console: URL` on stdout). The store is closed
    when the console stops, or fails to start.

    Raises:
        ListenError: it cannot listen on `host:port`; nothing was served.
    """
    try:
        sockets = _listen(host, port)
    except ListenError:
        store.close()
        raise
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    ui_logger = logging.getLogger("flowsdk.ui")
    ui_logger.addHandler(handler)
    ui_logger.setLevel(logging.INFO)
    # Printed here once: a handler above (the CLI's, on "flowsdk") would print each again.
    propagate, ui_logger.propagate = ui_logger.propagate, False
    config = uvicorn.Config(
        create_app(store),
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=_SHUTDOWN_GRACE,
        lifespan="off",
    )
    server = _Server(config, announce if announce is not None else _announce)
    try:
        asyncio.run(server.serve(sockets))
    except KeyboardInterrupt:
        pass  # a second Ctrl-C during shutdown: stop now, quietly
    finally:
        for sock in sockets:
            sock.close()  # closing twice is harmless; uvicorn closes them on a clean stop
        ui_logger.removeHandler(handler)
        ui_logger.propagate = propagate
        store.close()
    if not server.started:
        sys.stderr.write(f"flowsdk: error: the console could not listen on {host}:{port}\n")
        return 1
    return 0
