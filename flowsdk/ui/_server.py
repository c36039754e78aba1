"""`flowsdk ui`: serve the console with uvicorn until Ctrl-C or SIGTERM (exit 0).

The first line on stdout, printed and flushed once the port accepts
connections, is `flowsdk console: http://HOST:PORT/` (scripts read it). The
log, refused requests included, goes to stderr.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import sys
from types import FrameType

import uvicorn

from flowsdk.store import Store
from flowsdk.ui._app import create_app

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "is_loopback", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7410
# Open streams are closed this long after Ctrl-C at the latest.
_SHUTDOWN_GRACE = 1


def is_loopback(host: str) -> bool:
    """Return whether `host` names this machine only (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """A uvicorn server that announces its address once it accepts connections.

    Ctrl-C and SIGTERM shut it down gracefully and the process exits 0 (uvicorn
    would raise the signal again after shutting down, ending with -15 or 130).
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        sys.stdout.write(f"flowsdk console: http://{shown}:{port}/\n")
        sys.stdout.flush()


def serve(store: Store, host: str, port: int) -> int:
    """Serve the console of `store` on `host:port` until interrupted; return the exit code.

    The caller has checked that a non-loopback `host` is allowed (tokens exist).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("flowsdk ui: %(levelname)s: %(message)s"))
    ui_logger = logging.getLogger("flowsdk.ui")
    ui_logger.addHandler(handler)
    ui_logger.setLevel(logging.INFO)
    config = uvicorn.Config(
        create_app(store),
        host=host,
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=_SHUTDOWN_GRACE,
        lifespan="off",
    )
    server = _Server(config)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        pass  # a second Ctrl-C during shutdown: stop now, quietly
    finally:
        ui_logger.removeHandler(handler)
        store.close()
    if not server.started:
        sys.stderr.write(f"flowsdk: error: the console could not listen on {host}:{port}\n")
        return 1
    return 0
