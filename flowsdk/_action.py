"""The live state of one action, and the request that stops it by cancellation.

`ActionState` is what the runtime mutates; records (`ActionRow`,
`ActionRecord`) are snapshots of it. `Request` says who asked for an action
to stop, why and when: it is set once per attempt, before the cancellation
is delivered, and decides the action's terminal phase (`_outcome`).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from flowsdk._phases import AbortCause, ActionPhase

if TYPE_CHECKING:
    from flowsdk._options import TaskSpec
    from flowsdk._records import AbortInfo, EventKind

__all__ = ["ActionState", "Ended", "Request", "RunContext", "current", "current_state"]


class RunContext(Protocol):
    """What an action knows of its run: enough for a task call made in its body."""

    name: str
    loop: asyncio.AbstractEventLoop
    closed: bool
    remote: bool  # true in a body on another host (Ray): `flowsdk.report` forwards its reports
    max_actions: int | None  # the run's limit on its actions (`_limit`)

    def call(
        self,
        task: TaskSpec,
        parent: ActionState,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Coroutine[Any, Any, Any]:
        """Return the awaitable of a child action (see `Runtime.call`)."""
        ...

    def event(
        self,
        kind: EventKind,
        action: str | None = None,
        *,
        phase: str | None = None,
        message: str | None = None,
    ) -> None:
        """Append an entry to the run's event log (an executor says where a body runs)."""
        ...

    def on_timeout(self, action: ActionState) -> None:
        """Cancel an attempt whose `timeout` passed (an executor that times attempts itself)."""
        ...

    def cancel_from_caller(self, action: ActionState, reason: str | None) -> None:
        """Cancel `action`: the task awaiting it was cancelled (`Delivery.from_caller`)."""
        ...

    def cancel_again_from_caller(self, action: ActionState) -> bool:
        """Cancelled again, say whether the caller waits on (`Delivery.from_caller_again`)."""
        ...


current: contextvars.ContextVar[ActionState | None] = contextvars.ContextVar(
    "flowsdk.action", default=None
)
"""The action whose body (or whose spawned plain task) is running in this context."""


def current_state() -> ActionState | None:
    """Return the action whose body (or whose spawned task) is running, if any."""
    return current.get()


class Request:
    """Who asked an action to stop by cancellation, why, and when.

    Never changed once made, so one request can stand for many actions (the
    descendants of an aborted action share their `ancestor` request).
    """

    __slots__ = ("at", "by", "cause", "native", "reason")

    def __init__(
        self,
        cause: AbortCause,
        reason: str | None,
        by: str | None,
        native: bool = False,
        at: float | None = None,
    ) -> None:
        self.cause = cause
        self.reason = reason
        self.by = by
        self.at = time.time() if at is None else at  # `at`: when an operator asked
        # Made by workflow code's own asyncio cancellation (`t.cancel()`, a
        # timeout, a cancel reaching the awaiter): a body may absorb it, as in
        # asyncio. Operators' and the runtime's requests are never absorbed.
        self.native = native

    def __repr__(self) -> str:
        return f"Request({self.cause.value!r}, {self.reason!r}, {self.by!r})"

    def info(self) -> AbortInfo:
        """Return the record of this request (what `abort` of a record holds)."""
        from datetime import UTC, datetime  # here: `import flowsdk` stays light

        from flowsdk._records import AbortInfo

        return AbortInfo(
            reason=self.reason,
            cause=self.cause,
            requested_by=self.by,
            requested_at=datetime.fromtimestamp(self.at, UTC),
        )

    def message(self) -> str:
        """Say why, for the `CancelledError` the body receives: cause, requester, reason."""
        text = _PLAIN[self.cause._value_]  # keyed by value: Enum.__hash__ is Python code on 3.11
        if self.by:
            text += f" by {self.by}"
        if self.reason:
            text += f": {self.reason}"
        return text


_WHAT = {
    AbortCause.ROOT_EXIT: "cancelled because the run's root exited (root_exit)",
    AbortCause.CANCELLED: "cancelled by workflow code (cancelled)",
    AbortCause.EXTERNAL: "aborted (external)",
    AbortCause.ANCESTOR: "cancelled because an ancestor was (ancestor)",
    AbortCause.STOP: "abandoned by a stop (stop)",
    AbortCause.SIGINT: "aborted by an interrupt (sigint)",
    AbortCause.MARK_FAILED: "marked as failed (mark_failed)",
    AbortCause.TIMEOUT: "cancelled: its timeout passed (timeout)",
    AbortCause.SIGNAL: "aborted by a signal to its runner (signal)",
    AbortCause.CRASHED: "stopped: its run was recorded CRASHED meanwhile (crashed)",
    AbortCause.ACTION_LIMIT: "failed: its run reached its limit of actions (action_limit)",
}
# Built once: cancelling 1,000 children by workflow code formats nothing.
_PLAIN = {cause.value: f"flowsdk: {_WHAT.get(cause, cause.value)}" for cause in AbortCause}


QUEUED = ActionPhase.QUEUED  # a constant: Enum member access is slow on Python 3.11
_time = time.time
_future_cancel = asyncio.Future.cancel


class Ended:
    """What the runtime still knows of a finished action it forgot: its name and phase."""

    __slots__ = ("name", "phase")

    cause = None
    req = None
    group = None

    def __init__(self, name: str, phase: ActionPhase) -> None:
        self.name = name
        self.phase = phase


