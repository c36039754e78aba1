"""Applying control requests that reach a live run through its store."""

from __future__ import annotations

from flowsdk._records import AbortRequest, ControlRequest, StopRequest
from flowsdk._runtime import ControlResult, Runtime
from flowsdk.errors import ActionNotFoundError
from flowsdk.store import ControlAnswer

__all__ = ["NOT_FOUND", "apply_request"]

# The outcome a runner answers when the named action or group does not exist; the
# Client turns it into ActionNotFoundError (the CLI's exit code 3).
NOT_FOUND = "not_found"


def apply_request(runtime: Runtime, request: ControlRequest) -> ControlAnswer:
    """Apply one abort, stop or mark-failed request on the runner's loop and answer it.

    Each request is applied exactly once (the store hands it over once); the
    runtime's operations are idempotent besides.
    """
    by = request.requested_by
    try:
        result: ControlResult
        if isinstance(request, AbortRequest):
            result = runtime.abort(
                request.action, group=request.group, reason=request.reason, by=by
            )
        elif isinstance(request, StopRequest):
            result = runtime.stop(abandon=request.abandon, reason=request.reason, by=by)
        else:
            result = runtime.mark_failed(request.action, reason=request.reason, by=by)
    except ActionNotFoundError as exc:
        return ControlAnswer(NOT_FOUND, runtime.phase.value, str(exc))
    return ControlAnswer(result.outcome, result.phase, result.message)
