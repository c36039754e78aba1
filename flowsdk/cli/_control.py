"""`flowsdk abort`, `flowsdk stop` and `flowsdk fail`: control a run from outside.

Each returns once the live runner has applied the request, or at once when the
target has already ended or its runner is gone, and says which. With `--wait`
it then waits for the run to end and reports its final phase. Repeating a
request is harmless: an abort of an action that has ended exits 0 and says so.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any

import msgspec

from flowsdk._client import Client
from flowsdk._records import ControlResult, Outcome
from flowsdk._text import MAX_REASON, check_reason, visible
from flowsdk.cli._output import (
    EXIT_OK,
    EXIT_QUEUED,
    EXIT_REFUSED,
    Output,
    UsageError,
    open_client,
)
from flowsdk.cli._show import wait_for_end

__all__ = ["read_reason", "register"]


def read_reason(args: argparse.Namespace) -> str | None:
    """Return the reason of `--reason` or `--reason-file`, at most `MAX_REASON` characters.

    Raises:
        UsageError: the file cannot be read, or the reason is too long.
    """
    reason: str | None = args.reason
    path: str | None = args.reason_file
    if path is not None:
        try:
            if path == "-":
                reason = _read_stdin(MAX_REASON + 1)
            else:
                with open(path, encoding="utf-8", errors="replace") as f:
                    reason = f.read(MAX_REASON + 1)
        except OSError as exc:
            raise UsageError(f"cannot read the reason from {path!r}: {exc.strerror}") from None
        reason = reason.rstrip("\n")
    try:
        return check_reason(reason)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _read_stdin(size: int) -> str:
    """Read up to `size` characters of stdin as UTF-8, undecodable bytes as U+FFFD (as a file)."""
    binary = getattr(sys.stdin, "buffer", None)
    if binary is None:  # a text stream put in place of stdin (a caller of main())
        return sys.stdin.read(size)
    text = io.TextIOWrapper(binary, encoding="utf-8", errors="replace")
    try:
        return text.read(size)
    finally:
        text.detach()  # so that closing the wrapper never closes stdin


def _add_common(parser: argparse.ArgumentParser) -> None:
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--reason", metavar="TEXT", help=f"why (recorded; at most {MAX_REASON:,} characters)"
    )
    given.add_argument(
        "--reason-file", metavar="PATH", help="read the reason from a file (- for stdin)"
    )
    parser.add_argument(
        "--wait", action="store_true", help="then wait until the run ends and report its phase"
    )


def register(verbs: Any, common: argparse.ArgumentParser) -> None:
    """Add the `abort`, `stop` and `fail` verbs."""
    abort_parser = verbs.add_parser(
        "abort",
        parents=[common],
        help="abort a run, one action's subtree, or a group's actions",
        description="Abort the run (no ACTION), one action and its descendants, or every "
        "action of a group. Idempotent: aborting an action that has ended exits 0 and says so.",
    )
    abort_parser.add_argument("run", metavar="RUN", help="the run's name")
    abort_parser.add_argument("action", metavar="ACTION", nargs="?", help="an action, e.g. a3")
    abort_parser.add_argument("--group", metavar="G", help="abort every action of group G")
    _add_common(abort_parser)
    abort_parser.set_defaults(handler=abort, parser=abort_parser)

    stop_parser = verbs.add_parser(
        "stop",
        parents=[common],
        help="stop a run: wait for its actions, or abandon them",
        description="Stop a run: start nothing new and wait for in-progress actions "
        "(default), or abandon them (--abandon, which also escalates a run already "
        "STOPPING). A second stop-and-wait is refused (exit 1).",
    )
    stop_parser.add_argument("run", metavar="RUN", help="the run's name")
    stop_parser.add_argument(
        "--abandon", action="store_true", help="stop waiting for in-progress actions"
    )
    _add_common(stop_parser)
    stop_parser.set_defaults(handler=stop, parser=stop_parser)

    fail_parser = verbs.add_parser(
        "fail",
        parents=[common],
        help="mark an action as failed",
        description="Mark an action as failed: its body is cancelled, it ends FAILED and "
        "its parent gets RuntimeUserError.",
    )
    fail_parser.add_argument("run", metavar="RUN", help="the run's name")
    fail_parser.add_argument("action", metavar="ACTION", help="an action, e.g. a3")
    _add_common(fail_parser)
    fail_parser.set_defaults(handler=fail, parser=fail_parser)


def abort(args: argparse.Namespace, out: Output) -> int:
    """Abort a run, an action's subtree or a group."""
    if args.action is not None and args.group is not None:
        raise UsageError("name an ACTION or a --group, not both")
    with open_client(args) as client:
        result = client.abort(args.run, args.action, group=args.group, reason=read_reason(args))
        return _report(out, client, args, result)


def stop(args: argparse.Namespace, out: Output) -> int:
    """Stop a run (wait or abandon); a second stop-and-wait is refused (exit 1)."""
    with open_client(args) as client:
        result = client.stop(args.run, abandon=args.abandon, reason=read_reason(args))
        return _report(out, client, args, result)


def fail(args: argparse.Namespace, out: Output) -> int:
    """Mark an action as failed."""
    with open_client(args) as client:
        result = client.mark_failed(args.run, args.action, reason=read_reason(args))
        return _report(out, client, args, result)


def _report(out: Output, client: Client, args: argparse.Namespace, result: ControlResult) -> int:
    refused = result.outcome is Outcome.REFUSED
    queued = result.outcome is Outcome.QUEUED
    code = EXIT_REFUSED if refused else EXIT_QUEUED if queued else EXIT_OK
    if refused or queued or not args.wait:
        if out.json:
            out.print_json(result.as_dict())
        elif refused or queued:
            out.error(result.message)
        else:
            out.line(visible(result.message))
        return code
    if not out.json:
        # Printed (and flushed) before waiting, so a reader knows the request was applied.
        out.line(visible(result.message))
        out.line(f"waiting for run {visible(args.run)!r} to end ...")
    run = wait_for_end(client, args.run)
    if out.json:
        out.print_json({**result.as_dict(), "run": msgspec.to_builtins(run.record)})
    else:
        out.line(f"run {visible(run.name)!r} ended: {run.phase.value}")
    return code
