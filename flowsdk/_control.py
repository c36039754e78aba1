"""Control requests on a live run: abort, stop, mark-failed; and applying them from a store.

The functions here decide what a request means for a run (its targets, what is
refused, what is already over) and say what they did; the runtime
(`Runtime.request_cancel`, `Runtime.abandon_all`) delivers the cancellations.
Every operation is idempotent: repeating one changes nothing and says so.
"""

from __future__ import annotations

import time

from flowsdk._phases import AbortCause, RunPhase
from flowsdk._records import AbortRequest, ControlRequest, EventKind, StopMode, StopRequest
from flowsdk._runtime import _TERMINAL, ActionState, Runtime, _Internal, _iso
from flowsdk.errors import ActionNotFoundError
from flowsdk.store import ControlAnswer

__all__ = ["NOT_FOUND", "ControlResult", "abort", "apply_request", "find", "mark_failed", "stop"]

# The outcome a runner answers when the named action or group does not exist; the
# Client turns it into ActionNotFoundError (the CLI's exit code 3).
NOT_FOUND = "not_found"


class ControlResult:
    """What a control request did: `applied`, `already_ended` or `refused`.

    Attributes:
        outcome: `"applied"`, `"already_ended"` or `"refused"`.
        phase: The named action's phase, or the run's when no action was named.
        message: One sentence for a person.
    """

    __slots__ = ("message", "outcome", "phase")

    def __init__(self, outcome: str, phase: str, message: str) -> None:
        self.outcome = outcome
        self.phase = phase
        self.message = message

    def __repr__(self) -> str:
        return f"ControlResult({self.outcome!r}, {self.phase!r}, {self.message!r})"

    def as_dict(self) -> dict[str, str]:
        """Return the `--json` shape: outcome, phase, message."""
        return {"outcome": self.outcome, "phase": self.phase, "message": self.message}


def find(runtime: Runtime, action: str | None, group: str | None) -> list[ActionState]:
    """Resolve a control target: an action name, a group name, or (neither) the root.

    Raises:
        ActionNotFoundError: no such action or group; the message lists what exists.
    """
    if group is not None:
        found = [a for a in runtime.actions if a.group == group]
        if not found:
            groups = sorted({a.group for a in runtime.actions if a.group})
            raise ActionNotFoundError(
                f"run {runtime.name!r} has no group {group!r}"
                + (f"; its groups are: {', '.join(groups)}" if groups else "; it has no groups")
            )
        return found
    if action is None:
        assert runtime.root is not None
        return [runtime.root]
    state = runtime.by_name.get(action)
    if state is None:
        raise ActionNotFoundError(
            f"run {runtime.name!r} has no action {action!r}; "
            f"its actions are {_name_range(runtime.actions)}"
        )
    return [state]


def abort(
    runtime: Runtime,
    action: str | None = None,
    *,
    group: str | None = None,
    reason: str | None = None,
    by: str | None = None,
) -> ControlResult:
    """Abort the run (no action), one action's subtree, or a group's actions.

    Idempotent: an action that has ended, or whose abort is already under
    way, is left as it is and the result says so.
    """
    targets = find(runtime, action, group)
    if action is not None:
        what = f"action {action}"
    elif group is not None:
        what = f"group {group!r}"
    else:
        what = ""
        if runtime.phase.terminal:
            return ControlResult(
                "already_ended",
                runtime.phase.value,
                f"run {runtime.name!r} already finished: {runtime.phase.value}",
            )
        if runtime.closed:
            return ControlResult(
                "already_ended",
                runtime.phase.value,
                f"run {runtime.name!r} is finishing (its root has exited); nothing left to abort",
            )

    target = f"{what} of run {runtime.name!r}" if what else f"run {runtime.name!r}"

    def phase() -> str:
        return targets[0].phase.value if action is not None else runtime.phase.value

    live = [t for t in targets if t.phase not in _TERMINAL]
    if not live:
        return ControlResult("already_ended", phase(), f"{target} already finished: {phase()}")
    fresh = [t for t in live if t.req is not AbortCause.EXTERNAL]
    if not fresh:
        return ControlResult(
            "applied",
            phase(),
            f"abort of {target} already requested at {_iso(live[0].req_at)}",
        )
    runtime.event(
        EventKind.REQUEST,
        action,
        message=f"abort {what or 'run'}",
        reason=reason,
        requested_by=by,
    )
    runtime.request_cancel(fresh, AbortCause.EXTERNAL, reason, by)
    return ControlResult("applied", phase(), f"abort of {target} applied")


