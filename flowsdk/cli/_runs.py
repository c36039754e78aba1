"""`flowsdk runs`: the execution history, newest first."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import msgspec

from flowsdk._phases import RunPhase
from flowsdk.cli._output import (
    EXIT_OK,
    Output,
    format_duration,
    format_time,
    open_client,
    table,
)

__all__ = ["positive_int", "register"]


def positive_int(text: str) -> int:
    """Parse a whole number >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, not {value}")
    return value


def _run_phase(text: str) -> RunPhase:
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
        "--phase", type=_run_phase, metavar="P", help="only runs in phase P (e.g. FAILED)"
    )
    parser.add_argument("--limit", type=positive_int, metavar="N", help="at most N runs")
    parser.set_defaults(handler=runs, parser=parser)


def runs(args: argparse.Namespace, out: Output) -> int:
    """List runs as an aligned table (or a JSON list of RUN objects)."""
    with open_client(args) as client:
        records = client.runs(phase=args.phase, limit=args.limit)
        url = client.store.url
    if out.json:
        out.print_json(msgspec.to_builtins(records))
        return EXIT_OK
    if not records:
        which = f"{args.phase.value} runs" if args.phase is not None else "runs"
        out.line(f"no {which} in {url}")
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [
        [
            r.name,
            r.phase.value,
            format_time(r.started_at),
            format_duration(r.started_at, r.ended_at, now=now),
            r.task or "-",
        ]
        for r in records
    ]
    out.lines(table(out, ["NAME", "PHASE", "STARTED", "DURATION", "TASK"], rows, phase_column=1))
    return EXIT_OK
