"""A run's limit on its actions, `max_actions`: a runaway recursion stops (SCENARIOS S5).

Checked where an action is created (`start_child`, `Runtime.replay`), against
`Runtime.max_actions`: the call that would create one action too many raises
`ActionLimitExceededError` where it is awaited and creates nothing, and a call never
awaited counts for nothing. The first refusal fails the run: its root is
cancelled with cause `action_limit` and ends FAILED with the error of
`limit_error`, so every action in progress is cancelled too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from flowsdk._phases import AbortCause
from flowsdk.errors import ActionLimitExceededError

if TYPE_CHECKING:
    from flowsdk._action import ActionState
    from flowsdk._options import TaskSpec

__all__ = ["check_max_actions", "limit_error", "over_limit"]

_WHAT = "the most actions the run may have, its root included"


class Limited(Protocol):
    """What `over_limit` needs of the run (`Runtime`)."""

    name: str
    max_actions: int | None
    root: ActionState | None

    def warn(self, action: ActionState | None, message: str) -> None: ...

    def abort_run(
        self, cause: AbortCause, *, reason: str | None = None, by: str | None = None
    ) -> None: ...


def check_max_actions(limit: object) -> int | None:
    """Return a run's `max_actions` if it is None or a positive int.

    Raises:
        TypeError: it is not an int (a bool is not one here).
        ValueError: it is not positive.
    """
    if limit is None:
        return None
    if type(limit) is bool or not isinstance(limit, int):
        raise TypeError(
            f"max_actions must be a positive int ({_WHAT}) or None, "
            f"not {type(limit).__name__} {limit!r}"
        )
    if limit < 1:
        raise ValueError(f"max_actions must be a positive int ({_WHAT}), not {limit}")
    return limit


def over_limit(runtime: Limited, task: TaskSpec, parent: ActionState) -> ActionLimitExceededError:
    """A call past `max_actions`: fail the run (the first time); return the call's error."""
    limit = runtime.max_actions
    assert limit is not None
    called = f"{parent.name} ({parent.task.name}) called task {task.name!r}"
    root = runtime.root
    if root is not None and root.req is None:  # the first refusal, in a run not ending already
        runtime.warn(
            parent,
            f"the run reached its limit of {limit:,} actions (max_actions): {called}, "
            "which was not started; the run fails and its actions in progress are cancelled",
        )
        runtime.abort_run(AbortCause.ACTION_LIMIT, reason=f"{called} past it")
    return ActionLimitExceededError(
        f"run {runtime.name!r} reached its limit of {limit:,} actions (max_actions): {called}, "
        "which was not started; give the run a higher max_actions if it needs more",
        run=runtime.name,
        action=parent.name,
        limit=limit,
    )


def limit_error(action: ActionState) -> ActionLimitExceededError:
    """The error of the root of a run that reached its `max_actions` (its reason says where)."""
    limit = action.runtime.max_actions or 0
    req = action.req
    return ActionLimitExceededError(
        f"run {action.run!r} reached its limit of {limit:,} actions (max_actions)"
        + (f": {req.reason}" if req is not None and req.reason else ""),
        run=action.run,
        action=action.name,
        limit=limit,
    )