def stop(
    runtime: Runtime, *, abandon: bool = False, reason: str | None = None, by: str | None = None
) -> ControlResult:
    """Stop the run: wait for in-progress actions (default), or abandon them.

    A stop-and-abandon also escalates a run that is already stopping; a
    second stop-and-wait is refused.
    """
    if runtime.phase.terminal:
        return ControlResult(
            "already_ended",
            runtime.phase.value,
            f"run {runtime.name!r} already finished: {runtime.phase.value}",
        )
    mode = StopMode.ABANDON if abandon else StopMode.WAIT
    if runtime.stop_mode is StopMode.ABANDON or (
        runtime.stop_mode is StopMode.WAIT and mode is StopMode.WAIT
    ):
        hint = (
            "; use 'stop --abandon' to stop waiting for its actions"
            if mode is StopMode.WAIT
            else ""
        )
        return ControlResult(
            "refused",
            runtime.phase.value,
            f"run {runtime.name!r} is already stopping ({runtime.stop_mode.value}){hint}",
        )
    if runtime.closed and mode is StopMode.WAIT:
        return ControlResult(
            "already_ended",
            runtime.phase.value,
            f"run {runtime.name!r} is finishing (its root has exited)",
        )
    runtime.event(
        EventKind.REQUEST, None, message=f"stop ({mode.value})", reason=reason, requested_by=by
    )
    runtime.stop_mode = mode
    runtime.stop_info = (mode, reason, by, time.time())
    if runtime.phase is RunPhase.RUNNING:
        runtime.phase = RunPhase.STOPPING
        runtime.event(EventKind.RUN, None, RunPhase.STOPPING.value, reason=reason, requested_by=by)
    runtime.run_changed()
    if mode is StopMode.ABANDON:
        runtime.abandon_all(AbortCause.STOP, reason, by)
    return ControlResult(
        "applied", runtime.phase.value, f"stop ({mode.value}) of run {runtime.name!r} applied"
    )


def mark_failed(
    runtime: Runtime, action: str, *, reason: str | None = None, by: str | None = None
) -> ControlResult:
    """Mark one action as failed: its body gets `CancelledError` and it ends FAILED."""
    [target] = find(runtime, action, None)
    if target.phase in _TERMINAL:
        return ControlResult(
            "already_ended",
            target.phase.value,
            f"action {action} of run {runtime.name!r} already finished: {target.phase.value}",
        )
    if target.req is _Internal.MARK_FAILED:
        return ControlResult(
            "applied",
            target.phase.value,
            f"action {action} of run {runtime.name!r} is already being marked as failed",
        )
    runtime.event(EventKind.REQUEST, action, message="mark failed", reason=reason, requested_by=by)
    runtime.request_cancel([target], _Internal.MARK_FAILED, reason, by)
    return ControlResult(
        "applied", target.phase.value, f"action {action} of run {runtime.name!r} marked as failed"
    )


def _name_range(actions: list[ActionState]) -> str:
    if not actions:
        return "none"
    if len(actions) <= 8:
        return ", ".join(a.name for a in actions)
    return f"{actions[0].name}..{actions[-1].name} ({len(actions)} actions)"


def apply_request(runtime: Runtime, request: ControlRequest) -> ControlAnswer:
    """Apply one abort, stop or mark-failed request on the runner's loop and answer it.

    Each request is applied exactly once (the store hands it over once); the
    runtime's operations are idempotent besides.
    """
    by = request.requested_by
    try:
        result: ControlResult
        if isinstance(request, AbortRequest):
            result = abort(
                runtime, request.action, group=request.group, reason=request.reason, by=by
            )
        elif isinstance(request, StopRequest):
            result = stop(runtime, abandon=request.abandon, reason=request.reason, by=by)
        else:
            result = mark_failed(runtime, request.action, reason=request.reason, by=by)
    except ActionNotFoundError as exc:
        return ControlAnswer(NOT_FOUND, runtime.phase.value, str(exc))
    return ControlAnswer(result.outcome, result.phase, result.message)
