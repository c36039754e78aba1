"""The driver's end of what remote bodies send: progress reports (and where they go).

This module imports no Ray, so the part of flowsdk that implements
`flowsdk.report` can connect to it without importing Ray.

A body running on Ray that calls `flowsdk.report(value, step=..., name=...)`
goes through `flowsdk.executors._ray_worker.report_from_worker` on the
worker; the report travels to the driver in the call's next turn, and the
driver calls `deliver_remote_report(action, value, step, name)` in the
action's own task and context. Once that returns, the worker's `await`
returns. What it does is the sink set with `set_report_sink`: flowsdk's
report module sets its own delivery function (`deliver_report`) there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from flowsdk.errors import InvalidStateError

if TYPE_CHECKING:
    from flowsdk._action import ActionState

__all__ = ["ReportSink", "deliver_remote_report", "set_report_sink"]

ReportSink = Callable[["ActionState", float, "int | None", str], Awaitable[None]]
"""`sink(action, value, step, name)`: deliver one report of `action` (on the run's loop)."""

_sink: list[ReportSink | None] = [None]


def set_report_sink(sink: ReportSink | None) -> ReportSink | None:
    """Make `sink` receive the reports of remote bodies; return the previous sink."""
    previous = _sink[0]
    _sink[0] = sink
    return previous


async def deliver_remote_report(
    action: ActionState, value: float, step: int | None, name: str
) -> None:
    """Deliver a report sent by `action`'s body on a Ray worker (the driver-side hook).

    Raises:
        InvalidStateError: no sink is connected; the remote `report` call raises it.
    """
    sink = _sink[0]
    if sink is None:
        raise InvalidStateError(
            f"action {action.name} sent a progress report from Ray, but this flowsdk has no "
            "report sink connected (flowsdk.executors._remote.set_report_sink)"
        )
    await sink(action, value, step, name)
