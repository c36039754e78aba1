"""`flowsdk logs RUN [ACTION] [--follow]`: the log records captured in a run's actions."""

from __future__ import annotations

import argparse
import time
from typing import Any

from flowsdk._client import Client
from flowsdk._records import LogEntry
from flowsdk.cli._detail import log_lines
from flowsdk.cli._output import EXIT_OK, Output, open_client
from flowsdk.cli._runs import positive_int

__all__ = ["register"]

POLL_INTERVAL = 0.1  # how often --follow reads new records


def register(verbs: Any, common: argparse.ArgumentParser) -> None:
    """Add the `logs` verb."""
    parser = verbs.add_parser(
        "logs",
        parents=[common],
        help="print the log records of a run's actions",
        description="Print the logging records emitted in a run's action bodies (all actions, "
        "or one), oldest first. An action keeps its last 1,000 records, each at most 8 KiB. "
        "With --follow, go on printing new records until the run ends. With --json, one "
        "record object per line.",
    )
    parser.add_argument("run", metavar="RUN", help="the run's name")
    parser.add_argument("action", metavar="ACTION", nargs="?", help="only this action's records")
    parser.add_argument("--follow", "-f", action="store_true", help="follow until the run ends")
    parser.add_argument(
        "--attempt", type=positive_int, metavar="N", help="attempt N (default: the latest)"
    )
    parser.set_defaults(handler=logs, parser=parser)


def _emit(out: Output, entries: list[LogEntry], *, every_action: bool) -> None:
    if out.json:
        for entry in entries:
            out.print_json(entry, compact=True)
    elif entries:
        out.lines(log_lines(entries, action=every_action))


def logs(args: argparse.Namespace, out: Output) -> int:
    """Print the run's (or the action's) records; with --follow, until the run ends."""
    with open_client(args) as client:
        if args.action is not None:
            # ActionNotFoundError names the run's first and last actions.
            record = client.get_action(args.run, args.action, attempt=args.attempt).record
        else:
            record = client.get_record(args.run, attempt=args.attempt)
        attempt = record.attempt
        entries = client.logs(record.name, attempt, args.action)
        if not entries and not args.follow and not out.json:
            out.line("(no log records captured)")
        _emit(out, entries, every_action=args.action is None)
        if args.follow:
            cursor = entries[-1].seq if entries else -1
            _follow(client, out, args, attempt, cursor, ended=record.phase.terminal)
    return EXIT_OK


def _follow(
    client: Client, out: Output, args: argparse.Namespace, attempt: int, cursor: int, ended: bool
) -> None:
    while not ended:
        time.sleep(POLL_INTERVAL)
        # Read the phase first: records written before the end are read after it.
        ended = client.get_run(args.run, attempt=attempt).record.phase.terminal
        entries = client.logs(args.run, attempt, args.action, cursor)
        if entries:
            cursor = entries[-1].seq
            _emit(out, entries, every_action=args.action is None)
