"""What every verb shares: exit codes, opening the store, and rendering runs.

Human output is plain aligned text (color only on a terminal, and never with
`NO_COLOR`); `--json` output is stable API: records are encoded with msgspec,
so every field is present (`null` when it has no value), phases and causes
are their SPEC strings and times are ISO 8601.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol, TextIO, TypeVar

import msgspec

from flowsdk._client import Client
from flowsdk._phases import RunPhase
from flowsdk._records import (
    AbortRequest,
    ActionRecord,
    Event,
    MarkFailedRequest,
    RunRecord,
    StopRequest,
)
from flowsdk._text import visible
from flowsdk.errors import (
    ActionNotFoundError,
    FlowError,
    InvalidStateError,
    PermissionDeniedError,
    RunNotFoundError,
    SerializationError,
    StoreError,
)
from flowsdk.store import QueuedRequest
from flowsdk.store._location import masked_url

__all__ = [
    "CLEANUP_NOTE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_PERMISSION",
    "EXIT_QUEUED",
    "EXIT_REFUSED",
    "EXIT_RUN_FAILED",
    "EXIT_STORE",
    "EXIT_USAGE",
    "Output",
    "UsageError",
    "action_tree",
    "common_options",
    "event_lines",
    "exit_code",
    "format_duration",
    "format_time",
    "counted",
    "open_client",
    "queued_lines",
    "run_header",
    "show_json",
    "shortened",
    "store_location",
    "table",
    "TreeNode",
    "tree_children",
    "tree_order",
]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_PERMISSION = 4
EXIT_STORE = 5
EXIT_RUN_FAILED = 6  # `run` and `retry` only: the run ended in a phase other than SUCCEEDED
EXIT_QUEUED = 7  # a control request is recorded but its runner has not applied it yet


# A stored text in a run's view (a reason, an error's first line, an event's message) is
# cut to this many characters: `show RUN ACTION` and `--json` have it whole.
_NOTE_WIDTH = 200
# A name a requester typed (an action, a group, who asked), cut as a note is: a request
# queued for a blocked runner was never checked against the run's names.
_NAME_WIDTH = 80

# Why a run is CRASHED: only crash detection records a run so (README, "The store").
CRASHED_NOTE = (
    "its runner is gone (it died, or its host stopped answering): recorded by the first "
    "reader after its heartbeat went stale, ended at its last heartbeat"
)
CLEANUP_NOTE = (
    "cleanup may be incomplete: its body had not returned when it was given up on "
    "(a second cancel after the grace period, or stop and abandon)"
)


class UsageError(Exception):
    """A command line that parses but makes no sense (exit code 2)."""


def exit_code(exc: FlowError) -> int:
    """Return the exit code of SPEC §6 for an expected error."""
    if isinstance(exc, RunNotFoundError | ActionNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, PermissionDeniedError):
        return EXIT_PERMISSION
    if isinstance(exc, StoreError):
        return EXIT_STORE
    if isinstance(exc, SerializationError):
        return EXIT_USAGE  # `flowsdk run` with arguments that cannot be recorded
    if isinstance(exc, InvalidStateError):
        return EXIT_REFUSED
    return EXIT_REFUSED


def common_options() -> argparse.ArgumentParser:
    """Return the parent parser of every verb: `--store URL` and `--json`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        metavar="URL",
        help="the store: sqlite:///relative.db, sqlite:////absolute.db or a path "
        "(default: $FLOWSDK_STORE, else sqlite:///.flowsdk/flowsdk.db)",
    )
    common.add_argument(
        "--json", action="store_true", help="print machine-readable JSON on stdout (stable API)"
    )
    return common


def open_client(args: argparse.Namespace) -> Client:
    """Open the store named by `--store` (else `$FLOWSDK_STORE`, else the default).

    Raises:
        UsageError: the URL is not one flowsdk understands.
    """
    try:
        return Client(args.store)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def store_location(client: Client) -> str:
    """Say where a store is: its absolute path for a file, and how a relative one resolved.

    Any other store is named by its URL without a password (`masked_url`, SPEC §9).
    """
    path = getattr(client.store, "path", None)
    if not isinstance(path, str):
        return visible(masked_url(client.store.url))
    where = visible(os.path.abspath(path))
    if os.path.isabs(path):
        return where
    return f"{where} (the store path {path!r} is relative to the working directory)"


# -- the terminal ------------------------------------------------------------------------

