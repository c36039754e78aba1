"""What earlier attempts of a run recorded, for a retry to replay."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from flowsdk._payload import inputs_digest, same_inputs
from flowsdk._phases import ActionPhase
from flowsdk.errors import NondeterminismError

if TYPE_CHECKING:
    from flowsdk._options import TaskSpec

__all__ = ["History", "Keyed"]


class Keyed(Protocol):
    """What `History.key_of` reads of a live action: its name, key segment and parent."""

    @property
    def name(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def parent(self) -> Keyed | None: ...


class History:
    """What a previous attempt of a run recorded, keyed by call key (for a retry)."""

    __slots__ = ("_calls", "_keys", "run")

    def __init__(
        self, run: str, calls: dict[str, tuple[str, bytes | None, str, bytes | None]]
    ) -> None:
        self.run = run
        self._calls = calls
        self._keys: dict[str, str] = {}  # live action name -> its whole key

    def key_of(self, action: Keyed) -> str:
        """Return a live action's whole key (its ancestors' segments and its own)."""
        keys = self._keys
        chain = []
        at: Keyed | None = action
        while at is not None and at.name not in keys:
            chain.append(at)
            at = at.parent
        key = keys[at.name] if at is not None else ""
        for link in reversed(chain):
            key += link.key
            keys[link.name] = key
        return key

    def match(self, key: str, spec: TaskSpec, inputs: bytes) -> bytes | None:
        """Return the recorded output to replay for this call, or None to execute it.

        The inputs match when they bind to the same values (`same_inputs`): a call
        made by keyword, or with a default given, replays one made otherwise.

        Raises:
            NondeterminismError: the key was recorded for another task or other inputs.
        """
        recorded = self._calls.get(key)
        if recorded is None:
            return None
        rec_task, rec_inputs, phase, output = recorded
        task = spec.name
        if rec_task != task or (
            rec_inputs is not None and not same_inputs(rec_inputs, inputs, spec)
        ):
            what = "task" if rec_task != task else "inputs"
            before = inputs_digest(rec_inputs, spec)[:12] if rec_inputs is not None else "?"
            now = inputs_digest(inputs, spec)[:12]
            raise NondeterminismError(
                f"run {self.run!r} diverged from its history at call {key}: a previous attempt "
                f"recorded {rec_task} with inputs {before}, this attempt called {task} with "
                f"inputs {now} (the {what} differ). A retry replays only "
                "calls made in the same order with the same inputs; nothing recorded was handed "
                "to this call. Start a new run instead"
            )
        if phase == ActionPhase.SUCCEEDED.value and output is not None:
            return output
        return None
