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

from collections import Counter
from collections.abc import Sequence
from typing import Generic, TypeVar, cast

from flowsdk._phases import ActionPhase
from flowsdk._text import visible
from flowsdk.cli._output import TreeNode

__all__ = ["FOLD_CHILDREN", "FOLD_DEPTH", "MAX_ROWS", "folded_tree"]

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


class FoldLine(str):
    """A line standing for folded children: it knows how many actions it hides."""

    hides: int


def folded_tree(actions: Sequence[N]) -> list[Entry[N]]:
    """The depth-first tree of `actions` (`(depth, action)`), with folded parts as text lines.

    `actions` are in start order: records, or an outline of them (`TreeNode`).
    """
    shape = _Shape(actions)
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


def _visible_children(parent: N | None, shape: _Shape[N]) -> list[N | str]:
    """A parent's children to draw: all of them, or a bounded choice with fold lines.

    Of more than `FOLD_CHILDREN`: the first `HEAD_CHILDREN`, the last
    `TAIL_CHILDREN`, and in between the first `NOTABLE_CHILDREN` whose subtree
    holds an action that did not succeed (a failure, even one a child caught, is
    never folded away while there is room for it), each run of the others folded
    into one line that counts their phases.
    """
    kids = shape.children.get(None if parent is None else parent.name, [])
    if len(kids) <= FOLD_CHILDREN:
        return list(kids)
    shown: list[N | str] = list(kids[:HEAD_CHILDREN])
    hidden: list[N] = []
    notable = 0
    for kid in kids[HEAD_CHILDREN:-TAIL_CHILDREN]:
        if notable < NOTABLE_CHILDREN and shape.troubled(kid.name):
            notable += 1
            shown += _folded(hidden, shape)
            hidden = []
            shown.append(kid)
        else:
            hidden.append(kid)
    return [*shown, *_folded(hidden, shape), *kids[-TAIL_CHILDREN:]]


def _folded(hidden: list[N], shape: _Shape[N]) -> list[N | str]:
    """A run of children to fold: one line for them, or the child itself if alone."""
    if len(hidden) <= 1:
        return list(hidden)
    return [_children_line(hidden, shape)]


def _children_line(folded: Sequence[N], shape: _Shape[N]) -> FoldLine:
    """One line for consecutive folded children: how many, which, their phases."""
    inside = sum(shape.size(k.name) for k in folded)
    phases = Counter(str(k.phase) for k in folded)
    counted = ", ".join(f"{n:,} {phase}" for phase, n in phases.most_common())
    more = ""
    if inside > len(folded):
        below = sum(shape.troubled(k.name) for k in folded) - len(folded) + phases["SUCCEEDED"]
        more = f" and {inside - len(folded):,} {_plural(inside - len(folded), 'action')}"
        more += " below them" + (f" ({below:,} of them not SUCCEEDED)" if below else "")
    line = FoldLine(
        f"… {len(folded):,} more children folded ({visible(folded[0].name)} … "
        f"{visible(folded[-1].name)}: {counted}){more}; `flowsdk show RUN ACTION` shows one "
        "in full"
    )
    line.hides = inside
    return line


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else noun + "s"


def _levels_line(hidden: Sequence[TreeNode], cut: int) -> str:
    return (
        f"… {len(hidden):,} actions of levels {HEAD_LEVELS} to {cut - 1} folded "
        f"({visible(hidden[0].name)} … {visible(hidden[-1].name)}); "
        "`flowsdk show RUN ACTION` shows one in full"
    )


def _rest_line(count: int) -> str:
    return f"… and {count:,} more actions not drawn; `flowsdk show RUN --json` lists them all"


class _Shape(Generic[N]):
    """A tree's children by parent name, and per action its subtree's size and troubles."""

    __slots__ = ("children", "deepest", "position", "sizes", "unsettled")

    def __init__(self, actions: Sequence[N]) -> None:
        # One pass in start order (a parent starts before its children) and one back:
        # a run's outline may hold a million actions.
        position: dict[str | None, int] = {}
        parents: list[int] = []
        depths: list[int] = []
        unsettled: list[int] = []  # 1 for an action that did not succeed (yet)
        children: dict[str | None, list[N]] = {}
        for i, action in enumerate(actions):
            parent = action.parent
            at = position.get(parent, -1)
            position[action.name] = i
            parents.append(at)
            unsettled.append(action.phase != ActionPhase.SUCCEEDED)
            if at < 0:
                depths.append(0)
                parent = None
            else:
                depths.append(depths[at] + 1)
            kids = children.get(parent)
            if kids is None:
                children[parent] = [action]
            else:
                kids.append(action)
        sizes = [1] * len(parents)
        for i in range(len(parents) - 1, 0, -1):  # a subtree is whole before its parent's
            at = parents[i]
            if at >= 0:
                sizes[at] += sizes[i]
                unsettled[at] += unsettled[i]
        self.children = children
        self.position = cast("dict[str, int]", position)  # only names are put in it
        self.sizes = sizes
        self.unsettled = unsettled  # per subtree: how many of its actions did not succeed
        self.deepest = max(depths, default=0)

    def size(self, name: str) -> int:
        """How many actions the subtree of `name` holds, itself included."""
        return self.sizes[self.position[name]]

    def troubled(self, name: str) -> int:
        """How many actions of the subtree of `name` did not succeed, itself included."""
        return self.unsettled[self.position[name]]