_COLORS = {
    "SUCCEEDED": "32",
    "FAILED": "31",
    "CRASHED": "31",
    "ABORTED": "33",
    "ABANDONED": "33",
    "STOPPED": "33",
    "RUNNING": "36",
    "STOPPING": "35",
    "QUEUED": "2",
}


class Output:
    """Where a verb writes: stdout for results, stderr for errors; color on a terminal only."""

    def __init__(
        self, *, json: bool, stdout: TextIO | None = None, stderr: TextIO | None = None
    ) -> None:
        self.json = json
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self.tty = _isatty(self.stdout)
        self.color = (
            self.tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        )

    def line(self, text: str = "") -> None:
        """Print one line of human output and flush it (a pipe reader sees it at once)."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def lines(self, texts: Iterable[str]) -> None:
        """Print several lines of human output at once."""
        self.stdout.write("".join(t + "\n" for t in texts))
        self.stdout.flush()

    def print_json(self, value: Any, *, compact: bool = False) -> None:
        """Print `value` (builtins or msgspec records) as JSON, indented unless `compact`."""
        data = msgspec.json.encode(value)
        if not compact:
            data = msgspec.json.format(data, indent=2)
        self.stdout.write(data.decode() + "\n")
        self.stdout.flush()

    def error(self, message: str) -> None:
        """Print `flowsdk: error: message` on stderr (control characters made visible)."""
        self.stderr.write(f"flowsdk: error: {visible(message)}\n")
        self.stderr.flush()

    def usage_error(self, parser: argparse.ArgumentParser, message: str) -> None:
        """Print `parser`'s usage, then `PROG: error: message`, as `argparse` does.

        `PROG` is the verb's (`flowsdk abort`), so a command line that parses but
        makes no sense reads like one argparse refused (control characters made visible).
        """
        parser.print_usage(self.stderr)
        self.stderr.write(f"{parser.prog}: error: {visible(message)}\n")
        self.stderr.flush()

    def phase(self, text: str, phase: str) -> str:
        """Color `text` (already padded) by `phase` when writing to a terminal."""
        code = _COLORS.get(phase)
        if not self.color or code is None:
            return text
        return f"\x1b[{code}m{text}\x1b[0m"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- formatting ----------------------------------------------------------------------------


def counted(count: int, noun: str) -> str:
    """`1 action`, `12 actions`, `1,000 actions`: a count and its noun, singular or plural."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def shortened(text: str, width: int = _NOTE_WIDTH) -> str:
    """Return stored `text` made `visible()`, cut to `width` characters with `…` if longer.

    The one rule for stored text a bounded view shows (a reason of up to
    10,000 characters must not become a line as long): cut after the escapes,
    so an escape is never split and `width` is what the terminal shows.
    """
    shown = visible(text)
    return shown if len(shown) <= width else shown[: max(width - 1, 1)] + "…"


def format_time(at: datetime | None, *, precise: bool = False) -> str:
    """Format a recorded time in local time (`-` when absent)."""
    if at is None:
        return "-"
    local = at.astimezone()
    if precise:
        return local.strftime("%Y-%m-%d %H:%M:%S.") + f"{local.microsecond // 1000:03d}"
    return local.strftime("%Y-%m-%d %H:%M:%S")


def format_duration(
    start: datetime | None, end: datetime | None, *, now: datetime | None = None
) -> str:
    """Format the time from `start` to `end` (or to `now` while running): `0.25s`, `2m05s`."""
    if start is None:
        return "-"
    stop = end if end is not None else now
    if stop is None:
        return "-"
    seconds = max((stop - start).total_seconds(), 0.0)
    if seconds < 10:
        text = f"{seconds:.2f}s"
    elif seconds < 60:
        text = f"{seconds:.1f}s"
    elif seconds < 3600:
        minutes, secs = divmod(int(seconds), 60)
        text = f"{minutes}m{secs:02d}s"
    else:
        hours, rest = divmod(int(seconds), 3600)
        text = f"{hours}h{rest // 60:02d}m"
    return text if end is not None else text + "+"


def table(
    out: Output,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    phase_column: int | None = None,
) -> list[str]:
    """Align `rows` under `headers`; the last column is not padded.

    `phase_column` names the column whose cells are phases, colored on a terminal.
    """
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    last = len(headers) - 1

    def render(cells: Sequence[str], *, header: bool) -> str:
        parts = []
        for i, cell in enumerate(cells):
            text = cell if i == last else cell.ljust(widths[i])
            if i == phase_column and not header:
                text = out.phase(text, cell)
            parts.append(text)
        return "  ".join(parts).rstrip()

    return [render(headers, header=True), *(render(row, header=False) for row in rows)]


