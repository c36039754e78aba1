"""`flowsdk show` (a run and its action tree) and `flowsdk watch` (the same, live)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from flowsdk._client import Client
from flowsdk._follow import Changes, NewAttempt, RunFollower
from flowsdk._phases import RunPhase
from flowsdk._records import ActionOutline, ActionRecord, Progress, RunRecord
from flowsdk._result import Run
from flowsdk._text import visible
from flowsdk.cli._detail import (
    action_json,
    action_lines,
    concerning,
    value_previews,
    with_progress,
)
from flowsdk.cli._fold import folded_tree
from flowsdk.cli._live import LiveView, summary_line
from flowsdk.cli._output import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    Output,
    TreeNode,
    action_tree,
    event_lines,
    open_client,
    queued_lines,
    run_header,
    show_json,
)
from flowsdk.cli._runs import positive_int
from flowsdk.store import QueuedRequest, StoredRun

__all__ = ["POLL_INTERVAL", "register", "show_lines", "tree_lines", "wait_for_end"]

# How often `watch` and `--wait` read the store again.
POLL_INTERVAL = 0.1
# On a terminal, `watch` redraws at least this often so running durations advance.
REDRAW_INTERVAL = 1.0
# `watch` waits this many times as long as its last frame took to draw before it
# reads again: a frame of a tree of 300,000 actions takes about a second, and
# watching such a run must not take a core from it.
FRAME_SHARE = 3


def register(verbs: Any, common: argparse.ArgumentParser) -> None:
    """Add the `show` and `watch` verbs."""
    show_parser = verbs.add_parser(
        "show",
        parents=[common],
        help="show a run and its action tree",
        description="Show a run: its phase, then its action tree with phases, durations, "
        "groups, attempts, abort causes and reasons, and errors.",
    )
    show_parser.add_argument("run", metavar="RUN", help="the run's name")
    show_parser.add_argument(
        "action",
        metavar="ACTION",
        nargs="?",
        help="show this action in full: inputs, output, error with traceback, abort, events",
    )
    show_parser.add_argument("--events", action="store_true", help="also print the event log")
    show_parser.add_argument(
        "--attempt", type=positive_int, metavar="N", help="show attempt N (default: the latest)"
    )
    show_parser.set_defaults(handler=show, parser=show_parser)

    watch_parser = verbs.add_parser(
        "watch",
        parents=[common],
        help="show a run live until it ends",
        description="Redraw a run's action tree in place as it changes, until the run ends, "
        "then print a summary line. What does not fit the terminal is folded. When stdout "
        "is not a terminal, print a new frame only when something changed (each frame ends "
        "with a blank line); with --json, one `show --json` object per line.",
    )
    watch_parser.add_argument("run", metavar="RUN", help="the run's name")
    watch_parser.add_argument(
        "--exit-status",
        action="store_true",
        help="exit 6 unless the run SUCCEEDED (default: exit 0 once it has ended)",
    )
    watch_parser.set_defaults(handler=watch, parser=watch_parser)


def show_lines(
    out: Output,
    run: Run[Any],
    *,
    events: bool,
    spaced: bool = True,
    values: bool = False,
    progress: dict[str, Progress] | None = None,
    queued: Sequence[QueuedRequest] = (),
) -> list[str]:
    """Render a run for people: its header, its action tree, and optionally its events.

    Without `spaced` the lines hold no blank line (a `watch` frame ends with one).
    Long chains and big fan-outs are folded (`_fold.py`), so the tree stays bounded.
    With `values`, the tree has a preview of each action's inputs and output.
    `queued` (the requests the runner has not answered) is said under the header.
    """
    lines = tree_lines(
        out,
        run.record,
        run.actions,
        lambda drawn: (drawn, run.payloads() if values else {}),  # the outline is the records
        spaced=spaced,
        values=values,
        progress=progress,
        queued=queued,
    )
    if events:
        lines += ["", "events:", *event_lines(out, run.events)]
    return lines


Drawn = tuple[list[ActionRecord], dict[str, tuple[bytes | None, bytes | None]]]
N = TypeVar("N", bound=TreeNode)


def tree_lines(
    out: Output,
    record: RunRecord,
    outline: Sequence[N],
    drawn: Callable[[list[N]], Drawn],
    *,
    spaced: bool = True,
    values: bool = False,
    progress: dict[str, Progress] | None = None,
    queued: Sequence[QueuedRequest] = (),
) -> list[str]:
    """The header and the folded tree of a run drawn from its outline (start order).

    `drawn(nodes)` gives the records and recorded values of the outline's actions
    the folded tree draws: a run's own, or keyed reads of a big run's. Each of
    `queued` is a line under the header.
    """
    now = datetime.now(UTC)
    gap = [""] if spaced else []
    entries = folded_tree(outline)
    nodes = [a for _, a in entries if not isinstance(a, str)]
    names = [a.name for a in nodes]
    records, payloads = drawn(nodes)
    found = {r.name: r for r in records}
    # An action read in the outline but gone since (its run pruned meanwhile) is left out.
    shown = [
        (d, a if isinstance(a, str) else found[a.name])
        for d, a in entries
        if isinstance(a, str) or a.name in found
    ]
    previews = with_progress(value_previews(payloads, names) if values else None, progress or {})
    return [
        *run_header(out, record, now=now),
        *queued_lines(queued),
        *gap,
        *action_tree(out, records, now=now, previews=previews, entries=shown),
    ]


def show(args: argparse.Namespace, out: Output) -> int:
    """Print one run (an attempt of it), with `--events` its event log; or one action in full."""
    with open_client(args) as client:
        if args.action is not None:
            # Keyed reads: one action of a run of a million costs what it costs of ten.
            detail = client.get_action(args.run, args.action, attempt=args.attempt)
            name, attempt = detail.record.name, detail.record.attempt
            progress = client.progress(name, attempt, detail.action.name)
            logs = client.logs(name, attempt, detail.action.name)
            queued = concerning(_queued(client, detail.record), detail.action)
            if out.json:
                out.print_json(action_json(detail, progress, logs, queued))
            else:
                out.lines(action_lines(out, detail, progress, logs, queued))
            return EXIT_OK
        if out.json or args.events:
            run = client.get_run(args.run, attempt=args.attempt)
            queued = _queued(client, run.record)
            if out.json:
                events = run.events if args.events else None
                out.print_json(show_json(run.record, run.actions, events, queued))
            else:
                latest = client.latest_progress(run.name, run.record.attempt)
                out.lines(
                    show_lines(out, run, events=True, values=True, progress=latest, queued=queued)
                )
            return EXIT_OK
        # The tree alone: every action's name, parent and phase, then the records and
        # values of the few the folded tree draws (a whole-run read costs ten times more).
        service = client.service
        record, outline = service.get_outline(args.run, attempt=args.attempt)
        latest = client.latest_progress(record.name, record.attempt)
        queued = _queued(client, record)

        def drawn(nodes: list[ActionOutline]) -> Drawn:
            return service.get_actions(record.name, record.attempt, [a.name for a in nodes])

        out.lines(
            tree_lines(out, record, outline, drawn, values=True, progress=latest, queued=queued)
        )
    return EXIT_OK


def _queued(client: Client, record: RunRecord) -> list[QueuedRequest]:
    """The requests the runner of a live run has not answered; none once it has ended.

    An attempt that has ended (an earlier one included) costs no read.
    """
    return [] if record.phase.terminal else client.queued_requests(record.name)


def watch(args: argparse.Namespace, out: Output) -> int:
    """Redraw the run until it ends, then print a summary line.

    Exits 0 once the run has ended; with `--exit-status`, 6 unless it SUCCEEDED.
    """
    with open_client(args) as client:
        follower = RunFollower(client.service, args.run)
        run = follower.start()  # an unknown run fails before anything is drawn
        live = LiveView(out, capture=False) if out.tty and not out.json else None
        if live is not None:
            live.start()
        try:
            run = _follow(client, follower, run, out, live)
        except KeyboardInterrupt:
            if live is not None:
                live.stop()
                live = None
            if not out.json:
                out.line(f"stopped watching; run {visible(args.run)} goes on")
            raise
        finally:
            if live is not None:
                live.stop()
    if not out.json:
        out.line(summary_line(run))
    if args.exit_status and run.phase is not RunPhase.SUCCEEDED:
        return EXIT_RUN_FAILED
    return EXIT_OK


def _follow(
    client: Client, follower: RunFollower, run: Run[Any], out: Output, live: LiveView | None
) -> Run[Any]:
    """Draw `run` and each change `follower` reads, until the run has ended; return its end.

    Each poll reads what changed (`RunFollower`), not the whole run again.
    """
    record = run.record
    actions = {a.name: a for a in run.actions}
    changed = True
    last_progress: tuple[Any, ...] | None = None
    last_queued: list[QueuedRequest] = []
    drawn = 0.0
    while True:
        began = time.monotonic()
        ended = record.phase.terminal
        progress = client.latest_progress(record.name, record.attempt)
        reported = tuple(progress.values())
        # One keyed read a poll: the requests the runner has not answered (its loop blocked).
        queued = _queued(client, record)
        changed = changed or reported != last_progress or queued != last_queued
        if changed or live is not None:
            run = Run(StoredRun(record, list(actions.values()), []))
        if out.json:
            if changed:
                out.print_json(show_json(record, run.actions, None, queued), compact=True)
        elif live is not None:
            if changed or ended or time.monotonic() - drawn >= REDRAW_INTERVAL:
                live.update(run, progress, queued)
                drawn = time.monotonic()
        elif changed:
            frame = show_lines(
                out, run, events=False, spaced=False, progress=progress, queued=queued
            )
            out.lines([*frame, ""])
        last_progress, last_queued = reported, queued
        if ended:
            return run
        time.sleep(max(POLL_INTERVAL, FRAME_SHARE * (time.monotonic() - began)))
        try:
            found = follower.poll()
            if found.ended:
                # One more read after the end: the runner's last rows are committed with
                # (or before) the terminal run phase, so this one sees them all.
                last = follower.poll()
                found = Changes(
                    [*found.events, *last.events],
                    [*found.actions, *last.actions],
                    last.record or found.record,
                    True,
                )
        except NewAttempt:  # a retry began: follow it from its first picture
            follower = RunFollower(follower.service, follower.run)
            run = follower.start()
            record, actions, changed = run.record, {a.name: a for a in run.actions}, True
            continue
        # A frame is drawn again when what it shows changed, not for every event.
        changed = _merge(actions, found.actions) or found.record is not None
        if found.record is not None:
            record = found.record


def _start_order(name: str) -> tuple[int, str]:
    return len(name), name  # an action's name is `a` and its start order


def _merge(actions: dict[str, ActionRecord], found: list[ActionRecord]) -> bool:
    """Put re-read actions in `actions` (kept in start order); return whether one changed."""
    last = next(reversed(actions), None)
    late = changed = False
    for action in found:
        before = actions.get(action.name)
        if before is None and last is not None:
            late = late or _start_order(action.name) < _start_order(last)
        changed = changed or before != action
        actions[action.name] = action
    if late:  # an action's row came after a later one's (rare): put it in its place
        ordered = sorted(actions.items(), key=lambda item: _start_order(item[0]))
        actions.clear()
        actions.update(ordered)
    return changed


def wait_for_end(client: Client, name: str) -> Run[Any]:
    """Read the run every `POLL_INTERVAL` until it has ended; return its final picture.

    A runner that died is recorded CRASHED by the store's reads, so this ends too.
    """
    while True:
        run = client.get_run(name)
        if run.record.phase.terminal:
            return run
        time.sleep(POLL_INTERVAL)
