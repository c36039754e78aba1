"""`flowsdk runs`: the execution history, newest first."""

from __future__ import annotations

import argparse
import functools
from datetime import UTC, datetime
from typing import Any

import msgspec

from flowsdk._client import Client
from flowsdk._phases import RunPhase
from flowsdk._records import AbortInfo, RunRecord
from flowsdk._text import visible
from flowsdk.cli._output import (
    EXIT_OK,
    Output,
    format_duration,
    format_time,
    open_client,
    shortened,
    store_location,
    table,
)

__all__ = ["DEFAULT_LIMIT", "positive_int", "register", "run_phase", "whole_number"]

DEFAULT_LIMIT = 50
# A reason is cut to this many characters in the table (`show` shows more of it).
_REASON_WIDTH = 40


def whole_number(text: str, minimum: int = 1, meaning: str = "") -> int:
    """Parse a whole number >= `minimum` (argparse type); `meaning` says what a value means."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a number >= {minimum}{meaning}, not {value}")
    return value


positive_int = whole_number
# `--limit`: 0 lists all runs.
_limit = functools.partial(whole_number, minimum=0, meaning=" (0: all runs)")


def run_phase(text: str) -> RunPhase:
    try:
        return RunPhase(text.upper())
    except ValueError:
        choices = ", ".join(p.value for p in RunPhase)
        raise argparse.ArgumentTypeError(
            f"unknown run phase {text!r}; choose from {choices}"
        ) from None


def register(verbs: Any, common: argparse.ArgumentParser) -> None:
    """Add the `runs` verb."""
    parser = verbs.add_parser(
        "runs",
        parents=[common],
        help="list the execution history, newest first",
        description="List the runs in the store (latest attempt of each), newest first.",
    )
    parser.add_argument(
        "--phase", type=run_phase, metavar="P", help="only runs in phase P (e.g. FAILED)"
    )
    parser.add_argument(
        "--limit",
        type=_limit,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N runs (default {DEFAULT_LIMIT}; 0: all)",
    )
    parser.set_defaults(handler=runs, parser=parser)


def runs(args: argparse.Namespace, out: Output) -> int:
    """List runs as an aligned table (or a JSON list of RUN objects)."""
    with open_client(args) as client:
        # All of them, to say how many more there are beyond the limit.
        records = client.runs(phase=args.phase)
        where = store_location(client)
        more = max(len(records) - args.limit, 0) if args.limit else 0
        if args.limit:
            records = records[: args.limit]
        aborts = {} if out.json else _root_aborts(client, records)
    if out.json:
        out.print_json(msgspec.to_builtins(records))
        return EXIT_OK
    if not records:
        which = f"{args.phase.value} runs" if args.phase is not None else "runs"
        out.line(f"no {which} in {where}")
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [
        [
            visible(r.name),
            r.phase.value,
            str(r.attempt),
            format_time(r.started_at),
            format_duration(r.started_at, r.ended_at, now=now),
            visible(r.task or "-"),
            _reason(r, aborts.get(r.name)),
        ]
        for r in records
    ]
    headers = ["NAME", "PHASE", "ATTEMPT", "STARTED", "DURATION", "TASK", "REASON"]
    out.lines(table(out, headers, rows, phase_column=1))
    if more:
        out.line(f"{more:,} more: --limit {args.limit + more} (or --limit 0) to list them")
    return EXIT_OK


def _root_aborts(client: Client, records: list[RunRecord]) -> dict[str, AbortInfo]:
    """The abort of each ABORTED run's root: one keyed lookup per listed run."""
    found = {}
    for record in records:
        if record.phase is RunPhase.ABORTED and record.stop is None:
            root = client.store.load_actions(record.name, record.attempt, ["a0"])
            if root and root[0].abort is not None:
                found[record.name] = root[0].abort
    return found


def _reason(record: RunRecord, abort: AbortInfo | None) -> str:
    stop = record.stop
    if stop is not None and stop.reason:
        label, reason = "stop", stop.reason
    elif abort is not None and abort.reason:
        label, reason = abort.cause.value, abort.reason
    elif record.phase is RunPhase.CRASHED:
        return "runner gone"
    else:
        return ""
    return f"{label}: {shortened(reason, _REASON_WIDTH)}"
