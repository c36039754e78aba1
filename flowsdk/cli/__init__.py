"""The `flowsdk` command line (SPEC §6): list, show, watch and control runs.

`python -m flowsdk ...` and the `flowsdk` console script are the same program.
Every verb takes `--store URL` and `--json`, after the verb or before it. Exit
codes: 0 done (also an abort of an action that has already ended), 1 refused,
2 usage error, 3 run or action not found, 4 permission denied, 5 store error,
6 (`run` and `retry` only) the run did not succeed, 7 a control request is
queued (its runner has not applied it yet). An expected error prints
one `flowsdk: error: ...` line on stderr, never a traceback; a malformed
command line prints the verb's usage and one `flowsdk VERB: error: ...` line,
as argparse does, whether argparse or the verb found the fault. Bytes of an
argument that are not valid text are taken as U+FFFD, as in a `--reason-file`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import flowsdk
from flowsdk._liveness import RUNNER_LOG, RUNNER_LOG_PREFIX
from flowsdk._text import visible
from flowsdk.cli import _control, _logs, _prune, _runs, _show, _start, _tokens, _ui
from flowsdk.cli._output import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    Output,
    UsageError,
    common_options,
    exit_code,
)
from flowsdk.errors import FlowError

__all__ = ["build_parser", "entry_point", "main"]

# Each module adds its verbs to the parser; `args.handler(args, out)` runs one.
_VERBS = (_runs, _show, _logs, _control, _prune, _start, _tokens, _ui)
_INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C
_BROKEN_PIPE = 1  # as the Python documentation advises for SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the whole command line."""
    parser = argparse.ArgumentParser(
        prog="flowsdk",
        description="Start, inspect, control and retry flowsdk runs recorded in a store.",
        epilog="Every verb takes --store URL and --json, after the verb or before it. Exit "
        "codes: 0 done, "
        "1 refused, 2 usage error, 3 not found, 4 permission denied, 5 store error, "
        "6 (run, retry) the run did not succeed, 7 request queued.",
    )
    parser.add_argument("--version", action="version", version=f"flowsdk {flowsdk.__version__}")
    # The same options before the verb (`flowsdk --store x.db runs`), under names of
    # their own: a verb's parser would otherwise reset them to its defaults.
    parser.add_argument("--store", dest="global_store", metavar="URL", help="the store")
    parser.add_argument(
        "--json", dest="global_json", action="store_true", help="machine-readable output"
    )
    verbs = parser.add_subparsers(
        title="verbs", dest="verb", metavar="VERB", required=True, parser_class=_VerbParser
    )
    common = common_options()
    for module in _VERBS:
        module.register(verbs, common)
    return parser


class _VerbParser(argparse.ArgumentParser):
    """A verb's parser: an argument it does not know is its own usage error.

    argparse hands a subcommand's unknown arguments back to the top-level
    parser, which would print the usage of `flowsdk` and `flowsdk: error:`;
    the verb's usage (`flowsdk abort ...`) is the one that says what to write.
    """

    def parse_known_args(  # type: ignore[override]  # one signature for typeshed's overloads
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(visible(e) for e in extras)}")
        return parsed, extras


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`); return the exit code.

    Bytes of an argument that do not decode are taken as U+FFFD (see `_as_text`).
    """
    parser = build_parser()
    try:
        args = parser.parse_args([_as_text(a) for a in (sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:  # argparse: --help, --version, or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.store is None:
        args.store = args.global_store
    args.json = args.json or args.global_json
    out = Output(json=args.json)
    try:
        code: int = args.handler(args, out)
    except UsageError as exc:
        out.usage_error(args.parser, str(exc))
        return EXIT_USAGE
    except FlowError as exc:
        out.error(str(exc))
        return exit_code(exc)
    except KeyboardInterrupt:
        return _INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`flowsdk runs | head`): stop quietly, and keep the
        # interpreter's final flush from raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return _BROKEN_PIPE
    return code


# Python hands over the bytes of an argument that do not decode as lone surrogates
# (`surrogateescape`), which no store, request or terminal can encode.
_UNDECODED = re.compile("[\ud800-\udfff]")


def _as_text(arg: str) -> str:
    """Return a command-line argument with each undecodable byte sequence replaced by U+FFFD.

    The one rule for every verb and every argument (names, reasons, values,
    paths), the same as for the contents of a `--reason-file`: text that is
    not valid in the locale's encoding is taken with the replacement character,
    never refused and never passed on as it came.
    """
    if _UNDECODED.search(arg) is None:
        return arg
    try:
        return os.fsencode(arg).decode(sys.getfilesystemencoding(), "replace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (given by a caller)
        return _UNDECODED.sub("\ufffd", arg)


class _LogFormatter(logging.Formatter):
    """`flowsdk: warning: ...`, like the CLI's own error lines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"flowsdk: {record.levelname.lower()}: {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the `sys.stderr` of the moment: a live view routes it above its region."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def entry_point() -> NoReturn:
    """The console script: `sys.exit(main())`, with flowsdk's warnings on stderr."""
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    handler.setLevel(logging.WARNING)
    logging.getLogger("flowsdk").addHandler(handler)
    log = os.environ.pop(RUNNER_LOG, None)
    code = main()
    if log is not None and code in (EXIT_OK, EXIT_RUN_FAILED):
        _drop_runner_log(log)
    sys.exit(code)


def _drop_runner_log(path: str) -> None:
    """Remove a detached runner's output file once its run ended recorded.

    Its outcome, errors and logs are in the store; a runner that failed itself
    (store error, bad arguments, a crash) keeps the file, which the launch
    names if the run was never recorded.
    """
    if os.path.basename(path).startswith(RUNNER_LOG_PREFIX) and path.endswith(".log"):
        with contextlib.suppress(OSError):
            os.unlink(path)
