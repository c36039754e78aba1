"""Finding actions in a run's tree: by name, below other actions, and once forgotten.

A run that spills (see `Runtime.forget`) drops its finished actions; `Forgotten`
keeps what a control request naming one still needs: its phase, and the
groups such actions were in.
"""

from __future__ import annotations

from collections.abc import Iterable

from flowsdk._action import ActionState, Ended
from flowsdk._phases import ActionPhase

__all__ = ["Forgotten", "descendants", "seq_of"]

_PHASES = (None, *ActionPhase)  # phase codes; 0 is "not forgotten"


def seq_of(name: str) -> int | None:
    """The start order an action name `a<seq>` stands for, or None (`a01` is no name)."""
    digits = name[1:]
    if name[:1] != "a" or not (digits.isascii() and digits.isdigit()):
        return None
    seq = int(digits)
    return seq if f"a{seq}" == name else None


class Forgotten:
    """The phases (one byte each) and groups of the finished actions a run forgot."""

    __slots__ = ("groups", "phases", "spilled")

    def __init__(self) -> None:
        self.spilled = False
        self.phases = bytearray()  # seq -> index in _PHASES
        self.groups: set[str] = set()

    def add(self, action: ActionState) -> None:
        """Remember a finished action's phase and group (the runtime drops the rest)."""
        seq = action.seq
        phases = self.phases
        if len(phases) <= seq:
            phases.extend(bytes(seq + 1 - len(phases)))
        phases[seq] = _PHASES.index(action.phase)
        if action.group is not None:
            self.groups.add(action.group)

    def get(self, name: str, seq: int) -> Ended | None:
        """What is known of the forgotten action `name` (start order `seq`), if it is one."""
        code = self.phases[seq] if seq < len(self.phases) else 0
        phase = _PHASES[code]
        return Ended(name, phase) if phase is not None else None


def descendants(live: Iterable[ActionState], targets: set[ActionState]) -> list[ActionState]:
    """The `live` actions below any of `targets`, in one pass.

    Each ancestor chain is walked once (the answer is remembered for every
    node on it), so a deep tree costs linear time, not depth squared.
    """
    if all(t.calls == 0 and t.attempt == 1 for t in targets):
        return []  # leaves: nothing below them (the common case, kept cheap)
    below: dict[ActionState, bool] = dict.fromkeys(targets, True)
    found = []
    for action in live:
        if action in below:
            continue
        path = []
        node: ActionState | None = action
        verdict = False
        while node is not None:
            known = below.get(node)
            if known is not None:
                verdict = known
                break
            path.append(node)
            node = node.parent
        for visited in path:
            below[visited] = verdict
        if verdict:
            found.append(action)
    return found
