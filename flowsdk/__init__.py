"""flowsdk: structured-concurrency workflows for asyncio.

Decorate `async def` functions with `@env.task`; calling a task inside a run
starts a child action bound to the lifetime of the run's root action.
Importing flowsdk opens no store, starts no thread and installs no hook; what
runs a workflow or reads a store (`run`, `start`, `Run`, `Client`) and the
records are imported when first used, so that `import flowsdk` stays close to
`import asyncio` (declaring tasks loads no more).
"""

import importlib
import typing

from flowsdk import errors
from flowsdk._group import group
from flowsdk._info import current_action
from flowsdk._phases import AbortCause, ActionPhase, RunPhase
from flowsdk._progress import Report, follow, report, report_sync
from flowsdk._task import Task, TaskEnvironment

if typing.TYPE_CHECKING:
    from flowsdk._client import Client
    from flowsdk._records import (
        AbortInfo,
        AbortRequest,
        ActionInfo,
        ActionRecord,
        Actor,
        ControlResult,
        ErrorInfo,
        Event,
        EventKind,
        LogEntry,
        MarkFailedRequest,
        Outcome,
        Progress,
        PruneReport,
        Role,
        RunRecord,
        StopInfo,
        StopRequest,
    )
    from flowsdk._result import Run
    from flowsdk._run import RunHandle, run, run_async, start
    from flowsdk.store import QueuedRequest, StoredAction

__all__ = [
    "AbortCause",
    "AbortInfo",
    "AbortRequest",
    "ActionInfo",
    "ActionPhase",
    "ActionRecord",
    "Actor",
    "Client",
    "ControlResult",
    "ErrorInfo",
    "Event",
    "EventKind",
    "LogEntry",
    "MarkFailedRequest",
    "Outcome",
    "Progress",
    "PruneReport",
    "QueuedRequest",
    "Report",
    "Role",
    "Run",
    "RunHandle",
    "RunPhase",
    "RunRecord",
    "StopInfo",
    "StopRequest",
    "StoredAction",
    "Task",
    "TaskEnvironment",
    "current_action",
    "errors",
    "follow",
    "group",
    "report",
    "report_sync",
    "run",
    "run_async",
    "start",
]

__version__ = "0.1.0"

# Imported on first use (PEP 562): the runner, the stores, the control path and the
# records (msgspec Structs: msgspec costs about as much to import as asyncio does).
_LAZY = {
    "AbortInfo": "flowsdk._records",
    "AbortRequest": "flowsdk._records",
    "ActionInfo": "flowsdk._records",
    "ActionRecord": "flowsdk._records",
    "Actor": "flowsdk._records",
    "ControlResult": "flowsdk._records",
    "ErrorInfo": "flowsdk._records",
    "Event": "flowsdk._records",
    "EventKind": "flowsdk._records",
    "LogEntry": "flowsdk._records",
    "MarkFailedRequest": "flowsdk._records",
    "Outcome": "flowsdk._records",
    "Progress": "flowsdk._records",
    "PruneReport": "flowsdk._records",
    "Role": "flowsdk._records",
    "RunRecord": "flowsdk._records",
    "StopInfo": "flowsdk._records",
    "StopRequest": "flowsdk._records",
    "QueuedRequest": "flowsdk.store",
    "StoredAction": "flowsdk.store",
    "Client": "flowsdk._client",
    "Run": "flowsdk._result",
    "RunHandle": "flowsdk._run",
    "run": "flowsdk._run",
    "run_async": "flowsdk._run",
    "start": "flowsdk._run",
}


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flowsdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
