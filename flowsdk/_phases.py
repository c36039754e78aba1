"""Phases of actions and runs, abort causes, and the one transition table."""

from __future__ import annotations

import enum

__all__ = [
    "ACTION_TERMINAL",
    "RUN_TERMINAL",
    "AbortCause",
    "ActionPhase",
    "RunPhase",
    "check_action_transition",
    "check_run_transition",
]


class ActionPhase(enum.StrEnum):
    """Where an action is in its life; the last five are terminal."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"
    ABANDONED = "ABANDONED"
    CRASHED = "CRASHED"

    @property
    def terminal(self) -> bool:
        """Whether the phase is final."""
        return self in ACTION_TERMINAL


class RunPhase(enum.StrEnum):
    """Where a run is in its life; the last five are terminal."""

    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"
    STOPPED = "STOPPED"
    CRASHED = "CRASHED"

    @property
    def terminal(self) -> bool:
        """Whether the phase is final."""
        return self in RUN_TERMINAL


class AbortCause(enum.StrEnum):
    """Why an action was stopped by cancellation."""

    ROOT_EXIT = "root_exit"
    """The run's root exited while the action was in progress."""
    CANCELLED = "cancelled"
    """Workflow code cancelled its asyncio task (`t.cancel()`, a timeout, `wait_for`)."""
    EXTERNAL = "external"
    """An operator's abort named it, directly or through its group."""
    ANCESTOR = "ancestor"
    """An ancestor was cancelled, aborted, timed out or marked failed."""
    STOP = "stop"
    """The run was stopped and its in-progress actions abandoned."""
    SIGINT = "sigint"
    """Ctrl-C (or a KeyboardInterrupt/SystemExit raised in a body) aborted the run."""
    MARK_FAILED = "mark_failed"
    """An operator marked the action as failed (its phase is `FAILED`)."""
    TIMEOUT = "timeout"
    """Its `timeout` passed (its phase is `FAILED`)."""
    SIGNAL = "signal"
    """SIGTERM or SIGHUP reached the runner (the reason names the signal)."""
    CRASHED = "crashed"
    """Its runner found the run recorded `CRASHED` (gone, seen from another host): stopped."""
    ACTION_LIMIT = "action_limit"
    """The run reached its `max_actions` (the root's phase is `FAILED`)."""


ACTION_TERMINAL = frozenset(
    {
        ActionPhase.SUCCEEDED,
        ActionPhase.FAILED,
        ActionPhase.ABORTED,
        ActionPhase.ABANDONED,
        ActionPhase.CRASHED,
    }
)
RUN_TERMINAL = frozenset(
    {RunPhase.SUCCEEDED, RunPhase.FAILED, RunPhase.ABORTED, RunPhase.STOPPED, RunPhase.CRASHED}
)

_A = ActionPhase
# Every legal move of an action; a terminal phase has none, so it never changes.
_ACTION_TRANSITIONS: dict[ActionPhase, frozenset[ActionPhase]] = {
    _A.QUEUED: frozenset({_A.RUNNING, _A.STOPPING, *ACTION_TERMINAL}),
    _A.RUNNING: frozenset({_A.RUNNING, _A.STOPPING, *ACTION_TERMINAL}),
    _A.STOPPING: frozenset(ACTION_TERMINAL),
    **{phase: frozenset() for phase in ACTION_TERMINAL},
}

_R = RunPhase
_RUN_TRANSITIONS: dict[RunPhase, frozenset[RunPhase]] = {
    _R.RUNNING: frozenset({_R.STOPPING, *RUN_TERMINAL}),
    _R.STOPPING: frozenset({_R.STOPPED, _R.CRASHED}),
    **{phase: frozenset() for phase in RUN_TERMINAL},
}


# The same table keyed by value, with tuples: on the per-action path this avoids
# Enum.__hash__, which is Python code on 3.11 (`in` on a tuple compares identity first).
_ACTION_NEXT = {old.value: tuple(allowed) for old, allowed in _ACTION_TRANSITIONS.items()}


def check_action_transition(old: ActionPhase, new: ActionPhase) -> None:
    """Raise `ValueError` unless an action may move from `old` to `new`."""
    if new not in _ACTION_NEXT[old._value_]:
        raise ValueError(f"illegal action transition {old.value} -> {new.value}")


def check_run_transition(old: RunPhase, new: RunPhase) -> None:
    """Raise `ValueError` unless a run may move from `old` to `new`."""
    if new is not old and new not in _RUN_TRANSITIONS[old]:
        raise ValueError(f"illegal run transition {old.value} -> {new.value}")