class ActionState:
    """The live, mutable state of one action (records are snapshots of it)."""

    __slots__ = (
        "args",
        "atask",
        "attempt",
        "calls",
        "cancels",
        "cleanup_incomplete",
        "context",
        "deadline_at",
        "direct",
        "done",
        "ended_at",
        "ended_seq",
        "error",
        "exc",
        "group",
        "inputs",
        "key",
        "kwargs",
        "name",
        "output",
        "parent",
        "phase",
        "queued_seq",
        "replayed",
        "req",
        "running_at",
        "running_seq",
        "runtime",
        "seq",
        "started_at",
        "task",
        "timer",
        # Made on first use by `_progress.trace_of` (reports, log records): never set,
        # so an action that neither reports nor logs pays nothing for it.
        "trace",
        "value",
    )
    trace: Any  # a `_progress.Trace`, once the action has reported or logged

    def __init__(
        self,
        runtime: RunContext,
        seq: int,
        parent: ActionState | None,
        task: TaskSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str,
        group: str | None,
    ) -> None:
        self.runtime = runtime
        self.seq = seq
        self.name = f"a{seq}"
        self.parent = parent
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.key = key
        self.group = group
        self.phase = QUEUED
        self.attempt = 1
        self.started_at = _time()
        self.ended_at: float | None = None
        self.value: Any = None
        self.exc: BaseException | None = None
        self.error: tuple[str, str, str] | None = None
        self.req: Request | None = None
        self.atask: asyncio.Task[None] | None = None
        self.done: asyncio.Future[Any] | None = None
        # Whether `done` is what `gather` holds for the call (no handle, `settle`).
        self.direct = False
        self.timer: tuple[int, Callable[[ActionState], None]] | None = None
        self.cancels = 0
        self.calls = 0
        self.cleanup_incomplete = False
        # The context the body runs in (its writes are copied back to the awaiter's).
        self.context: contextvars.Context | None = None
        self.deadline_at: float | None = None  # loop time the `deadline` option passes at
        self.replayed = False
        self.inputs: bytes | None = None
        self.output: bytes | None = None
        # The event log's numbers of the action's routine transitions (QUEUED,
        # its first RUNNING, an ending with no request or message), when it had
        # them: the log keeps these here, not as entries (`RunLog.routine`).
        self.queued_seq: int | None = None
        self.running_seq: int | None = None
        self.running_at: float | None = None
        self.ended_seq: int | None = None

    def __call__(self, msg: object = None) -> bool:
        """Be `cancel` of the action's future, when a task of its own or `gather` waits on it.

        asyncio cancels a task by cancelling the future it waits on, and
        `gather` cancels the futures it holds. The first time, this future
        cancels the action instead, at once, and stays pending: the caller's
        cancellation stays pending too, and the caller wakes once the action
        has ended, with `CancelledError` (or the value of a body that absorbed
        it, or the error its cleanup raised), as from an `await` of the body in
        asyncio. (Woken first, a handle would only pass the cancel on: one loop
        step more.) A later cancel interrupts the cleanup the first one began
        and the caller waits on, as in asyncio; under another cause (an
        operator's abort) it stops the wait (`Delivery.from_caller_again`). One
        the body has not woken from the first yet is the same cancellation.

        It answers as the task in its place would: a future `gather` holds
        directly (`direct`) stands for the call's task, so `True` while the
        action runs; a handle's task, cancelled through this future, must
        keep its own cancellation pending, so `False` then.

        The action itself, not a bound method, is that `cancel`: an action
        whose caller is never cancelled pays nothing for it.
        """
        done = self.done
        if done is None or done.done():
            return False
        if not hasattr(done, "asked"):
            done.asked = msg  # type: ignore[attr-defined]  # beside `cancel`: nothing allocated
            self.runtime.cancel_from_caller(self, msg if isinstance(msg, str) else None)
            return self.direct
        if self.cancel_pending() or self.runtime.cancel_again_from_caller(self):
            return self.direct
        return _future_cancel(done, msg)

    def unreached(self) -> bool:
        """Whether no request has reached the body yet, so that a new one may take its place.

        Either none is set, or workflow code's own is still on its way down a chain
        of tasks (`Delivery.from_caller` delivers it on the loop's next step). An
        operator's request or the root's exit that comes first is then the one the
        body gets, and it cannot be absorbed.
        """
        req = self.req
        return req is None or (req.native and self.cancels == 0)

    def cancel_pending(self) -> bool:
        """Whether the body's task was cancelled and has not woken from it yet."""
        task = self.atask
        if task is None:
            return False
        # asyncio's own: the future the task waits on, and a cancel requested while it ran.
        waiter = task._fut_waiter  # type: ignore[attr-defined]
        return bool((waiter is not None and waiter.cancelled()) or task._must_cancel)  # type: ignore[attr-defined]

    @property
    def run(self) -> str:
        """The name of the action's run."""
        return self.runtime.name

    def __repr__(self) -> str:
        return f"<action {self.run}/{self.name} {self.task.name} {self.phase.value}>"

    @property
    def cause(self) -> AbortCause | None:
        """The cause of the request that stops this action, if any."""
        req = self.req
        return None if req is None else req.cause
