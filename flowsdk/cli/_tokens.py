"""`flowsdk token create|list|revoke`: the console's tokens (SPEC §8).

A token's secret is printed once, by `create`, and never stored, logged or
shown again: the store keeps only its hash. Creating the first token puts
the store in token mode for good (every console request then needs one).
"""

from __future__ import annotations

import argparse
from typing import Any

from flowsdk._records import Role
from flowsdk._tokens import Tokens
from flowsdk.cli._output import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    Output,
    UsageError,
    format_time,
    open_client,
    table,
)
from flowsdk.errors import InvalidStateError

__all__ = ["register"]


def register(verbs: Any, common: argparse.ArgumentParser) -> None:
    """Add the `token` verb and its `create`, `list` and `revoke` sub-verbs."""
    parser = verbs.add_parser(
        "token",
        parents=[common],
        help="create, list and revoke console and API tokens",
        description="Tokens let people use the web console and its API: viewer reads, "
        "executor also starts and retries runs, operator also aborts, stops and marks as "
        "failed. Once a token exists the store is in token mode for good.",
    )
    parser.set_defaults(handler=_missing, parser=parser)
    sub = parser.add_subparsers(title="token verbs", dest="token_verb", metavar="VERB")
    create = sub.add_parser(
        "create",
        parents=[common],
        help="create a token and print its secret once",
        description="Create a token and print its secret (once: only its hash is stored).",
    )
    create.add_argument("name", metavar="NAME", help="the token's name (recorded as token:NAME)")
    create.add_argument(
        "--role",
        required=True,
        choices=[r.value for r in Role],
        help="viewer reads; executor also starts and retries; operator also controls runs",
    )
    create.set_defaults(handler=create_token, parser=create)
    listing = sub.add_parser(
        "list",
        parents=[common],
        help="list the tokens (never their secrets)",
        description="List every token: name, role, created, last used, revoked.",
    )
    listing.set_defaults(handler=list_tokens, parser=listing)
    revoke = sub.add_parser(
        "revoke",
        parents=[common],
        help="revoke a token (refused from the next request on)",
        description="Revoke a token. The store stays in token mode even with no token left.",
    )
    revoke.add_argument("name", metavar="NAME", help="the token's name")
    revoke.set_defaults(handler=revoke_token, parser=revoke)


def _missing(args: argparse.Namespace, out: Output) -> int:
    raise UsageError("name a token verb: create, list or revoke")


def create_token(args: argparse.Namespace, out: Output) -> int:
    """Create a token and print its secret."""
    with open_client(args) as client:
        try:
            secret = Tokens(client.store).create(args.name, Role(args.role))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if out.json:
        out.print_json({"name": args.name, "role": args.role, "token": secret})
    else:
        out.line(secret)
        out.stderr.write(
            f"flowsdk: token {args.name!r} ({args.role}) created; this is the only time its "
            "secret is shown: keep it somewhere safe\n"
        )
        out.stderr.flush()
    return EXIT_OK


def list_tokens(args: argparse.Namespace, out: Output) -> int:
    """List the tokens: name, role, created, last used, revoked."""
    with open_client(args) as client:
        tokens = Tokens(client.store).list()
    if out.json:
        out.print_json(
            [
                {
                    "name": t.name,
                    "role": t.role.value,
                    "created_at": t.created_at,
                    "last_used_at": t.last_used_at,
                    "revoked_at": t.revoked_at,
                }
                for t in tokens
            ]
        )
        return EXIT_OK
    if not tokens:
        out.line("no tokens: the console serves this machine only, without tokens")
        return EXIT_OK
    rows = [
        [
            t.name,
            t.role.value,
            format_time(t.created_at),
            format_time(t.last_used_at),
            format_time(t.revoked_at) if t.revoked_at else "-",
        ]
        for t in tokens
    ]
    out.lines(table(out, ["NAME", "ROLE", "CREATED", "LAST USED", "REVOKED"], rows))
    return EXIT_OK


def revoke_token(args: argparse.Namespace, out: Output) -> int:
    """Revoke a token; exit 3 if there is none of that name, 1 if it is revoked already."""
    with open_client(args) as client:
        tokens = Tokens(client.store)
        try:
            tokens.revoke(args.name)
        except InvalidStateError as exc:
            # `Tokens.revoke` refuses both alike; a name that was never a token's is
            # "not found" in the exit-code table, one revoked already is "refused".
            if any(t.name == args.name for t in tokens.list()):
                raise
            out.error(str(exc))
            return EXIT_NOT_FOUND
    if out.json:
        out.print_json({"name": args.name, "revoked": True})
    else:
        out.line(f"token {args.name!r} revoked")
    return EXIT_OK