# -- runs ------------------------------------------------------------------------------------


def show_json(
    record: RunRecord,
    actions: list[ActionRecord],
    events: list[Event] | None,
    queued: Sequence[QueuedRequest] = (),
) -> dict[str, Any]:
    """Return the `show --json` object: `{"run": RUN, "actions": [...]}` (+ `"events"`).

    `"queued_requests"` is always there: the control requests the live runner has
    not answered yet, oldest first (`[]` for a run that has ended).
    """
    shape: dict[str, Any] = {
        "run": msgspec.to_builtins(record),
        "actions": msgspec.to_builtins(actions),
        "queued_requests": msgspec.to_builtins(list(queued)),
    }
    if events is not None:
        shape["events"] = msgspec.to_builtins(events)
    return shape


def run_header(out: Output, record: RunRecord, *, now: datetime) -> list[str]:
    """Describe a run in a few lines: name, phase, attempt, task, times, stop request."""
    phase = record.phase.value
    lines = [
        f"run {visible(record.name)}  {out.phase(phase, phase)}"
        + (f"  (attempt {record.attempt})" if record.attempt > 1 else "")
    ]
    if record.task:
        lines.append(f"  task      {visible(record.task)}")
    lines.append(
        f"  started   {format_time(record.started_at)}"
        + (f"   ended {format_time(record.ended_at)}" if record.ended_at else "")
        + f"   duration {format_duration(record.started_at, record.ended_at, now=now)}"
    )
    stop = record.stop
    if stop is not None:
        lines.append(
            f"  stop      {stop.mode.value}, requested at {format_time(stop.requested_at)}"
            + (f" by {visible(stop.requested_by)}" if stop.requested_by else "")
            + (f": {_cut(stop.reason, 'show RUN --json')}" if stop.reason else "")
        )
    if record.phase is RunPhase.CRASHED:
        lines.append(f"  crashed   {CRASHED_NOTE}")
    return lines


def queued_lines(queued: Sequence[QueuedRequest]) -> list[str]:
    """Say, a line each, which control requests a live run's runner has not answered yet.

    Shown under the run's header, so an operator who finds an abort `queued`
    (exit 7) sees that it was asked and waits for the runner, rather than
    asking again: what, by whom, when, why, and whether the runner took it.
    """
    lines = []
    for queue in queued:
        request = queue.request
        by = request.requested_by
        reason = ""
        if request.reason:
            shown = shortened(request.reason)
            more = ", more: show RUN --json" if shown != visible(request.reason) else ""
            reason = f' (reason: "{shown}"{more})'
        state = (
            "taken by the runner, not yet applied" if queue.taken else "not yet taken by the runner"
        )
        lines.append(
            f"  queued    #{queue.id} {_asked(request)}"
            + (f" by {shortened(by, _NAME_WIDTH)}" if by else "")
            + f" at {format_time(queue.at)}{reason}, {state}"
        )
    return lines


def _asked(request: AbortRequest | StopRequest | MarkFailedRequest) -> str:
    """Name what a request asks for: `abort of action a3`, `stop and wait`, ..."""
    if isinstance(request, StopRequest):
        return "stop and abandon" if request.abandon else "stop and wait"
    if isinstance(request, MarkFailedRequest):
        return f"mark action {shortened(request.action, _NAME_WIDTH)} as failed"
    if request.action is not None:
        return f"abort of action {shortened(request.action, _NAME_WIDTH)}"
    if request.group is not None:
        return f"abort of group {shortened(request.group, _NAME_WIDTH)}"
    return "abort of the run"


def _cut(text: str, whole: str) -> str:
    """`shortened(text)`, saying where the whole text is when it was cut."""
    shown = shortened(text)
    return shown if shown == visible(text) else f"{shown} (more: {whole})"


class TreeNode(Protocol):
    """What drawing a tree needs of an action: an `ActionRecord`, or less (`show`'s outline)."""

    @property
    def name(self) -> str: ...

    @property
    def parent(self) -> str | None: ...

    @property
    def phase(self) -> str: ...


N = TypeVar("N", bound=TreeNode)


def tree_children(actions: Sequence[N]) -> dict[str | None, list[N]]:
    """Each action's children in start order, by parent name (`None`: the roots)."""
    known = {a.name for a in actions}
    children: dict[str | None, list[N]] = {}
    for action in actions:
        parent = action.parent if action.parent in known else None
        children.setdefault(parent, []).append(action)
    return children


