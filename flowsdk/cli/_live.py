"""The live view of `flowsdk watch` and `flowsdk run`: a region redrawn in place.

It uses rich's live display, which redraws only its own region of the
terminal: what the program prints meanwhile (a task's `print`, a log line)
is written above the region and stays readable, and nothing is cleared.

Each frame is made to fit the terminal, header first. Rows: an action that
has not ended is always drawn; then, while they fit, the actions that did not
succeed and the path to them (a failure, even one a child caught, is not
folded away while there is room for it); then whole families of succeeded
siblings. Each run of siblings left out is one line that counts their phases
and the phases of everything below them (`a3-a4012: 4,010 SUCCEEDED (and 12
below them: 11 SUCCEEDED, 1 FAILED)`); what still does not fit is cut with a
count. Columns: the task, group and value cells are cut to what the terminal
leaves them, so that the phase and the duration stay in sight; the frame left
when the view stops is drawn whole, its long lines wrapped. A summary line is
printed once the run has ended.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from itertools import compress, pairwise
from operator import attrgetter, not_
from typing import Any, Literal

import msgspec

from flowsdk._phases import ActionPhase
from flowsdk._records import ActionRecord, Progress
from flowsdk._result import Run
from flowsdk._text import visible
from flowsdk.cli._detail import with_progress
from flowsdk.cli._fold import TreeShape
from flowsdk.cli._output import (
    Output,
    action_tree,
    counted,
    format_duration,
    queued_lines,
    run_header,
    shortened,
)
from flowsdk.store import QueuedRequest

__all__ = ["LiveView", "fit_tree", "summary_line"]

Entry = tuple[int, ActionRecord | str]
# What a frame is drawn from: the run, its latest progress, its unanswered requests.
_Drawn = tuple[Run[Any], dict[str, Progress] | None, Sequence[QueuedRequest]]
_phase = attrgetter("phase")
_UNENDED = frozenset(phase for phase in ActionPhase if not phase.terminal)
# The narrowest a cut task or group cell gets: a few letters and the ellipsis.
_TASK_MIN, _GROUP_MIN = 8, 5


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


def _notes(actions: Iterable[ActionRecord]) -> int:
    """How many lines `action_tree` draws below the rows of `actions` (abort, error, ...).

    Counted by C loops: the actions that have not ended may be a hundred thousand.
    """
    rows = list(actions)
    aborts = list(map(attrgetter("abort"), rows))
    errors = list(map(attrgetter("error"), rows))
    flags: int = sum(map(attrgetter("cleanup_incomplete"), rows))
    flags += sum(map(attrgetter("replayed"), rows))
    return 2 * len(rows) - aborts.count(None) - errors.count(None) + flags


class _Fit:
    """Which actions a frame draws as rows; the others are folded into lines counting them.

    Actions are known by their start position (`TreeShape`). A shown action's
    children are drawn in start order, each maximal run of hidden ones as one
    line; `cost` is how many lines the tree takes under its heading. Choosing
    costs a few C loops over the run and Python steps over the rows that fit
    (and the actions that have not ended): a frame of a run of a hundred
    thousand actions takes about a tenth of a second, half of it `TreeShape`.
    """

    def __init__(self, actions: list[ActionRecord], budget: int) -> None:
        self.actions = actions
        self.shape = shape = TreeShape(actions)
        self.budget = budget
        self.shown = shown = bytearray(len(actions))
        self._kids: dict[int, list[int]] = {}
        self.roots = shape.children_of(None)
        # An action that has not ended is always drawn, and the path to it: folding it
        # would hide what is happening now.
        parents = shape.parents
        unended = map(_UNENDED.__contains__, map(_phase, actions))
        for at in [*self.roots, *compress(range(len(actions)), unended)]:
            while at >= 0 and not shown[at]:
                shown[at] = 1
                at = parents[at]
        drawn = list(compress(range(len(actions)), shown))
        self.cost = len(drawn) + _notes(map(actions.__getitem__, drawn))
        self.cost += sum(self._runs(at) for at in drawn if shape.sizes[at] > 1)
        self._troubles()
        self._families()

    def kids(self, at: int) -> list[int]:
        """The start positions of an action's children (`-1`: the roots)."""
        found = self._kids.get(at)
        if found is None:
            if at < 0:
                found = self.roots
            elif self.shape.sizes[at] == 1:
                found = []
            else:
                found = self.shape.children_of(self.actions[at])
            self._kids[at] = found
        return found

    def _runs(self, at: int) -> int:
        """How many runs of hidden children `at` has: one fold line each."""
        flags = bytes(map(self.shown.__getitem__, self.kids(at)))
        return flags.count(b"\x01\x00") + (flags[:1] == b"\x00")

    def _troubles(self) -> None:
        """Show, while they fit, the actions that did not succeed and the path to them.

        Depth first, in start order: the first troubles of a run come first.
        """
        shown, sizes, unsettled = self.shown, self.shape.sizes, self.shape.unsettled
        stack = [(at, -1, i) for i, at in reversed(list(enumerate(self.roots)))]
        while stack and self.cost < self.budget:
            at, parent, i = stack.pop()
            if not shown[at]:
                siblings = self.kids(parent)
                left = i == 0 or shown[siblings[i - 1]]
                right = i == len(siblings) - 1 or shown[siblings[i + 1]]
                # Its row and notes, a line for its children, and its run of hidden
                # siblings gone (-1), shortened (0) or cut in two (+1).
                cost = 1 + _notes([self.actions[at]]) + (sizes[at] > 1)
                cost += -1 if left and right else 0 if left or right else 1
                if self.cost + cost > self.budget:
                    continue
                shown[at] = 1
                self.cost += cost
            kids = self.kids(at)
            troubled = compress(range(len(kids)), map(unsettled.__getitem__, kids))
            stack.extend((kids[j], at, j) for j in reversed(list(troubled)))

    def _families(self) -> None:
        """Then show, breadth first, all the hidden succeeded children of an action, if they fit."""
        shown, sizes, unsettled = self.shown, self.shape.sizes, self.shape.unsettled
        queue = deque(self.roots)
        while queue and self.cost < self.budget:
            at = queue.popleft()
            kids = self.kids(at)
            if not kids:
                continue
            hidden = list(compress(kids, map(not_, map(shown.__getitem__, kids))))
            clean = list(compress(hidden, map(not_, map(unsettled.__getitem__, hidden))))
            before = self._runs(at)
            if clean and len(clean) - before <= self.budget - self.cost:
                for kid in clean:
                    shown[kid] = 1
                cost = len(clean) + _notes(map(self.actions.__getitem__, clean))
                cost += sum(sizes[kid] > 1 for kid in clean) + self._runs(at) - before
                if self.cost + cost <= self.budget:
                    self.cost += cost
                else:
                    for kid in clean:
                        shown[kid] = 0
            queue.extend(compress(kids, map(shown.__getitem__, kids)))

    def entries(self, height: int) -> list[Entry]:
        """The tree depth first, folded lines as text, until `height` lines are filled."""
        entries: list[Entry] = []
        lines = 0
        stack: list[tuple[int, int | str]] = [(0, at) for at in reversed(self.roots)]
        while stack and lines < height:
            depth, item = stack.pop()
            if isinstance(item, str):
                entries.append((depth, item))
                lines += 1
                continue
            action = self.actions[item]
            entries.append((depth, action))
            lines += 1 + _notes([action])
            stack.extend((depth + 1, kid) for kid in reversed(self._children(item)))
        return entries

    def _children(self, at: int) -> list[int | str]:
        """An action's children to draw: the shown ones, and a fold line per hidden run."""
        kids = self.kids(at)
        shown = [-1, *compress(range(len(kids)), map(self.shown.__getitem__, kids)), len(kids)]
        drawn: list[int | str] = []
        for before, after in pairwise(shown):
            hidden = kids[before + 1 : after]
            alone = len(hidden) == 1 and self.shape.sizes[hidden[0]] == 1
            if alone and not _notes([self.actions[hidden[0]]]):
                drawn.append(hidden[0])  # its row takes the line its fold line would
            elif hidden:
                drawn.append(self._fold_line(hidden))
            if after < len(kids):
                drawn.append(kids[after])
        return drawn

    def _fold_line(self, hidden: list[int]) -> str:
        """One line for a run of hidden siblings: which, their phases, and those below them."""
        actions, sizes = self.actions, self.shape.sizes
        first, last = visible(actions[hidden[0]].name), visible(actions[hidden[-1]].name)
        text = f"{first}-{last}" if len(hidden) > 1 else first
        text += ": " + _counts(Counter(map(_phase, map(actions.__getitem__, hidden))))
        below = sum(map(sizes.__getitem__, hidden)) - len(hidden)
        if below:
            them = "them" if len(hidden) > 1 else "it"
            text += f" (and {below:,} below {them}: {_counts(self._below(hidden, below))})"
        return text

    def _below(self, hidden: list[int], below: int) -> Counter[ActionPhase]:
        """The phases of the actions below `hidden`: steps only into troubled subtrees."""
        sizes, unsettled = self.shape.sizes, self.shape.unsettled
        phases: Counter[ActionPhase] = Counter()
        stack = [at for at in hidden if unsettled[at] and sizes[at] > 1]
        while stack:
            kids = self.kids(stack.pop())
            troubled = list(compress(kids, map(unsettled.__getitem__, kids)))
            phases.update(map(_phase, map(self.actions.__getitem__, troubled)))
            stack.extend(at for at in troubled if sizes[at] > 1)
        succeeded = below - sum(phases.values()) + phases[ActionPhase.SUCCEEDED]
        phases[ActionPhase.SUCCEEDED] = succeeded
        return +phases  # without a zero count


