"""The runner's side of control: apply abort, stop and mark-failed to a live run.

`apply_request` is the handler a store's control channel calls on the run's
loop. It resolves the target in the live run (an action the store has not
seen yet included), decides what the request means (refused, already over,
already under way), and leaves every change of state to the runtime
(`Runtime.request_cancel`, `Runtime.request_stop`). Every operation is
idempotent: repeating one changes nothing and says so.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flowsdk._action import ActionState, Ended
from flowsdk._phases import AbortCause, ActionPhase
from flowsdk._records import (
    AbortRequest,
    ControlRequest,
    ControlResult,
    EventKind,
    Outcome,
    RefusedRequest,
    StopMode,
    StopRequest,
    describe_target,
)
from flowsdk._runtime import Runtime
from flowsdk.errors import ActionNotFoundError

__all__ = ["apply_request", "find"]

APPLIED, ALREADY_ENDED, REFUSED = Outcome.APPLIED, Outcome.ALREADY_ENDED, Outcome.REFUSED


def find(runtime: Runtime, action: str | None, group: str | None) -> list[ActionState | Ended]:
    """Resolve a control target: an action name, a group name, or (neither) the root.

    Raises:
        ActionNotFoundError: no such action or group; the message lists what exists.
    """
    if group is not None:
        found: list[ActionState | Ended] = [a for a in runtime.actions.values() if a.group == group]
        if not found and group in runtime.forgotten.groups:
            return [Ended(group, ActionPhase.SUCCEEDED)]  # its actions have all ended
        if not found:
            groups = {a.group for a in runtime.actions.values() if a.group}
            raise ActionNotFoundError.for_group(
                runtime.name, group, sorted(groups | runtime.forgotten.groups)
            )
        return found
    if action is None:
        assert runtime.root is not None
        return [runtime.root]
    state = runtime.action_named(action)
    if state is None:
        raise ActionNotFoundError.for_action(
            runtime.name, action, [a.name for a in runtime.actions.values()]
        )
    return [state]


def abort(
    runtime: Runtime,
    action: str | None = None,
    *,
    group: str | None = None,
    reason: str | None = None,
    by: str | None = None,
    at: float | None = None,
) -> ControlResult:
    """Abort the run (no action), one action's subtree, or a group's actions (asked `at`)."""
    targets = find(runtime, action, group)
    target = describe_target(runtime.name, action, group)
    if action is None and group is None:
        if runtime.phase.terminal:
            return _result(ALREADY_ENDED, runtime.phase.value, f"{target} already finished")
        if runtime.closed:
            return _result(
                ALREADY_ENDED,
                runtime.phase.value,
                f"{target} is {_FINISHING}; nothing left to abort",
            )

    def phase() -> str:
        return targets[0].phase.value if action is not None else runtime.phase.value

    live = [t for t in targets if isinstance(t, ActionState) and not t.phase.terminal]
    if not live:
        return _result(ALREADY_ENDED, phase(), f"{target} already finished")
    if runtime.closed:
        # Its root has exited: what is left is being cancelled (`root_exit`) and keeps
        # that record, whatever a later request names (SCENARIOS R3).
        return _result(ALREADY_ENDED, phase(), f"{target} is {_FINISHING}; nothing left to abort")
    fresh = [t for t in live if t.cause is not AbortCause.EXTERNAL]
    if not fresh:
        req = live[0].req
        when = datetime.fromtimestamp(req.at, UTC).isoformat() if req is not None else "?"
        return _result(APPLIED, phase(), f"abort of {target} already requested at {when}")
    what = f"action {action}" if action else f"group {group!r}" if group else "run"
    runtime.event(
        EventKind.REQUEST, action, message=f"abort {what}", reason=reason, requested_by=by
    )
    runtime.request_cancel(fresh, AbortCause.EXTERNAL, reason, by, at)
    return _result(APPLIED, phase(), f"abort of {target} applied")


def stop(
    runtime: Runtime,
    *,
    abandon: bool = False,
    reason: str | None = None,
    by: str | None = None,
    at: float | None = None,
) -> ControlResult:
    """Stop the run: wait for in-progress actions (default), or abandon them.

    A stop-and-abandon also escalates a run that is already stopping; a
    second stop-and-wait is refused.
    """
    name = runtime.name
    if runtime.phase.terminal:
        return _result(ALREADY_ENDED, runtime.phase.value, f"run {name!r} already finished")
    mode = StopMode.ABANDON if abandon else StopMode.WAIT
    current = runtime.stop.mode if runtime.stop is not None else None
    if current is StopMode.ABANDON or (current is StopMode.WAIT and mode is StopMode.WAIT):
        hint = "; use 'stop --abandon' to stop waiting for its actions" if not abandon else ""
        return _result(
            REFUSED,
            runtime.phase.value,
            f"run {name!r} is already stopping ({current.value}){hint}",
        )
    if runtime.closed and mode is StopMode.WAIT:
        return _result(ALREADY_ENDED, runtime.phase.value, f"run {name!r} is {_FINISHING}")
    runtime.event(
        EventKind.REQUEST, None, message=f"stop ({mode.value})", reason=reason, requested_by=by
    )
    runtime.request_stop(mode, reason, by, at)
    return _result(APPLIED, runtime.phase.value, f"stop ({mode.value}) of run {name!r} applied")


def mark_failed(
    runtime: Runtime,
    action: str,
    *,
    reason: str | None = None,
    by: str | None = None,
    at: float | None = None,
) -> ControlResult:
    """Mark one action as failed: its body gets `CancelledError` and it ends FAILED."""
    [target] = find(runtime, action, None)
    what = describe_target(runtime.name, action, None)
    if not isinstance(target, ActionState) or target.phase.terminal:
        return _result(ALREADY_ENDED, target.phase.value, f"{what} already finished")
    if runtime.closed:
        return _result(
            ALREADY_ENDED, target.phase.value, f"{what} is {_FINISHING}; not marked as failed"
        )
    if target.cause is AbortCause.MARK_FAILED:
        return _result(APPLIED, target.phase.value, f"{what} is already being marked as failed")
    runtime.event(EventKind.REQUEST, action, message="mark failed", reason=reason, requested_by=by)
    runtime.request_cancel([target], AbortCause.MARK_FAILED, reason, by, at)
    return _result(APPLIED, target.phase.value, f"{what} marked as failed")


_FINISHING = "finishing (the run's root has exited)"


def _result(outcome: Outcome, phase: str, message: str) -> ControlResult:
    if outcome is ALREADY_ENDED and message.endswith("already finished"):
        message = f"{message}: {phase}"
    return ControlResult(outcome=outcome, phase=phase, message=message)


def apply_request(runtime: Runtime, request: ControlRequest) -> ControlResult:
    """Apply one abort, stop or mark-failed request on the runner's loop and return the result.

    Each request is applied exactly once (the store hands it over once); the
    operations are idempotent besides.

    Raises:
        ActionNotFoundError: the run has no such action or group.
    """
    by = request.requested_by
    if isinstance(request, RefusedRequest):
        runtime.event(EventKind.REQUEST, request.action, message=request.message, requested_by=by)
        return _result(REFUSED, runtime.phase.value, request.message)
    # The record says when the operator asked, not when a blocked loop got to it.
    at = request.requested_at.timestamp() if request.requested_at is not None else None
    reason = request.reason
    if isinstance(request, AbortRequest):
        return abort(runtime, request.action, group=request.group, reason=reason, by=by, at=at)
    if isinstance(request, StopRequest):
        return stop(runtime, abandon=request.abandon, reason=reason, by=by, at=at)
    return mark_failed(runtime, request.action, reason=reason, by=by, at=at)