def tree_order(actions: list[ActionRecord]) -> list[tuple[int, ActionRecord]]:
    """Depth-first order of the action tree, children in start order, with their depth."""
    children = tree_children(actions)
    ordered: list[tuple[int, ActionRecord]] = []
    stack = [(0, a) for a in reversed(children.get(None, []))]
    while stack:
        depth, action = stack.pop()
        ordered.append((depth, action))
        stack.extend((depth + 1, c) for c in reversed(children.get(action.name, [])))
    return ordered


def _details(action: ActionRecord) -> list[str]:
    notes = []
    abort = action.abort
    if abort is not None:
        notes.append(
            f"aborted ({abort.cause.value})"
            + (f" by {visible(abort.requested_by)}" if abort.requested_by else "")
            + (f" at {format_time(abort.requested_at)}" if abort.requested_at else "")
            + (f": {_cut(abort.reason, 'show RUN ACTION')}" if abort.reason else "")
        )
    error = action.error
    if error is not None:
        # The first line only: `show RUN ACTION` has the whole message and the traceback.
        first, _, rest = error.message.partition("\n")
        shown = shortened(first)
        notes.append(
            f"error {shortened(error.type)}: {shown}"
            + (" (more: show RUN ACTION)" if rest or shown != visible(first) else "")
        )
    if action.cleanup_incomplete:
        notes.append(CLEANUP_NOTE)
    if action.replayed:
        notes.append(
            "replayed: a recorded output was reused "
            "(from an earlier attempt of this run, or from the cache of any run)"
        )
    return notes


def action_tree(
    out: Output,
    actions: list[ActionRecord],
    *,
    now: datetime,
    previews: dict[str, str] | None = None,
    entries: Sequence[tuple[int, ActionRecord | str]] | None = None,
) -> list[str]:
    """Draw the action tree: one aligned row per action, indented under its parent.

    Columns: action, task, phase, duration, group, attempt (and, given
    `previews`, each action's values); below a row, its abort cause and
    reason, its error, and whether its cleanup was incomplete. `entries`
    (default: every action, depth first) may replace parts of the tree by
    lines of text (`(depth, text)`): how a live view folds what does not fit.
    """
    if not actions:
        return ["(no actions recorded)"]
    shown = list(entries) if entries is not None else tree_order(actions)
    ordered = [(depth, a) for depth, a in shown if not isinstance(a, str)]
    rows = [
        [
            "  " * depth + visible(a.name),
            visible(a.task),
            a.phase.value,
            format_duration(a.started_at, a.ended_at, now=now),
            visible(a.group or ""),
            str(a.attempt),
            *([previews.get(a.name, "")] if previews is not None else []),
        ]
        for depth, a in ordered
    ]
    headers = ["ACTION", "TASK", "PHASE", "DURATION", "GROUP", "ATTEMPT"]
    if previews is not None:
        headers.append("VALUES")
    lines = table(out, headers, rows, phase_column=2)
    result = [lines[0]]
    row_lines = iter(lines[1:])
    for depth, action in shown:
        if isinstance(action, str):
            result.append("  " * depth + action)
            continue
        result.append(next(row_lines))
        pad = "  " * (depth + 2)
        result.extend(pad + note for note in _details(action))
    return result


def event_lines(out: Output, events: list[Event], *, whole: bool = False) -> list[str]:
    """Render the event log as an aligned table, oldest first.

    A message or reason is cut to 200 characters (`shortened`), unless `whole`
    (one action's events, in `show RUN ACTION`).
    """
    if not events:
        return ["(no events recorded)"]
    text = visible if whole else shortened
    rows = []
    for e in events:
        details = [text(e.message or "")]
        if e.reason:
            details.append(f"reason: {text(e.reason)}")
        if e.requested_by:
            details.append(f"by {visible(e.requested_by)}")
        rows.append(
            [
                str(e.seq),
                format_time(e.at, precise=True),
                e.kind.value,
                visible(e.action or "-"),
                visible(e.phase or "-"),
                e.cause or "-",
                # One row per event: a line break in a message shows as `\n`.
                "; ".join(d for d in details if d),
            ]
        )
    return table(
        out, ["SEQ", "TIME", "KIND", "ACTION", "PHASE", "CAUSE", "DETAILS"], rows, phase_column=4
    )
