"""Folding a big action tree for `flowsdk show`: long chains and big fan-outs.

`show` prints a bounded tree whatever the run's shape. A chain deeper than
`FOLD_DEPTH` shows its first `HEAD_LEVELS` and its last `TAIL_LEVELS` levels,
with one line in between saying how many actions were folded (and the first
and last of them, to look at with `flowsdk show RUN ACTION`). A parent with
more than `FOLD_CHILDREN` children shows the first `HEAD_CHILDREN`, the last
`TAIL_CHILDREN` and, in between, the first `NOTABLE_CHILDREN` whose subtree
holds an action that did not succeed; each run of folded children is one line
saying how many, their phases, and how many actions are below them. Past
`MAX_ROWS` rows, one line says how many more actions there are.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Sequence
from itertools import compress, islice, repeat
from operator import attrgetter
from typing import Generic, TypeVar

from flowsdk._phases import ActionPhase
from flowsdk._text import visible
from flowsdk.cli._output import TreeNode, counted

__all__ = ["FOLD_CHILDREN", "FOLD_DEPTH", "MAX_ROWS", "TreeShape", "folded_tree"]

FOLD_DEPTH = 40
HEAD_LEVELS = 20
TAIL_LEVELS = 10
FOLD_CHILDREN = 60
HEAD_CHILDREN = 40
TAIL_CHILDREN = 10
NOTABLE_CHILDREN = 20
MAX_ROWS = 1000

N = TypeVar("N", bound=TreeNode)
Entry = tuple[int, N | str]
_name = attrgetter("name")
_parent = attrgetter("parent")
_phase = attrgetter("phase")
_SUCCEEDED = str(ActionPhase.SUCCEEDED)


class FoldLine(str):
    """A line standing for folded children: it knows how many actions it hides."""

    hides: int


def folded_tree(actions: Sequence[N]) -> list[Entry[N]]:
    """The depth-first tree of `actions` (`(depth, action)`), with folded parts as text lines.

    `actions` are in start order: records, or an outline of them (`TreeNode`).
    """
    shape = TreeShape(actions)
    deepest = shape.deepest
    # Levels [HEAD_LEVELS, cut) are folded; the levels from `cut` on are drawn
    # right under the fold line.
    cut = deepest - TAIL_LEVELS + 1 if deepest >= FOLD_DEPTH else None
    entries: list[Entry[N]] = []
    rows = 0
    folded = 0  # actions accounted for by fold lines
    hidden: list[N] = []  # consecutive actions of the folded levels
    stack: list[tuple[int, N | str]] = [
        (0, item) for item in reversed(_visible_children(None, shape))
    ]
    while stack:
        depth, item = stack.pop()
        if not isinstance(item, str):
            stack.extend((depth + 1, c) for c in reversed(_visible_children(item, shape)))
        else:
            folded += item.hides if isinstance(item, FoldLine) else 0
        if cut is not None and HEAD_LEVELS <= depth < cut:
            if not isinstance(item, str):
                hidden.append(item)
            continue
        if hidden:
            entries.append((HEAD_LEVELS, _levels_line(hidden, cut or 0)))
            folded += len(hidden)
            hidden = []
        if rows >= MAX_ROWS:
            entries.append((0, _rest_line(len(actions) - rows - folded)))
            return entries
        shown = depth if cut is None or depth < HEAD_LEVELS else depth - cut + HEAD_LEVELS + 1
        entries.append((shown, item))
        if not isinstance(item, str):
            rows += 1
    if hidden:
        entries.append((HEAD_LEVELS, _levels_line(hidden, cut or 0)))
    return entries


def _visible_children(parent: N | None, shape: TreeShape[N]) -> list[N | str]:
    """A parent's children to draw: all of them, or a bounded choice with fold lines.

    Of more than `FOLD_CHILDREN`: the first `HEAD_CHILDREN`, the last
    `TAIL_CHILDREN`, and in between the first `NOTABLE_CHILDREN` whose subtree
    holds an action that did not succeed (a failure, even one a child caught, is
    never folded away while there is room for it), each run of the others folded
    into one line that counts their phases.
    """
    kids = shape.children_of(parent)
    actions = shape.actions
    if len(kids) <= FOLD_CHILDREN:
        return [actions[i] for i in kids]
    middle = kids[HEAD_CHILDREN:-TAIL_CHILDREN]
    # Where the notable ones are, found by C loops: a fan-out may have a million children.
    troubled = map(shape.unsettled.__getitem__, middle)
    notable = islice(compress(range(len(middle)), troubled), NOTABLE_CHILDREN)
    shown: list[N | str] = [actions[i] for i in kids[:HEAD_CHILDREN]]
    start = 0
    for at in notable:
        shown += _folded(middle[start:at], shape)
        shown.append(actions[middle[at]])
        start = at + 1
    shown += _folded(middle[start:], shape)
    shown += [actions[i] for i in kids[-TAIL_CHILDREN:]]
    return shown


def _folded(hidden: list[int], shape: TreeShape[N]) -> list[N | str]:
    """A run of children to fold: one line for them, or the child itself if alone."""
    if len(hidden) <= 1:
        return [shape.actions[i] for i in hidden]
    return [_children_line(hidden, shape)]


def _children_line(folded: list[int], shape: TreeShape[N]) -> FoldLine:
    """One line for consecutive folded children: how many, which, their phases."""
    actions = shape.actions
    inside = sum(map(shape.sizes.__getitem__, folded))
    counts = Counter(map(_phase, map(actions.__getitem__, folded)))
    phases = Counter({str(phase): n for phase, n in counts.items()})
    tally = ", ".join(f"{n:,} {phase}" for phase, n in phases.most_common())
    more = ""
    if inside > len(folded):
        troubled = sum(map(shape.unsettled.__getitem__, folded))
        below = troubled - len(folded) + phases["SUCCEEDED"]
        more = f" and {counted(inside - len(folded), 'action')}"
        more += " below them" + (f" ({below:,} of them not SUCCEEDED)" if below else "")
    first, last = actions[folded[0]].name, actions[folded[-1]].name
    line = FoldLine(
        f"… {len(folded):,} more children folded ({visible(first)} … "
        f"{visible(last)}: {tally}){more}; `flowsdk show RUN ACTION` shows one "
        "in full"
    )
    line.hides = inside
    return line


def _levels_line(hidden: Sequence[TreeNode], cut: int) -> str:
    return (
        f"… {len(hidden):,} actions of levels {HEAD_LEVELS} to {cut - 1} folded "
        f"({visible(hidden[0].name)} … {visible(hidden[-1].name)}); "
        "`flowsdk show RUN ACTION` shows one in full"
    )


def _rest_line(count: int) -> str:
    return f"… and {count:,} more actions not drawn; `flowsdk show RUN --json` lists them all"


class TreeShape(Generic[N]):
    """A tree's children, and per action its subtree's size and troubles, by start position.

    A run's outline may hold a million actions, most of them leaves of a few
    fan-outs: what can be is done by C loops over the whole list (`map`,
    `Counter`, a sort), and Python steps only over the actions that have
    children.
    """

    __slots__ = (
        "_by_parent",
        "_order",
        "actions",
        "deepest",
        "parents",
        "position",
        "sizes",
        "unsettled",
    )

    def __init__(self, actions: Sequence[N]) -> None:
        n = len(actions)
        self.actions = actions
        self.position = position = dict(zip(map(_name, actions), range(n), strict=True))
        # The position of each action's parent (-1: none, or not in the run): a parent
        # starts before its children, so a subtree is whole before its parent's, below.
        parents = list(map(position.get, map(_parent, actions), repeat(-1, n)))
        for i in list(compress(range(n), map(int.__le__, range(n), parents))):
            parents[i] = -1  # a parent that started after its child: drawn as a root
        # 1 for an action that did not succeed (yet); its subtree's count, below.
        own = list(map(_SUCCEEDED.__ne__, map(_phase, actions)))
        count = Counter(parents)
        inner = sorted(i for i in count if i >= 0)  # the actions with children, in start order
        depths: dict[int, int] = {}
        for i in inner:
            depths[i] = depths.get(parents[i], -1) + 1
        sizes = [1] * n
        unsettled = own.copy()
        for at, kids in count.items():
            if at >= 0:
                sizes[at] += kids
        for at, bad in Counter(compress(parents, own)).items():
            if at >= 0:
                unsettled[at] += bad
        for i in reversed(inner):  # a subtree is whole before its parent's
            at = parents[i]
            if at >= 0:
                sizes[at] += sizes[i] - 1
                unsettled[at] += unsettled[i] - own[i]
        self.parents = parents  # per action: its parent's start position, -1 for a root
        self.sizes = sizes  # per action: how many actions its subtree holds, itself included
        self.unsettled = unsettled  # per subtree: how many of its actions did not succeed
        self.deepest = max(depths.values(), default=-1) + 1 if n else 0
        # Each parent's children are one slice of the positions sorted by parent (stable).
        self._order = order = sorted(range(n), key=parents.__getitem__)
        self._by_parent = list(map(parents.__getitem__, order))

    def children_of(self, parent: N | None) -> list[int]:
        """The start positions of `parent`'s children (of the roots, for None), in start order."""
        at = -1 if parent is None else self.position[parent.name]
        lo = bisect_left(self._by_parent, at)
        hi = bisect_right(self._by_parent, at, lo)
        return self._order[lo:hi]
