"""Retrying a run: find its root task again and replay what already succeeded."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from flowsdk._history import History
from flowsdk._payload import recorded_call
from flowsdk._phases import ActionPhase, RunPhase
from flowsdk._run import Run, _Runner, run_sync
from flowsdk._task import Task
from flowsdk.errors import InvalidStateError
from flowsdk.store import Store, StoredRun

__all__ = ["SCRIPT_PATH", "import_task", "retry_run"]

SCRIPT_PATH = "__flowsdk_script__"

RETRYABLE = frozenset({RunPhase.FAILED, RunPhase.ABORTED, RunPhase.STOPPED, RunPhase.CRASHED})


def import_task(path: str) -> Task[..., Any]:
    """Return the task recorded as `module:qualname` (or `/path/script.py:qualname`).

    A script is imported under a module name of its own, so its
    `if __name__ == "__main__":` block does not run again.

    Raises:
        InvalidStateError: the module or the task cannot be found.
    """
    module_part, _, qualname = path.rpartition(":")
    if not module_part or not qualname:
        raise InvalidStateError(f"{path!r} does not name a task; write module:task")
    try:
        if module_part.endswith(".py") or os.sep in module_part:
            module = _import_file(module_part)
        else:
            module = importlib.import_module(module_part)
    except InvalidStateError:
        raise
    except Exception as exc:
        raise InvalidStateError(
            f"cannot import {module_part!r} to find task {qualname!r}: {exc}"
        ) from exc
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            hint = (
                " (tasks defined inside a function cannot be found again)"
                if "<locals>" in qualname
                else ""
            )
            raise InvalidStateError(f"{module_part!r} has no task {qualname!r}{hint}")
    if not isinstance(obj, Task):
        raise InvalidStateError(
            f"{path!r} is a {type(obj).__name__}, not a task declared with @env.task"
        )
    return obj


def _import_file(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise InvalidStateError(f"the script {path!r} recorded for this run no longer exists")
    name = "flowsdk_script_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InvalidStateError(f"cannot import the script {path!r}")
    module = importlib.util.module_from_spec(spec)
    # Where it came from: a run started from this module records the file again,
    # so a later retry (from any process) finds it the same way.
    module.__dict__[SCRIPT_PATH] = os.path.abspath(path)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


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


def retry_run(store: Store, name: str) -> Run[Any]:
    """Run the next attempt of a FAILED, ABORTED, STOPPED or CRASHED run, in the foreground.

    Raises:
        RunNotFoundError: no such run.
        InvalidStateError: the run succeeded, is still live, or its task cannot be imported.
    """
    stored = store.load_run(name)
    record = stored.record
    if record.phase not in RETRYABLE:
        why = (
            "it succeeded; there is nothing to retry"
            if record.phase is RunPhase.SUCCEEDED
            else "it is still live; stop or abort it first"
        )
        raise InvalidStateError(f"run {name!r} is {record.phase.value}: {why}")
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
    runner = _Runner(
        task,
        args,
        kwargs,
        name,
        store,
        owns_loop=True,
        attempt=record.attempt + 1,
        history=history_of(attempts),
    )
    return run_sync(runner)
