"""Retrying a run in the foreground: find its root task again, replay what succeeded."""

from __future__ import annotations

from typing import Any

from flowsdk._history import History
from flowsdk._loader import import_task
from flowsdk._payload import recorded_call
from flowsdk._phases import ActionPhase, RunPhase
from flowsdk._result import Run
from flowsdk._runner import Runner, run_sync
from flowsdk.errors import InvalidStateError
from flowsdk.store import Store, StoredRun

__all__ = ["RETRYABLE", "check_retryable", "retry_run"]

RETRYABLE = frozenset({RunPhase.FAILED, RunPhase.ABORTED, RunPhase.STOPPED, RunPhase.CRASHED})


def history_of(attempts: list[StoredRun]) -> History:
    """Index the actions of every earlier attempt by call key.

    For each key the latest success wins, else the latest record: an action
    that succeeded in attempt 1 is replayed in attempt 3 even if attempt 2
    never reached it.
    """
    calls: dict[str, tuple[str, bytes | None, str, bytes | None]] = {}
    for stored in attempts:  # oldest first
        for record in stored.actions:
            inputs, output = stored.payloads.get(record.name, (None, None))
            known = calls.get(record.key)
            succeeded = record.phase is ActionPhase.SUCCEEDED and output is not None
            if known is None or succeeded or known[2] != ActionPhase.SUCCEEDED.value:
                calls[record.key] = (record.task, inputs, record.phase.value, output)
    return History(attempts[-1].record.name, calls)


def check_retryable(name: str, phase: RunPhase) -> None:
    """Raise `InvalidStateError` unless a run in `phase` may be retried."""
    if phase not in RETRYABLE:
        why = (
            "it succeeded; there is nothing to retry"
            if phase is RunPhase.SUCCEEDED
            else "it is still live; stop or abort it first"
        )
        raise InvalidStateError(f"run {name!r} is {phase.value}: {why}")


def retry_run(store: Store, name: str, max_actions: int | None = None) -> Run[Any]:
    """Run the next attempt of a FAILED, ABORTED, STOPPED or CRASHED run, in the foreground.

    `max_actions` limits the new attempt (replayed actions count); an earlier
    attempt's limit is not carried over.

    Raises:
        RunNotFoundError: no such run.
        InvalidStateError: the run succeeded, is still live, or its task cannot be imported.
    """
    stored = store.load_run(name)
    record = stored.record
    check_retryable(name, record.phase)
    task = import_task(record.task)
    root_inputs = (
        stored.payloads.get(stored.actions[0].name, (None, None))[0] if stored.actions else None
    )
    if root_inputs is None:
        raise InvalidStateError(
            f"run {name!r} has no recorded inputs for its root; it cannot be retried"
        )
    args, kwargs = recorded_call(task, root_inputs)
    attempts = [store.load_run(name, n) for n in range(1, record.attempt)] + [stored]
    runner = Runner(
        task,
        args,
        kwargs,
        name,
        store,
        owns_loop=True,
        attempt=record.attempt + 1,
        history=history_of(attempts),
        max_actions=max_actions,
    )
    return run_sync(runner)
