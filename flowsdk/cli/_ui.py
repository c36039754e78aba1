"""`flowsdk ui`: serve the web console and its JSON API (SPEC §8)."""

from __future__ import annotations

import argparse
from typing import Any

from flowsdk.cli._output import EXIT_USAGE, Output, UsageError, open_client

__all__ = ["register"]


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, not {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, not {value}")
    return value


def register(verbs: Any, common: argparse.ArgumentParser) -> None:
    """Add the `ui` verb."""
    parser = verbs.add_parser(
        "ui",
        parents=[common],
        help="serve the web console",
        description="Serve the web console and its JSON API until Ctrl-C. Without tokens it "
        "serves this machine only (loopback), as its operator; create tokens with "
        "`flowsdk token create` to serve other hosts.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, default=7410, help="port (default 7410; 0 picks a free one)"
    )
    parser.set_defaults(handler=ui, parser=parser)


def ui(args: argparse.Namespace, out: Output) -> int:
    """Serve the console until interrupted."""
    try:
        from flowsdk.ui import is_loopback, serve
    except ImportError as exc:
        out.error(
            f"the console needs the ui extra ({exc.name} is missing): pip install 'flowsdk[ui]'"
        )
        return EXIT_USAGE
    client = open_client(args)
    if not is_loopback(args.host) and not client.store.token_mode():
        client.close()
        raise UsageError(
            f"refusing to serve {args.host} without tokens: anyone who can reach it could "
            "control your runs. Create a token first (flowsdk token create NAME --role "
            "operator), or serve 127.0.0.1"
        )
    return serve(client.store, args.host, args.port)
