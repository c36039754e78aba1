"""flowsdk: structured-concurrency workflows for asyncio.

Decorate `async def` functions with `@env.task`; calling a task inside a run
starts a child action bound to the lifetime of the run's root action.
Importing flowsdk opens no store, starts no thread and installs no hook.
"""

from flowsdk import errors
from flowsdk._client import Client
from flowsdk._group import group
from flowsdk._info import current_action
from flowsdk._phases import AbortCause, ActionPhase, RunPhase
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
    MarkFailedRequest,
    Outcome,
    PruneReport,
    Role,
    RunRecord,
    StopInfo,
    StopRequest,
)
from flowsdk._result import Run
from flowsdk._run import RunHandle, run, run_async, start
from flowsdk._task import Task, TaskEnvironment

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
    "MarkFailedRequest",
    "Outcome",
    "PruneReport",
    "Role",
    "Run",
    "RunHandle",
    "RunPhase",
    "RunRecord",
    "StopInfo",
    "StopRequest",
    "Task",
    "TaskEnvironment",
    "current_action",
    "errors",
    "group",
    "run",
    "run_async",
    "start",
]

__version__ = "0.1.0"
