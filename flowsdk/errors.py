"""The errors flowsdk raises, all rooted at `FlowError`.

```
FlowError(Exception)
├── ActionError                 .run, .action
│   ├── RuntimeUserError        a child's user code raised; __cause__ is the original exception
│   │   ├── TaskTimeoutError
│   │   ├── ActionLimitExceededError  a call past the run's `max_actions` (the run FAILED)
│   │   └── ActionMarkedFailedError   (as the __cause__ an operator's mark-failed produces)
│   └── ActionAbortedError      .reason, .cause
├── RunClosedError              a task was called after the root exited (also RuntimeError)
├── RunStoppingError            a task was called while the run is stopping (also RuntimeError)
├── RunStoppedError             result() of a stopped run
├── NotInRunError
├── RunNotFoundError, ActionNotFoundError   (also LookupError)
├── RunExistsError
├── InvalidStateError           a control request the current phase refuses
├── PermissionDeniedError
├── SerializationError          an input or output that cannot be recorded
├── NonRecoverableError         raised by a body: a permanent error, never retried
├── NondeterminismError         a retried run diverged from its recorded history
└── StoreError
    ├── StoreCorruptedError
    └── StoreLockedError
```

`ActionAbortedError` is deliberately *not* a `RuntimeUserError`: `except
RuntimeUserError:` never swallows an operator's abort by accident. Neither is a
`CancelledError`, so `asyncio.gather(..., return_exceptions=True)` returns both
as values. Every error pickles with its attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "ActionAbortedError",
    "ActionError",
    "ActionLimitExceededError",
    "ActionMarkedFailedError",
    "ActionNotFoundError",
    "FlowError",
    "InvalidStateError",
    "NonRecoverableError",
    "NondeterminismError",
    "NotInRunError",
    "PermissionDeniedError",
    "RunClosedError",
    "RunExistsError",
    "RunNotFoundError",
    "RunStoppedError",
    "RunStoppingError",
    "RuntimeUserError",
    "SerializationError",
    "StoreCorruptedError",
    "StoreError",
    "StoreLockedError",
    "TaskTimeoutError",
]


class FlowError(Exception):
    """Base of every error flowsdk raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes do not survive the default Exception pickling
        # (which replays only .args); restore them from __dict__.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[FlowError], args: tuple[Any, ...], state: dict[str, Any]) -> FlowError:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class ActionError(FlowError):
    """Something happened to one action of a run.

    Attributes:
        run: The run's name.
        action: The action's name (`a0` is the root).
    """

    def __init__(self, message: str, *, run: str, action: str) -> None:
        super().__init__(message)
        self.run = run
        self.action = action


class RuntimeUserError(ActionError):
    """A child action's user code raised; `__cause__` is the original exception.

    In the process that ran the child, `__cause__` is the very exception object
    the body raised. Read from the store, it is absent and `error_type`,
    `error_message` and `error_traceback` carry the recorded text. `code` is
    `error_type` under Flyte's name, so ported `except` blocks keep working.
    """

    def __init__(
        self,
        message: str,
        *,
        run: str,
        action: str,
        error_type: str = "",
        error_message: str = "",
        error_traceback: str = "",
    ) -> None:
        super().__init__(message, run=run, action=action)
        self.error_type = error_type
        self.error_message = error_message
        self.error_traceback = error_traceback

    @property
    def code(self) -> str:
        """The original error's type name (Flyte's name for `error_type`)."""
        return self.error_type


class TaskTimeoutError(RuntimeUserError):
    """An attempt of an action ran longer than its task's `timeout`."""


class ActionLimitExceededError(RuntimeUserError):
    """A task was called past the run's `max_actions`: no action was created, the run FAILED.

    Raised at the refused call, in the calling body (`action` names it); the
    run's root then ends `FAILED` with it (`action` is the root) and every
    action in progress is cancelled. A runaway recursion stops there.

    Attributes:
        limit: The run's `max_actions`.
    """

    def __init__(self, message: str, *, run: str, action: str, limit: int) -> None:
        super().__init__(message, run=run, action=action)
        self.limit = limit


class ActionMarkedFailedError(RuntimeUserError):
    """An operator marked the action as failed (the `__cause__` a parent sees).

    Attributes:
        reason: The operator's reason, or `None`.
    """

    def __init__(self, message: str, *, run: str, action: str, reason: str | None = None) -> None:
        super().__init__(message, run=run, action=action)
        self.reason = reason


class ActionAbortedError(ActionError):
    """A child action was aborted by an operator (CLI, console or API).

    Attributes:
        reason: The reason the operator gave, or `None`.
        cause: The `flowsdk.AbortCause` value recorded for the action (a string).
    """

    def __init__(
        self,
        message: str,
        *,
        run: str,
        action: str,
        reason: str | None = None,
        cause: str = "external",
    ) -> None:
        super().__init__(message, run=run, action=action)
        self.reason = reason
        self.cause = cause


class RunClosedError(FlowError, RuntimeError):
    """A task was called after its run's root action exited; nothing was started."""


class RunStoppingError(FlowError, RuntimeError):
    """A task was called while its run is stopping; nothing was started."""


class RunStoppedError(FlowError):
    """The run was stopped by an operator, so it has no result."""


class NotInRunError(FlowError):
    """A run-only operation (such as `flowsdk.current_action()`) was used outside a run."""


class RunNotFoundError(FlowError, LookupError):
    """No run of that name is in the store."""


class ActionNotFoundError(FlowError, LookupError):
    """The run has no action (or group) of that name."""

    @classmethod
    def for_action(
        cls, run: str, action: str, names: Sequence[str], count: int | None = None
    ) -> ActionNotFoundError:
        """Build the error for a missing action, listing the run's actions (`names`, in order).

        With `count` (how many actions the run has), `names` may hold only the
        first and the last of more than eight: all that the message shows.
        """
        count = len(names) if count is None else count
        if not count:
            known = "none"
        elif count <= 8:
            known = ", ".join(names)
        else:
            known = f"{names[0]}..{names[-1]} ({count} actions)"
        return cls(f"run {run!r} has no action {action!r}; its actions are {known}")

    @classmethod
    def for_group(cls, run: str, group: str, groups: Sequence[str]) -> ActionNotFoundError:
        """Build the error for a missing group, listing the run's groups.

        A group exists once one of its actions has started: a pipeline stage
        that has not started yet has no action to abort.
        """
        return cls(
            f"run {run!r} has no action in group {group!r} (yet: a group has actions only "
            "once one of them has started)"
            + (f"; its groups are: {', '.join(groups)}" if groups else "; it has no groups yet")
        )


class RunExistsError(FlowError):
    """A run of that name already exists in the store."""


class InvalidStateError(FlowError):
    """A control request that the target's current phase refuses."""


class PermissionDeniedError(FlowError):
    """The caller's token does not grant the requested operation."""


class SerializationError(FlowError, TypeError):
    """An action's input or output cannot be recorded."""


class NondeterminismError(FlowError):
    """A retried run called something other than what its history recorded."""


class NonRecoverableError(FlowError):
    """Raised by a task body for a permanent error: the action fails without a retry.

    Whatever the task's `retries` says, no further attempt starts; the parent
    gets `RuntimeUserError` whose `__cause__` is this error. Subclass it for
    errors of your own that no retry can fix.
    """


class StoreError(FlowError):
    """The store cannot be used."""


class StoreCorruptedError(StoreError):
    """The store's file is not a flowsdk store or is damaged; it was left untouched."""


class StoreLockedError(StoreError):
    """Another process held the store's write lock past the busy timeout."""
