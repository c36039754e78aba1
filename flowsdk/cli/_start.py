"""`flowsdk run MODULE:TASK [ARGS...]` and `flowsdk retry RUN`: runs in the foreground.

Both run in this process, show the live action tree on a terminal (the final
tree otherwise) unless `--quiet`, and exit 0 when the run succeeded, 6 when it
ended in any other phase. Ctrl-C aborts the run, waits for its cleanup,
prints how the run ended (as for a run that ended by itself), and exits 130
(SIGTERM: 143, SIGHUP: 129). `run` refuses a name in use before it says
that a run is starting, and says `run NAME` only once the run is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import threading
from typing import Any

import flowsdk
from flowsdk._client import Client
from flowsdk._loader import import_task
from flowsdk._names import check_name, new_run_name
from flowsdk._phases import RunPhase
from flowsdk._result import Run
from flowsdk._text import visible
from flowsdk.cli._arguments import bind_arguments, parse_arguments
from flowsdk.cli._detail import value_preview
from flowsdk.cli._live import LiveView, summary_line
from flowsdk.cli._output import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    Output,
    UsageError,
    open_client,
    show_json,
)
from flowsdk.cli._runs import positive_int
from flowsdk.cli._show import POLL_INTERVAL, show_lines
from flowsdk.errors import FlowError, InvalidStateError, RunExistsError, RunNotFoundError
from flowsdk.store import RunRecorder, SQLiteStore, Store
from flowsdk.store._location import masked_url

__all__ = ["register"]
_CLEAR = "\x1b[H\x1b[2J"


def register(verbs: Any, common: argparse.ArgumentParser) -> None:
    """Add the `run` and `retry` verbs."""
    run_parser = verbs.add_parser(
        "run",
        parents=[common],
        help="start a run of a task, in the foreground",
        description="Run MODULE:TASK (or path/to/script.py:TASK) with ARGS: positional "
        "values and key=value pairs. A str parameter takes the text as it is; any other "
        "type is written as JSON and converted strictly (n=5, flag=true, cfg='{\"a\": 1}'). "
        "Exits 0 when the run succeeded, 6 otherwise, 2 for bad arguments.",
    )
    run_parser.add_argument("target", metavar="MODULE:TASK", help="the root task")
    run_parser.add_argument("args", metavar="ARGS", nargs="*", help="value or key=value")
    run_parser.add_argument("--name", help="the run's name (default: generated)")
    # Every value is JSON, also for str parameters: how a detached launch passes
    # values so that they arrive exactly (ControlService.launch_run).
    run_parser.add_argument("--json-args", action="store_true", help=argparse.SUPPRESS)
    _add_max_actions(run_parser)
    _add_quiet(run_parser)
    run_parser.set_defaults(handler=run_verb, parser=run_parser)

    retry_parser = verbs.add_parser(
        "retry",
        parents=[common],
        help="run a FAILED, ABORTED, STOPPED or CRASHED run again",
        description="Run the next attempt of a run under the same name, in the foreground. "
        "Calls that match a recorded success (same key, task and inputs) are replayed, not "
        "executed; everything else runs again. Exits 0 when the attempt succeeded, 6 "
        "otherwise, 1 if the run cannot be retried.",
    )
    retry_parser.add_argument("run", metavar="RUN", help="the run's name")
    _add_max_actions(retry_parser)
    _add_quiet(retry_parser)
    retry_parser.set_defaults(handler=retry_verb, parser=retry_parser)


def _add_max_actions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-actions",
        type=positive_int,
        metavar="N",
        help="fail the run if it would have more than N actions, its root included "
        "(default: no limit)",
    )


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print only the outcome")


def run_verb(args: argparse.Namespace, out: Output) -> int:
    """Start a run of `MODULE:TASK` and wait for its end."""
    if ":" not in args.target:
        raise UsageError(f"{args.target!r} does not name a task; write MODULE:TASK")
    _find_modules_here()
    try:
        task = import_task(args.target)
    except InvalidStateError as exc:
        raise UsageError(str(exc)) from None
    texts, keyword_texts = parse_arguments(args.args)
    positional, keywords = bind_arguments(task.fn, texts, keyword_texts, as_json=args.json_args)
    try:
        name = check_name("run", args.name) if args.name is not None else None
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    with open_client(args) as client:
        name = name if name is not None else new_run_name(task.fn.__name__)
        root: Any = functools.partial(task, *positional, **keywords)
        # Read the store first: a store that cannot be read, or a name in use, fails
        # here, before anything says that a run is starting.
        _check_free(client, name)
        store: Store = client.store
        if not out.json and not args.quiet:
            store = _Announcing(client.store, f"run {visible(name)}")
        return _foreground(
            out,
            client,
            name,
            args.quiet,
            lambda: flowsdk.run(root, name=name, store=store, max_actions=args.max_actions),
            earlier=0,
        )


def retry_verb(args: argparse.Namespace, out: Output) -> int:
    """Run the next attempt of a run and wait for its end."""
    _find_modules_here()
    with open_client(args) as client:
        return _foreground(
            out,
            client,
            args.run,
            args.quiet,
            lambda: client.retry(args.run, max_actions=args.max_actions),
            earlier=client.get_record(args.run).attempt,
        )


def _check_free(client: Client, name: str) -> None:
    """Refuse a run name in use (the store's own check, when the run is recorded, is the guard).

    Raises:
        RunExistsError: a run of that name is recorded.
        StoreError: the store cannot be read.
    """
    try:
        client.get_record(name)
    except RunNotFoundError:
        return
    raise RunExistsError(
        f"a run named {name!r} already exists in {masked_url(client.store.url)}; "
        "choose another name"
    )


class _Announcing:
    """A store that prints a line the moment a run is recorded in it, and is the store otherwise.

    `flowsdk.run` records the run (its row and its root, in one transaction)
    with `open_run`, then starts the root's body. Saying `run NAME` after
    `open_run` returned, and not before `flowsdk.run` is called, means a store
    that refuses the run (a database role or a file that may only be read)
    prints its error alone, never the name of a run that does not exist; and
    the line still comes before anything the body prints.
    """

    def __init__(self, store: Store, line: str) -> None:
        self._store = store
        self._line = line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def open_run(self, *args: Any, **kwargs: Any) -> RunRecorder:
        """Record the run as the store does, then print the line."""
        recorder = await self._store.open_run(*args, **kwargs)
        # Through `sys.stdout`, not the `Output`: on a terminal the live view has taken
        # it over by now, and puts what is written there above its region.
        print(self._line, file=sys.stdout, flush=True)
        return recorder


def _find_modules_here() -> None:
    # Like `python -m`: a run's task module is found in the working directory.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def _foreground(
    out: Output, client: Client, name: str, quiet: bool, start: Any, *, earlier: int
) -> int:
    """Run `start()` (which returns the ended run) and print how the run ended.

    Ctrl-C, SIGTERM or SIGHUP make `start()` raise `KeyboardInterrupt` or
    `SystemExit(128 + N)` once the run's end is recorded: that end is read back
    and printed as any other, then the exception goes on (exit 130, 143, 129).
    `earlier` is the run's latest attempt before this one (0: a new run).
    """
    live = _LiveTree(out, client, name) if out.tty and not out.json and not quiet else None
    if live is not None:
        live.start()
    result: Run[Any] | None = None
    interrupted: KeyboardInterrupt | SystemExit | None = None
    try:
        result = start()
    except (KeyboardInterrupt, SystemExit) as exc:
        interrupted = exc
        result = _ended(client, name, earlier)
    finally:
        if live is not None:
            live.stop(result)
    if result is None:  # interrupted before its run was recorded: nothing ended to show
        assert interrupted is not None
        raise interrupted
    _print_end(out, client, live, result, quiet)
    if interrupted is not None:
        raise interrupted
    return EXIT_OK if result.phase is RunPhase.SUCCEEDED else EXIT_RUN_FAILED


def _ended(client: Client, name: str, earlier: int) -> Run[Any] | None:
    """The run's attempt after `earlier` as it ended, or None if none was recorded ended."""
    try:
        run = client.get_run(name)
    except FlowError:  # not recorded, or the store cannot be read: the interrupt alone shows
        return None
    return run if run.record.attempt > earlier and run.phase.terminal else None


def _print_end(
    out: Output, client: Client, live: _LiveTree | None, result: Run[Any], quiet: bool
) -> None:
    if out.json:
        out.print_json(show_json(result.record, result.actions, None))
    elif quiet:
        out.line(f"run {visible(result.name)}: {result.phase.value}")
    elif live is not None and live.drawing:
        # The live region holds the final tree, without values: the result is said here.
        if result.phase is RunPhase.SUCCEEDED:
            with contextlib.suppress(FlowError):  # an output that cannot be read back
                out.line(f"result  {value_preview(result.result(), 200)}")
        out.line(summary_line(result))
    else:
        progress = client.latest_progress(result.name, result.record.attempt)
        tree = show_lines(out, result, events=False, values=True, progress=progress)
        out.lines(["", *tree, "", summary_line(result)])


class _LiveTree:
    """Draws the run's tree live on a terminal while the run goes on (SQLite stores only).

    It reads the store from a thread of its own, as `flowsdk watch` would from
    another process, so drawing never slows the run's event loop. What the
    run's tasks print goes above the live region.
    """

    def __init__(self, out: Output, client: Client, name: str) -> None:
        self.name = name
        self.store = client.store
        self.view = LiveView(out, capture=True)
        self.drawing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw, name="flowsdk-live-tree", daemon=True)

    def start(self) -> None:
        """Start drawing (nothing to draw from a memory store)."""
        if isinstance(self.store, SQLiteStore):
            self.view.start()
            self.drawing = True
            self._thread.start()

    def stop(self, final: Run[Any] | None) -> None:
        """Stop drawing, after a last frame of `final` (the run as it ended)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.drawing:
            if final is not None:
                latest = self.store.latest_progress(final.name, final.record.attempt)
                self.view.update(final, latest)
            self.view.stop()

    def _draw(self) -> None:
        reader = Client(SQLiteStore(self.store.url))
        try:
            while not self._stop.wait(POLL_INTERVAL * 2):
                try:
                    run = reader.get_run(self.name)
                    latest = reader.latest_progress(self.name, run.record.attempt)
                    self.view.update(run, latest)
                except RunNotFoundError:
                    continue  # not recorded yet
                except Exception:  # a drawing problem must never disturb the run
                    return
        finally:
            reader.close()
