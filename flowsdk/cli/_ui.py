"""`flowsdk ui`: serve the web console and its JSON API (SPEC §8)."""

from __future__ import annotations

import argparse
from typing import Any

from flowsdk.cli._output import EXIT_USAGE, Output, UsageError, open_client
from flowsdk.store._location import masked_url

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
        "`flowsdk token create` to serve other hosts. The first line on stdout is the "
        'console\'s address (with --json, the object {"url": ..., "store": ...}).',
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, default=7410, help="port (default 7410; 0 picks a free one)"
    )
    parser.set_defaults(handler=ui, parser=parser)


def ui(args: argparse.Namespace, out: Output) -> int:
    """Serve the console until interrupted.

    The store is read before anything is served, so a file that is no flowsdk
    store fails at once, as with every verb (exit 5). An address it cannot
    listen on (in use, not this machine's, a host name that does not resolve)
    is a usage error (exit 2): what to change is `--host` or `--port`.
    """
    try:
        from flowsdk.ui import ListenError, is_loopback, serve
    except ImportError as exc:
        out.error(
            f"the console needs the ui extra ({exc.name} is missing): pip install 'flowsdk[ui]'"
        )
        return EXIT_USAGE
    client = open_client(args)
    try:
        tokens = client.store.token_mode()  # the first read: StoreError -> exit 5
    except BaseException:
        client.close()
        raise
    if not is_loopback(args.host) and not tokens:
        client.close()
        raise UsageError(
            f"refusing to serve {args.host} without tokens: anyone who can reach it could "
            "control your runs. Create a token first (flowsdk token create NAME --role "
            "operator), or serve 127.0.0.1"
        )
    store = masked_url(client.store.url)  # scripts log this line: never a password

    def announce(url: str) -> None:
        if out.json:
            out.print_json({"url": url, "store": store}, compact=True)
        else:
            out.line(f"flowsdk console: {url}")

    try:
        return serve(client.store, args.host, args.port, announce=announce)
    except ListenError as exc:
        out.error(str(exc))  # one line: no usage text, the message says what to change
        return EXIT_USAGE
