"""`flowsdk prune`: delete ended runs (never a live one) and give the space back."""

from __future__ import annotations

import argparse
import functools
import math
from datetime import timedelta
from typing import Any

import msgspec

from flowsdk._records import PruneReport, RunRecord
from flowsdk._text import visible
from flowsdk.cli._output import EXIT_OK, Output, UsageError, open_client, store_location
from flowsdk.cli._runs import run_phase, whole_number

__all__ = ["register"]

# How many run names a human report lists before it says "and N more".
_NAMES_SHOWN = 20


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of days >= 0, not {text!r}")
    return value


_count = functools.partial(whole_number, minimum=0)


def register(verbs: Any, common: argparse.ArgumentParser) -> None:
    """Add the `prune` verb."""
    parser = verbs.add_parser(
        "prune",
        parents=[common],
        help="delete ended runs and give the space back",
        description="Delete ended runs, every attempt of each, and give the space back to "
        "the file system. In scope: the runs whose latest attempt is in phase P (default: "
        "all); of those, all but the N newest, that ended more than DAYS days ago. A live "
        "(running or stopping) run is never deleted, even if it matched: it is named. "
        "Give at least one of the options.",
    )
    parser.add_argument(
        "--older-than",
        type=_days,
        metavar="DAYS",
        help="only runs that ended more than DAYS days ago (fractions allowed: 0.5)",
    )
    parser.add_argument("--keep", type=_count, metavar="N", help="keep the N newest runs")
    parser.add_argument(
        "--phase", type=run_phase, metavar="P", help="only runs in phase P (e.g. FAILED)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="delete nothing: say what would be deleted (reading the store is enough)",
    )
    parser.set_defaults(handler=prune, parser=parser)


def prune(args: argparse.Namespace, out: Output) -> int:
    """Delete what the options select; say what was deleted and which live runs were kept."""
    if args.older_than is None and args.keep is None and args.phase is None:
        raise UsageError(
            "say which runs to delete: --older-than DAYS, --keep N or --phase P "
            "(e.g. flowsdk prune --older-than 30)"
        )
    older = timedelta(days=args.older_than) if args.older_than is not None else None
    with open_client(args) as client:
        report = client.prune(
            older_than=older, keep=args.keep, phase=args.phase, dry_run=args.dry_run
        )
        where = store_location(client)
    if out.json:
        out.print_json(msgspec.to_builtins(report))
        return EXIT_OK
    out.lines(_report_lines(report, where))
    return EXIT_OK


def _report_lines(report: PruneReport, where: str) -> list[str]:
    lines = []
    delete, keep = ("would delete", "would keep") if report.dry_run else ("deleted", "kept")
    if report.deleted:
        runs = "run" if len(report.deleted) == 1 else "runs"
        attempts = "attempt" if report.attempts == 1 else "attempts"
        lines.append(
            f"{delete} {len(report.deleted):,} {runs} ({report.attempts:,} {attempts}) "
            f"from {where}: {_names(report.deleted)}"
        )
    else:
        lines.append(f"nothing to delete in {where}")
    if report.live:
        lines.append(
            f"{keep} {len(report.live):,} live run{'s' if len(report.live) != 1 else ''} that "
            f"matched (a live run is never deleted): {_names(report.live, phases=True)}"
        )
    if report.dry_run:
        lines.append("nothing was deleted (--dry-run)")
    if report.freed_bytes:
        lines.append(f"gave {_size(report.freed_bytes)} back to the file system")
    if report.note:
        lines.append(report.note)
    return lines


def _names(records: list[RunRecord], *, phases: bool = False) -> str:
    shown = [
        visible(r.name) + (f" ({r.phase.value})" if phases else "") for r in records[:_NAMES_SHOWN]
    ]
    more = len(records) - len(shown)
    return ", ".join(shown) + (f" and {more:,} more (--json lists them all)" if more else "")


def _size(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{count:,} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count:,} bytes"
