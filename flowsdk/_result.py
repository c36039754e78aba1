"""`Run`: a run that has ended, as its runner returns it or a store gives it back."""

from __future__ import annotations

import contextlib
from typing import Any, Generic, TypeVar

import msgspec

from flowsdk._payload import decode_output
from flowsdk._phases import AbortCause, RunPhase
from flowsdk._records import ActionRecord, Event
from flowsdk.errors import (
    ActionAbortedError,
    ActionError,
    ActionMarkedFailedError,
    InvalidStateError,
    RunStoppedError,
    RuntimeUserError,
)
from flowsdk.store import StoredRun

__all__ = ["NO_VALUE", "Run", "run_from_stored"]

R = TypeVar("R")

NO_VALUE: Any = object()
"""What a `Run` holds as its value when the root's output is not known."""


class Run(Generic[R]):
    """A run that has ended: its phase, its actions and events, and its result.

    Args:
        stored: The run's records (lists built when first read).
        value: The root's value, when known (`NO_VALUE` otherwise).
        exc: The root's exception object, in the process that ran it.
    """

    def __init__(
        self, stored: StoredRun, *, value: Any = NO_VALUE, exc: BaseException | None = None
    ) -> None:
        self.record = stored.record
        self._stored = stored
        self._value = value
        self._exc = exc

    def payloads(self) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Each action's recorded inputs and output (MessagePack), by action name."""
        return self._stored.payloads

    @property
    def actions(self) -> list[ActionRecord]:
        """The run's actions, in start order."""
        return self._stored.actions

    @property
    def events(self) -> list[Event]:
        """The run's event log, oldest first."""
        return self._stored.events

    @property
    def name(self) -> str:
        """The run's name."""
        return self.record.name

    @property
    def phase(self) -> RunPhase:
        """The run's terminal phase."""
        return self.record.phase

    @property
    def attempt(self) -> int:
        """Which attempt of the run this is (1 for the first)."""
        return self.record.attempt

    def __repr__(self) -> str:
        return f"<Run {self.name} {self.phase.value} {len(self.actions)} actions>"

    def action(self, name: str) -> ActionRecord:
        """Return the record of the action called `name` (e.g. `"a3"`)."""
        for record in self.actions:
            if record.name == name:
                return record
        raise KeyError(name)

    def result(self) -> R:
        """Return the root's value, or raise what a parent awaiting the root would get.

        Raises:
            RuntimeUserError: the root failed; `__cause__` is its exception (in
                the process that ran it).
            ActionAbortedError: the run was aborted.
            RunStoppedError: the run was stopped.
        """
        phase = self.phase
        if phase is RunPhase.SUCCEEDED:
            if self._value is NO_VALUE:
                raise InvalidStateError(
                    f"run {self.name!r} succeeded but its output was not recorded"
                )
            return self._value  # type: ignore[no-any-return]
        if phase is RunPhase.STOPPED:
            stop = self.record.stop
            raise RunStoppedError(
                f"run {self.name!r} was stopped"
                + (f" ({stop.mode.value})" if stop else "")
                + (f": {stop.reason}" if stop and stop.reason else "")
            )
        exc = self._exc
        # Read only on failure: building every record of a deep run is not free.
        root = self.actions[0]
        if phase is RunPhase.ABORTED:
            if isinstance(exc, ActionError):
                raise exc
            abort = root.abort
            raise ActionAbortedError(
                f"run {self.name!r} was aborted"
                + (f": {abort.reason}" if abort and abort.reason else ""),
                run=self.name,
                action=root.name,
                reason=abort.reason if abort else None,
                cause=abort.cause.value if abort else AbortCause.EXTERNAL.value,
            )
        if phase in (RunPhase.RUNNING, RunPhase.STOPPING):
            raise InvalidStateError(f"run {self.name!r} has not ended: {phase.value}")
        if isinstance(exc, RuntimeUserError) and not isinstance(exc, ActionMarkedFailedError):
            raise exc
        if exc is not None and not isinstance(exc, Exception):
            raise exc  # a BaseException of the root's body: unwrapped, as a parent gets it
        error = root.error
        raise RuntimeUserError(
            f"run {self.name!r} {phase.value.lower()}"
            + (f": {error.type}: {error.message}" if error else ""),
            run=self.name,
            action=root.name,
            error_type=error.type if error else "",
            error_message=error.message if error else "",
            error_traceback=error.traceback if error else "",
        ) from (exc if isinstance(exc, Exception) else None)


def run_from_stored(stored: StoredRun) -> Run[Any]:
    """Build a `Run` from a store's record; `result()` decodes the recorded output."""
    value: Any = NO_VALUE
    if stored.record.phase is RunPhase.SUCCEEDED and stored.actions:
        output = stored.payloads.get(stored.actions[0].name, (None, None))[1]
        if output is not None:
            # A damaged record must not stop a reader from seeing the run's
            # tree: `result()` then says that no output can be read.
            with contextlib.suppress(msgspec.DecodeError):
                value = decode_output(None, output)
    return Run(stored, value=value)
