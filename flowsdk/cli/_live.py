"""The live view of `flowsdk watch` and `flowsdk run`: a region redrawn in place.

It uses rich's live display, which redraws only its own region of the
terminal: what the program prints meanwhile (a task's `print`, a log line)
is written above the region and stays readable, and nothing is cleared.
Each frame is made to fit the terminal, header first: when the tree is
taller than the screen, finished subtrees are folded into one line, then
runs of finished siblings with the same phase ("a3-a4012: 4,010
SUCCEEDED"), and what still does not fit is cut with a count. A summary
line is printed once the run has ended.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from flowsdk._phases import ActionPhase
from flowsdk._records import ActionRecord, Progress
from flowsdk._result import Run
from flowsdk._text import visible
from flowsdk.cli._detail import with_progress
from flowsdk.cli._output import (
    Output,
    action_tree,
    counted,
    format_duration,
    run_header,
    tree_children,
)

__all__ = ["LiveView", "fit_tree", "summary_line"]

# Finished siblings in a row with the same phase are folded from this many on.
_FANOUT = 3
Entry = tuple[int, ActionRecord | str]


def _counts(phases: Counter[ActionPhase]) -> str:
    return ", ".join(f"{n:,} {phase.value}" for phase, n in phases.most_common())


def summary_line(run: Run[Any]) -> str:
    """Say how a run ended: `run NAME SUCCEEDED after 3.20s: 12 actions (12 SUCCEEDED)`."""
    record = run.record
    phases = Counter(a.phase for a in run.actions)
    return (
        f"run {visible(record.name)} {record.phase.value} after "
        f"{format_duration(record.started_at, record.ended_at, now=datetime.now(UTC))}: "
        f"{counted(len(run.actions), 'action')} ({_counts(phases)})"
    )


class _Subtrees:
    """Per action: whether its whole subtree has ended, and its descendants' phases."""

    def __init__(self, actions: list[ActionRecord]) -> None:
        self.children = tree_children(actions)
        self.ended: dict[str, bool] = {}
        self.below: dict[str, Counter[ActionPhase]] = {}
        # Post-order without recursion: trees may be thousands of levels deep.
        stack: list[tuple[ActionRecord, bool]] = [(a, False) for a in self.children.get(None, [])]
        while stack:
            action, visited = stack.pop()
            kids = self.children.get(action.name, [])
            if not visited:
                stack.append((action, True))
                stack.extend((k, False) for k in kids)
                continue
            below: Counter[ActionPhase] = Counter()
            ended = action.phase.terminal
            for kid in kids:
                below[kid.phase] += 1
                below.update(self.below[kid.name])
                ended = ended and self.ended[kid.name]
            self.below[action.name] = below
            self.ended[action.name] = ended


def _entries(trees: _Subtrees, *, collapse: bool, fold: bool) -> list[Entry]:
    entries: list[Entry] = []
    stack: list[tuple[int, ActionRecord | str]] = [
        (0, a) for a in reversed(trees.children.get(None, []))
    ]
    while stack:
        depth, item = stack.pop()
        entries.append((depth, item))
        if isinstance(item, str):
            continue
        kids = trees.children.get(item.name, [])
        if not kids:
            continue
        # A root is never folded into one line: the frame would say nothing.
        if collapse and depth > 0 and trees.ended[item.name]:
            below = trees.below[item.name]
            entries.append(
                (depth + 1, f"… {counted(sum(below.values()), 'action')}: {_counts(below)}")
            )
            continue
        shown: list[ActionRecord | str] = []
        i = 0
        while i < len(kids):
            j = i
            while (
                fold
                and j < len(kids)
                and kids[j].phase is kids[i].phase
                and trees.ended[kids[j].name]
            ):
                j += 1
            if j - i >= _FANOUT:
                hidden = sum(sum(trees.below[k.name].values()) for k in kids[i:j])
                text = f"{kids[i].name}-{kids[j - 1].name}: {j - i:,} {kids[i].phase.value}"
                shown.append(text + (f" (and {hidden:,} below them)" if hidden else ""))
                i = j
            else:
                shown.append(kids[i])
                i += 1
        stack.extend((depth + 1, k) for k in reversed(shown))
    return entries


def fit_tree(
    out: Output,
    actions: list[ActionRecord],
    *,
    now: datetime,
    height: int,
    progress: dict[str, Progress] | None = None,
) -> list[str]:
    """Draw the action tree in at most `height` lines, folding what does not fit.

    With `progress`, each action's latest report is shown in the value column.
    """
    previews = with_progress(None, progress or {})
    if len(actions) < height:  # else it cannot fit: a row per action, and the heading
        lines = action_tree(out, actions, now=now, previews=previews)
        if len(lines) <= height:
            return lines
    trees = _Subtrees(actions)
    for collapse, fold in ((True, False), (True, True)):
        entries = _entries(trees, collapse=collapse, fold=fold)
        lines = action_tree(out, actions, now=now, entries=entries, previews=previews)
        if len(lines) <= height:
            return lines
    keep = max(height - 1, 1)
    return [*lines[:keep], f"… {len(lines) - keep:,} more lines (flowsdk show RUN has them all)"]


def frame_lines(
    out: Output, run: Run[Any], *, height: int, progress: dict[str, Progress] | None = None
) -> list[str]:
    """One frame: the run's header, then its tree fitted to what is left of `height`."""
    now = datetime.now(UTC)
    header = [*run_header(out, run.record, now=now), ""]
    # One line is kept free: the cursor rests below the region.
    room = max(height - len(header) - 1, 3)
    return [*header, *fit_tree(out, run.actions, now=now, height=room, progress=progress)]


class LiveView:
    """A live region on a terminal showing one run; the program's own output goes above it.

    Args:
        out: Where to draw (a terminal).
        capture: Also route this process's stdout and stderr above the region
            (`flowsdk run`, whose tasks print in this process).
    """

    def __init__(self, out: Output, *, capture: bool) -> None:
        # Imported here: rich costs about 0.1 s to import, which every other verb saves.
        from rich.console import Console
        from rich.live import Live

        self.out = out
        self.console = Console(
            file=out.stdout,
            markup=False,
            emoji=False,
            highlight=False,
            color_system="standard" if out.color else None,
        )
        self.live = Live(
            console=self.console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=capture,
            redirect_stderr=capture,
            vertical_overflow="crop",
        )

    def start(self) -> None:
        """Start drawing (nothing is shown until the first `update`)."""
        self.live.start()

    def update(self, run: Run[Any], progress: dict[str, Progress] | None = None) -> None:
        """Draw a new frame of `run` (and its latest progress), fitted to the terminal."""
        from rich.text import Text

        lines = frame_lines(self.out, run, height=self.console.size.height, progress=progress)
        text = Text("\n").join(Text.from_ansi(line, no_wrap=True) for line in lines)
        text.no_wrap = True
        text.overflow = "ellipsis"
        self.live.update(text, refresh=True)

    def stop(self) -> None:
        """Stop drawing; the last frame stays on the screen."""
        self.live.stop()
