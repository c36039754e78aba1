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


# Forgotten phases are kept per chunk of this many start orders (`Forgotten`).
_CHUNK_BITS = 12
_CHUNK = 1 << _CHUNK_BITS
_IN_CHUNK = _CHUNK - 1


class Forgotten:
    """The phases and groups of the finished actions a run forgot.

    A phase is kept as its index in `_PHASES`, by chunks of 4,096 start
    orders: a `bytearray` of one code per action while the chunk fills, then,
    once every action of the chunk is forgotten with the same phase (the
    waves of a fan-out that succeeded), that one code. A run of a million
    such actions keeps a few kilobytes, not a megabyte; a chunk of mixed
    phases, or with an action still live, keeps its byte per action.
    """

    __slots__ = ("_chunks", "_filled", "groups", "spilled")

    def __init__(self) -> None:
        self.spilled = False
        self.groups: set[str] = set()
        self._chunks: list[bytearray | int | None] = []  # by seq >> _CHUNK_BITS
        self._filled: list[int] = []  # how many of each chunk's actions are forgotten

    def add(self, action: ActionState) -> None:
        """Remember a finished action's phase and group (the runtime drops the rest).

        Once per action: the runtime forgets an action when it pops it from its
        table (`RunLog.let_go`), so a complete chunk is never added to again.
        """
        seq = action.seq
        index = seq >> _CHUNK_BITS
        chunks = self._chunks
        if len(chunks) <= index:
            more = index + 1 - len(chunks)
            chunks.extend([None] * more)
            self._filled.extend([0] * more)
        chunk = chunks[index]
        if chunk is None:
            chunk = chunks[index] = bytearray(_CHUNK)
        assert type(chunk) is bytearray  # a complete chunk gets no more actions
        chunk[seq & _IN_CHUNK] = _PHASES.index(action.phase)
        filled = self._filled[index] = self._filled[index] + 1
        if filled == _CHUNK and chunk.count(chunk[0]) == _CHUNK:
            chunks[index] = chunk[0]  # every code is the same, none is 0 ("not forgotten")
        if action.group is not None:
            self.groups.add(action.group)

    def get(self, name: str, seq: int) -> Ended | None:
        """What is known of the forgotten action `name` (start order `seq`), if it is one."""
        index = seq >> _CHUNK_BITS
        chunk = self._chunks[index] if index < len(self._chunks) else None
        if chunk is None:
            return None
        phase = _PHASES[chunk if isinstance(chunk, int) else chunk[seq & _IN_CHUNK]]
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
