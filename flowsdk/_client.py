"""`flowsdk.Client`: read and control runs from any process, through the store."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from flowsdk._control import NOT_FOUND, ControlResult
from flowsdk._payload import decode_output
from flowsdk._phases import RunPhase
from flowsdk._records import AbortRequest, ControlRequest, MarkFailedRequest, RunRecord, StopRequest
from flowsdk._retry import retry_run
from flowsdk._run import _MISSING, Run
from flowsdk._runtime import requester
from flowsdk.errors import ActionNotFoundError, InvalidStateError
from flowsdk.store import Store, StoredRun, open_store

__all__ = ["Client"]

# How long a control request waits for the live runner's answer (normally < 100 ms).
ANSWER_TIMEOUT = 10.0


class Client:
    """The operations of the CLI, from Python: list, read, abort, stop, mark failed.

    Control requests return once the live runner has applied them (normally
    within 100 ms), or at once when the target has already ended or its runner
    is gone; they do not wait for the run to end.

    Args:
        store: A store URL, path or object; default `$FLOWSDK_STORE`, else
            `sqlite:///.flowsdk/flowsdk.db`.
    """

    def __init__(self, store: str | Store | None = None) -> None:
        self.store = open_store(store)

    def __repr__(self) -> str:
        return f"Client({self.store.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the store's connections."""
        self.store.close()

    # -- reading ---------------------------------------------------------------------

    def runs(
        self, *, phase: RunPhase | str | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Return the execution history (latest attempt of each run), newest first."""
        return self.store.list_runs(
            phase=RunPhase(phase) if phase is not None else None, limit=limit
        )

    def get_run(self, name: str, *, attempt: int | None = None) -> Run[Any]:
        """Return a run (its latest attempt, or `attempt`) with its actions and events.

        Raises:
            RunNotFoundError: no such run; the message suggests close names.
        """
        stored = self.store.load_run(name, attempt)
        return stored_run(stored)

    def retry(self, run: str) -> Run[Any]:
        """Run the next attempt of a FAILED, ABORTED, STOPPED or CRASHED run, in the foreground.

        Calls that match a recorded action that succeeded (same key, task and
        inputs) are not executed: their recorded output is returned and the
        action shows `replayed`. Everything else runs again (at least once).

        Raises:
            RunNotFoundError: no such run.
            InvalidStateError: the run succeeded or is still live, or its task
                cannot be imported.
            NondeterminismError: (from inside the run) a call differs from the history.
        """
        return retry_run(self.store, run)

    # -- control ---------------------------------------------------------------------

    def abort(
        self,
        run: str,
        action: str | None = None,
        *,
        group: str | None = None,
        reason: str | None = None,
    ) -> ControlResult:
        """Abort a run, one action's subtree, or a group's actions. Idempotent.

        Raises:
            RunNotFoundError: no such run.
            ActionNotFoundError: the run has no such action or group.
        """
        request = AbortRequest(
            run=run, action=action, group=group, reason=reason, requested_by=requester()
        )
        return self.control(request)

    def stop(self, run: str, *, abandon: bool = False, reason: str | None = None) -> ControlResult:
        """Stop a run: let its in-progress actions finish, or (`abandon=True`) abandon them.

        Raises:
            InvalidStateError: the run is already stopping (a second stop-and-wait).
        """
        result = self.control(
            StopRequest(run=run, abandon=abandon, reason=reason, requested_by=requester())
        )
        if result.outcome == "refused":
            raise InvalidStateError(result.message)
        return result

    def mark_failed(self, run: str, action: str, *, reason: str | None = None) -> ControlResult:
        """Mark an action as failed: its body is cancelled, its parent gets `RuntimeUserError`."""
        return self.control(
            MarkFailedRequest(run=run, action=action, reason=reason, requested_by=requester())
        )

    def control(self, request: ControlRequest) -> ControlResult:
        """Deliver any control request and return the answer (`refused` included)."""
        stored = self.store.load_run(request.run)
        action = getattr(request, "action", None)
        group = getattr(request, "group", None)
        if stored.record.phase.terminal:
            return _already_ended(stored, action, group)
        answer = self.store.request(request, timeout=ANSWER_TIMEOUT)
        if answer.outcome == NOT_FOUND:
            raise ActionNotFoundError(answer.message)
        return ControlResult(answer.outcome, answer.phase, answer.message)


def stored_run(stored: StoredRun) -> Run[Any]:
    """Build a `Run` from a store's record; `result()` decodes the recorded output."""
    value: Any = _MISSING
    if stored.record.phase is RunPhase.SUCCEEDED and stored.actions:
        output = stored.payloads.get(stored.actions[0].name, (None, None))[1]
        if output is not None:
            value = decode_output(None, output)
    payloads = stored.payloads
    return Run(stored.record, stored.actions, stored.events, value=value, payloads=lambda: payloads)


def _already_ended(stored: StoredRun, action: str | None, group: str | None) -> ControlResult:
    run = stored.record
    names = {a.name: a for a in stored.actions}
    if action is not None:
        record = names.get(action)
        if record is None:
            raise ActionNotFoundError(
                f"run {run.name!r} has no action {action!r}; its actions are "
                + (
                    ", ".join(list(names)[:8]) + (" ..." if len(names) > 8 else "")
                    if names
                    else "none"
                )
            )
        phase = record.phase.value
        return ControlResult(
            "already_ended", phase, f"action {action} of run {run.name!r} already finished: {phase}"
        )
    if group is not None and not any(a.group == group for a in stored.actions):
        groups = sorted({a.group for a in stored.actions if a.group})
        raise ActionNotFoundError(
            f"run {run.name!r} has no group {group!r}"
            + (f"; its groups are: {', '.join(groups)}" if groups else "; it has no groups")
        )
    phase = run.phase.value
    return ControlResult("already_ended", phase, f"run {run.name!r} already finished: {phase}")
