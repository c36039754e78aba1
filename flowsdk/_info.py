"""`flowsdk.current_action()`: what a running body can learn about itself."""

from __future__ import annotations

from flowsdk._records import ActionInfo
from flowsdk._runtime import current_state
from flowsdk.errors import NotInRunError

__all__ = ["current_action"]


def current_action() -> ActionInfo:
    """Return the calling action's run, name, task, attempt and group.

    Inside a plain asyncio task started by an action's body, this is that
    action.

    Raises:
        NotInRunError: called outside a run.
    """
    state = current_state()
    if state is None:
        raise NotInRunError(
            "flowsdk.current_action() was called outside a run; "
            "call it from a task body running under flowsdk.run()"
        )
    return ActionInfo(
        run=state.runtime.name,
        name=state.name,
        task=state.task.name,
        attempt=state.attempt,
        group=state.group,
    )