def fit_tree(
    out: Output,
    actions: list[ActionRecord],
    *,
    now: datetime,
    height: int,
    width: int | None = None,
    progress: dict[str, Progress] | None = None,
) -> list[str]:
    """Draw the action tree in at most `height` lines, folding what does not fit.

    With `width`, the task, group and value cells are cut (`…`) so that a row's
    phase and duration fit in `width` columns; without it, every cell is whole.
    With `progress`, each action's latest report is shown in the value column.
    """
    previews = with_progress(None, progress or {})
    if not actions:
        return action_tree(out, actions, now=now, previews=previews)
    fit = _Fit(actions, max(height - 1, 0))  # the table's heading takes a line
    entries = fit.entries(height)
    if width is not None:
        entries, previews = _narrowed(entries, previews, width=width, now=now)
    lines = action_tree(out, actions, now=now, entries=entries, previews=previews)
    total = max(len(lines), fit.cost + 1)
    if total <= height:
        return lines
    keep = max(height - 1, 1)
    return [*lines[:keep], f"… {total - keep:,} more lines (flowsdk show RUN has them all)"]


def _narrowed(
    entries: list[Entry], previews: dict[str, str] | None, *, width: int, now: datetime
) -> tuple[list[Entry], dict[str, str] | None]:
    """Cut the task, group and value cells of `entries` so that every column fits in `width`.

    The action, phase, duration and attempt cells are a few characters each;
    what they leave goes to the task and the group, and a third of it at most
    to the values (the last column), when they do not all fit.
    """
    rows = [(depth, a) for depth, a in entries if not isinstance(a, str)]
    values = [previews.get(a.name, "") for _, a in rows] if previews is not None else []
    # Each column is as wide as its heading at least.
    fixed = [
        max([6, *(2 * depth + len(visible(a.name)) for depth, a in rows)]),
        max([5, *(len(a.phase.value) for _, a in rows)]),
        max([8, *(len(format_duration(a.started_at, a.ended_at, now=now)) for _, a in rows)]),
        max([7, *(len(str(a.attempt)) for _, a in rows)]),
    ]
    task = max([4, *(len(visible(a.task)) for _, a in rows)])
    group = max([5, *(len(visible(a.group or "")) for _, a in rows)])
    value = max([6, *map(len, values)]) if previews is not None else 0
    columns = 7 if previews is not None else 6
    room = width - sum(fixed) - 2 * (columns - 1)
    if task + group + value <= room:
        return entries, previews
    group = min(group, max(_GROUP_MIN, room // 5))
    room -= group
    task = max(_TASK_MIN, min(task, room - min(value, room // 3)))
    value = max(room - task, 1)
    cut: dict[str, ActionRecord] = {}
    for _, a in rows:
        cut[a.name] = msgspec.structs.replace(
            a,
            task=shortened(a.task, task),
            group=shortened(a.group, group) if a.group else a.group,
        )
    narrowed: list[Entry] = [
        (depth, a if isinstance(a, str) else cut[a.name]) for depth, a in entries
    ]
    if previews is not None:
        previews = {a.name: shortened(v, value) for (_, a), v in zip(rows, values, strict=True)}
    return narrowed, previews


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
        self._last: _Drawn | None = None

    def start(self) -> None:
        """Start drawing (nothing is shown until the first `update`)."""
        self.live.start()

    def update(
        self,
        run: Run[Any],
        progress: dict[str, Progress] | None = None,
        queued: Sequence[QueuedRequest] = (),
    ) -> None:
        """Draw a new frame of `run` (its latest progress, its unanswered requests), fitted."""
        self._last = (run, progress, queued)
        self.live.update(self._frame(run, progress, queued, whole=False), refresh=True)

    def stop(self) -> None:
        """Stop drawing; the last frame stays on the screen, every column whole.

        The rows of that frame wrap rather than being cut: a run that ended shows
        each action's values, however long its task's name. Idempotent.
        """
        if self._last is not None and self.live.is_started:
            # Drawn by `stop`, which lets a frame taller than the screen scroll.
            self.live.update(self._frame(*self._last, whole=True), refresh=False)
        self.live.stop()

    def _frame(
        self,
        run: Run[Any],
        progress: dict[str, Progress] | None,
        queued: Sequence[QueuedRequest],
        *,
        whole: bool,
    ) -> Any:
        """The run's header and unanswered requests (wrapped, never cut), then its tree fitted."""
        from rich.console import Group
        from rich.text import Text

        width, height = self.console.size
        now = datetime.now(UTC)
        lines = [*run_header(self.out, run.record, now=now), *queued_lines(queued)]
        header = [Text.from_ansi(line) for line in lines]
        used = sum(len(text.wrap(self.console, width)) for text in header) + 1
        # One line is kept free: the cursor rests below the region.
        room = max(height - used - 1, 3)
        tree = fit_tree(
            self.out,
            run.actions,
            now=now,
            height=room,
            width=None if whole else width,
            progress=progress,
        )
        overflow: Literal["fold", "ellipsis"] = "fold" if whole else "ellipsis"
        rows = [Text.from_ansi(line, no_wrap=not whole, overflow=overflow) for line in tree]
        return Group(*header, Text(""), *rows)
