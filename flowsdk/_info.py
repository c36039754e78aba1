"""`flowsdk.current_action()`: what a running body can learn about itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowsdk._action import current_state
from flowsdk.errors import NotInRunError

if TYPE_CHECKING:
    from flowsdk._records import ActionInfo

__all__ = ["current_action"]


def current_action() -> ActionInfo:
    """Return the calling action's run, name, task, attempt, group and abort.

    Inside a plain asyncio task started by an action's body, this is that
    action. `abort` is `None` until a cancellation has been delivered to the
    action; then it holds the request's reason, cause, requester and time.

    Raises:
        NotInRunError: called outside a run.
    """
    state = current_state()
    if state is None:
        raise NotInRunError(
            "flowsdk.current_action() was called outside a run; "
            "call it from a task body running under flowsdk.run()"
        )
    req = state.req
    return (_info_type[0] or _load_info_type())(
        run=state.run,
        name=state.name,
        task=state.task.name,
        attempt=state.attempt,
        group=state.group,
        abort=req.info() if req is not None and state.cancels else None,
    )


# `ActionInfo`, imported on the first call (so that `import flowsdk` stays light) and
# kept: an import statement in the function would cost about 1 us a call.
_info_type: list[type[ActionInfo] | None] = [None]


def _load_info_type() -> type[ActionInfo]:
    from flowsdk._records import ActionInfo

    _info_type[0] = ActionInfo
    return ActionInfo
