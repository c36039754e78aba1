"""The worker side of the Ray executor: the async actor that runs one body at a time.

This module runs in a Ray worker process. It imports no Ray: the driver
(`_ray.py`) turns `BodyActor` into a Ray actor class. What crosses the
boundary is plain data: the body's recorded inputs and output as the
MessagePack bytes flowsdk records, the cancellation's message and request,
and the messages a body sends while it runs (log records, reports, the
expiry of its `timeout`).

Each call is answered in *turns*: `run` starts the body and returns at the
first of "the body ended" and "the body has something to say"; the driver
handles what it said (re-emits a log record, delivers a report) and asks
for the next turn with `resume`, carrying the acknowledgements. A body that
says nothing costs one actor call, like a bare one.

Cancellation is the driver's own `cancel` message, delivered in this
actor's event loop: it carries the request (so `str(CancelledError)` and
`current_action().abort` say why), and it is recorded when it comes before
the body has started, so that body never starts (the early-cancel race that
`ray.cancel` alone loses, ray-project/ray#52628).

A plain `def` body runs in a daemon thread of its own, as locally: the
actor's loop stays free to forward its log records and to take a cancel.
A thread cannot be interrupted, so a cancel ends the body's task at once
(outcome `"cancelled_running"`: the driver records the action
`cleanup_incomplete`) and the driver sends no other body to this actor;
`retire` ends the actor when the thread ends or the grace period is over,
whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import os
import pickle
import threading
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, cast

import msgspec

from flowsdk._action import ActionState, Request, current
from flowsdk._bodies import AT_REPORT
from flowsdk._payload import encode_output, recorded_call
from flowsdk._phases import AbortCause
from flowsdk.errors import InvalidStateError, SerializationError

__all__ = [
    "BodyActor",
    "Call",
    "CallInfo",
    "Reply",
    "refused_task",
    "report_from_worker",
]

CallInfo = tuple[str, str, str, int, str | None, str, float | None]
"""What the driver tells the worker of one attempt: run, action, task, attempt, group, key,
and the attempt's `timeout` in seconds (counted here, from the body's start)."""

Reply = tuple[str, Any]
"""One turn's answer: `("done", outcome)` or `("messages", [message, ...])`."""

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode

_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "flowsdk.ray_call", default=None
)

NESTED = (
    "a body running on Ray cannot start child actions in flowsdk v1: task {task!r} was called "
    "from {where}; nothing was submitted. Fan out from a driver-side parent instead (a task "
    "without executor='ray' that calls the Ray tasks)"
)


class RemoteTask:
    """What the worker knows of a task: enough to call its function, decode inputs, encode output.

    `fn` is the user's function as declared (`Task.fn`); a plain `def` gets
    its thread here (`_in_thread`), never a wrapper made in the driver.
    """

    def __init__(self, name: str, fn: Callable[..., Any], max_payload: int, log_level: int) -> None:
        self.name = name
        self.fn = fn
        self.body: Callable[..., Coroutine[Any, Any, Any]] = (
            fn if inspect.iscoroutinefunction(fn) else _in_thread(fn)
        )
        self.signature = inspect.signature(fn)
        self.options = _Limits(max_payload, log_level)
        self._shape: Any = None  # what the payload encoder learns of the signature


class _Limits:
    """The task's options a worker needs: `max_payload`, and `log_level` (what is kept)."""

    __slots__ = ("log_level", "max_payload")

    def __init__(self, max_payload: int, log_level: int) -> None:
        self.max_payload = max_payload
        self.log_level = log_level


class RemoteRun:
    """The run as a remote body sees it: named, and refusing task calls (SPEC §9)."""

    closed = False
    remote = True  # `flowsdk.report` sends reports to the driver
    max_actions: int | None = None  # a remote body calls no task

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.loop = loop

    def call(
        self, task: Any, parent: ActionState, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Coroutine[Any, Any, Any]:
        """Refuse a task call made in a remote body."""
        raise InvalidStateError(NESTED.format(task=task.name, where=f"{parent.name} on Ray"))

    def event(self, kind: Any, action: str | None = None, **fields: Any) -> None:
        """Events are recorded by the driver only."""

    def on_timeout(self, action: ActionState) -> None:
        """Timeouts are decided by the driver only."""

    def cancel_from_caller(self, action: ActionState, reason: str | None) -> None:
        """Cancellation is decided by the driver only (a remote body starts no actions)."""

    def cancel_again_from_caller(self, action: ActionState) -> bool:
        """Cancellation is decided by the driver only: no caller here waits on."""
        return False


class _RefusedTask:
    """A task object as a remote body sees it: calling it is refused (no nesting in v1)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        action = current.get()
        where = f"{action.name} on Ray" if action is not None else "a Ray worker"
        raise InvalidStateError(NESTED.format(task=self.name, where=where))

    def __repr__(self) -> str:
        return f"<flowsdk task {self.name} (on a Ray worker: calls are refused)>"


def refused_task(name: str) -> _RefusedTask:
    """Stand in for a flowsdk task referenced by a body shipped to a worker."""
    return _RefusedTask(name)


class Call:
    """One attempt of one body on this worker: its task, its outbox, its acknowledgements."""

    def __init__(self, loop: asyncio.AbstractEventLoop, action: ActionState) -> None:
        self.loop = loop
        self.action = action
        self.outbox: list[tuple[Any, ...]] = []
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[tuple[str, Any]] | None = None
        self.acks: dict[int, asyncio.Future[str | None]] = {}
        self.seq = 0
        self.timer: asyncio.TimerHandle | None = None
        self.thread = threading.get_ident()
        self.running: asyncio.Future[tuple[bool, Any]] | None = None
        """A plain `def` body's thread: its outcome, pending while the function runs."""

    def post(self, message: tuple[Any, ...]) -> None:
        """Queue a message for the driver (from the loop's thread or any other)."""
        if threading.get_ident() == self.thread:
            self.outbox.append(message)
            self._wake()
        else:
            self.loop.call_soon_threadsafe(self.post, message)

    async def turn(self) -> Reply:
        """Wait for the body to end or to have something to say; return that."""
        task = self.task
        assert task is not None
        if not self.outbox and not task.done():
            self.waiter = waiter = self.loop.create_future()
            task.add_done_callback(self._wake)
            try:
                await waiter
            finally:
                task.remove_done_callback(self._wake)
                self.waiter = None
        if self.outbox:
            messages, self.outbox = self.outbox, []
            return ("messages", messages)
        if self.timer is not None:
            self.timer.cancel()
        return ("done", task.result())

    def _wake(self, _: object = None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def thread_running(self) -> bool:
        """Say whether this call's plain `def` function is still running in its thread."""
        return self.running is not None and not self.running.done()

    def acknowledge(self, acks: list[tuple[int, str | None]]) -> None:
        """Resolve the reports the driver has delivered (with an error text if refused)."""
        for seq, error in acks:
            future = self.acks.pop(seq, None)
            if future is not None and not future.done():
                future.set_result(error)


class BodyActor:
    """Runs flowsdk task bodies, one at a time, as an async Ray actor (see the module doc)."""

    def __init__(self) -> None:
        self.tasks: dict[str, RemoteTask] = {}
        self.calls: dict[int, Call] = {}
        self.cancelled_early: dict[int, tuple[str, tuple[str, str | None, str | None, float]]] = {}
        self.left_running: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self.last = 0
        _forward_logging()

    async def ping(self) -> tuple[int, str]:
        """Answer with this worker's process id and actor id (the actor has started)."""
        import ray  # here, in a Ray worker, Ray is there

        return os.getpid(), ray.get_runtime_context().get_actor_id() or "?"

    async def run(self, call_id: int, packed: bytes) -> bytes:
        """Start one attempt of a body; answer its first turn (MessagePack both ways).

        `packed` holds the task's name, the recorded inputs, the `CallInfo`, the
        task's `max_payload` and `log_level` and, the first time this actor runs
        that task, its body (pickled). One bytes argument and one bytes answer:
        Ray passes them as they are, which costs less than several arguments of
        their own.
        """
        name, inputs, info, limits, body_data = _decode(packed)
        return _encode(await self._run(call_id, name, inputs, info, limits, body_data))

    async def _run(
        self,
        call_id: int,
        name: str,
        inputs: bytes,
        info: CallInfo,
        limits: tuple[int, int],
        body_data: bytes | None,
    ) -> Reply:
        self.last = max(self.last, call_id)
        if body_data is not None:
            max_payload, log_level = limits
            self.tasks[name] = RemoteTask(info[2], pickle.loads(body_data), max_payload, log_level)
            _capture_from(log_level)
        early = self.cancelled_early.pop(call_id, None)
        if early is not None:
            # The cancel came first: the body never starts.
            return ("done", ("cancelled", early[0]))
        loop = asyncio.get_running_loop()
        run, action_name, _, attempt, group, key, timeout = info
        task = self.tasks[name]
        action = ActionState(
            RemoteRun(run, loop), int(action_name[1:]), None, cast(Any, task), (), {}, key, group
        )
        action.name = action_name
        action.attempt = attempt
        call = Call(loop, action)
        self.calls[call_id] = call
        context = contextvars.copy_context()
        context.run(current.set, action)
        context.run(_call.set, call)
        call.task = loop.create_task(_attempt(task, inputs), context=context)
        if timeout is not None:
            call.timer = loop.call_later(timeout, call.post, ("timeout",))
        return await self._turn(call_id, call)

    async def resume(self, call_id: int, acks: list[tuple[int, str | None]]) -> bytes:
        """Acknowledge what the driver has handled; answer the body's next turn."""
        call = self.calls[call_id]
        call.acknowledge(acks)
        return _encode(await self._turn(call_id, call))

    async def _turn(self, call_id: int, call: Call) -> Reply:
        reply = await call.turn()
        if reply[0] == "done":
            self.calls.pop(call_id, None)
            if call.running is not None and not call.running.done():
                self.left_running[call_id] = call.running  # for `retire`
        return reply

    async def retire(self, call_id: int, within: float) -> None:
        """End this actor once the thread of `call_id`'s cancelled body ends, or in `within` s.

        The driver calls it after a `"cancelled_running"` outcome and sends
        no other body here: only the end of this process stops that thread.
        """
        running = self.left_running.pop(call_id, None)
        if running is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(running), within)
        from ray import actor  # here, in a Ray worker, Ray is there

        exit_actor: Callable[[], None] = actor.exit_actor  # untyped in Ray
        exit_actor()

    async def cancel(
        self, call_id: int, message: str, request: tuple[str, str | None, str | None, float]
    ) -> bool:
        """Cancel the body of `call_id` with `message`, or note it if it has not started yet."""
        call = self.calls.get(call_id)
        if call is None:
            if call_id > self.last:
                self.cancelled_early[call_id] = (message, request)
            return False
        action = call.action
        cause, reason, by, at = request
        req = Request(AbortCause(cause), reason, by)
        req.at = at
        action.req = req
        action.cancels += 1
        # A report the driver will not acknowledge (cancelled at it): a `def` body's
        # thread waiting there (`flowsdk.report_sync`) stops at it, as an async body does.
        for waiting in call.acks.values():
            waiting.cancel(message)
        task = call.task
        return task is not None and task.cancel(message)


async def _attempt(task: RemoteTask, inputs: bytes) -> tuple[str, Any]:
    """Run one attempt of a body; return its outcome as plain data (never raise).

    A `KeyboardInterrupt` or `SystemExit` is caught here too: leaving the
    task, it would stop the actor's event loop and the driver would never get
    an answer.
    """
    try:
        args, kwargs = recorded_call(cast(Any, task), inputs)
        value = await task.body(*args, **kwargs)
        return ("ok", encode_output(cast(Any, task), value))
    except asyncio.CancelledError as exc:
        message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
        call = _call.get()
        if call is not None and call.thread_running():
            return ("cancelled_running", message)
        return ("cancelled", message)
    except SerializationError as exc:
        return ("error", _error(exc))
    except BaseException as exc:
        return (
            "interrupt" if isinstance(exc, KeyboardInterrupt | SystemExit) else "error",
            _error(exc),
        )


def _in_thread(fn: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Return the body of a plain `def` task on a worker: `fn` in a daemon thread of its own.

    As locally (`flowsdk._execute_thread.in_thread`): the thread runs in a
    copy of the body's context (`current_action()`, log forwarding and
    `flowsdk.report_sync` work there), and a cancel ends the body at once while
    the thread runs on, unless it comes while the thread waits in
    `report_sync`: then the thread stops there, and the body ends with it. The
    thread's outcome is kept on the call (`Call.running`), so that the worker
    can tell the driver it still runs and `BodyActor.retire` can wait for it.
    """

    @functools.wraps(fn)
    async def body(*args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        # Resolved with a result, never an exception: once the body has been cancelled
        # nobody reads it, and asyncio would log an exception that was never retrieved.
        ended: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        context = contextvars.copy_context()

        def work() -> None:
            try:
                outcome: tuple[bool, Any] = (True, context.run(fn, *args, **kwargs))
            except BaseException as exc:  # handed to the loop, raised in the body's task
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # a closed loop: the actor is exiting
                loop.call_soon_threadsafe(ended.set_result, outcome)

        call = _call.get()
        if call is not None:
            call.running = ended
        thread = threading.Thread(target=work, name=f"flowsdk-{fn.__name__}", daemon=True)
        thread.start()
        try:
            ok, value = await asyncio.shield(ended)
        except asyncio.CancelledError:
            if ended.done() or thread.ident not in AT_REPORT:
                raise
            # Cancelled at its `flowsdk.report_sync`, as locally: the thread stops there,
            # and its end (its cleanup) is the body's (a second cancel stops the wait).
            ok, value = await asyncio.shield(ended)
        if ok:
            return value
        raise value

    return body


def _error(exc: BaseException) -> tuple[bytes | None, str, str, str, str]:
    """Describe an exception for the driver: pickled if it can be, else its type and message."""
    cls = type(exc)
    text = "".join(traceback.format_exception(exc))
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {cls.__name__}>"
    exc.__traceback__ = None  # the frames stay here; their text travels
    try:
        data: bytes | None = pickle.dumps(exc)
    except Exception:
        data = None
    return (data, cls.__module__, cls.__qualname__, message, text)


async def report_from_worker(value: float, step: int | None, name: str) -> None:
    """Send a progress report from a remote body to its driver and wait until it is delivered.

    The worker-side counterpart of `flowsdk.executors._remote.deliver_remote_report`:
    `flowsdk.report` called in a body running on Ray comes here. It returns once
    the driver has delivered the report (so a cancel decided on it lands at
    this `await`).

    Raises:
        InvalidStateError: called outside a body running on Ray, or the driver
            refused the report (its message says why).
    """
    call = _call.get()
    if call is None:
        raise InvalidStateError("report_from_worker() was called outside a body running on Ray")
    call.seq += 1
    future: asyncio.Future[str | None] = call.loop.create_future()
    call.acks[call.seq] = future
    call.post(("report", call.seq, value, step, name))
    error = await future
    if error is not None:
        raise InvalidStateError(error)


class _Forwarder(logging.Handler):
    """Sends the log records emitted inside a remote body to its driver."""

    def emit(self, record: logging.LogRecord) -> None:
        call = _call.get()
        if call is None or record.levelno < call.action.task.options.log_level:
            return  # not a body's, or below its task's `log_level`: the driver would drop it
        try:
            message = record.getMessage()
            exc_text = None
            if record.exc_info:
                exc_text = "".join(traceback.format_exception(*record.exc_info))
            elif record.exc_text:
                exc_text = record.exc_text
            fields = {
                "name": record.name,
                "msg": message,
                "args": None,
                "levelname": record.levelname,
                "levelno": record.levelno,
                "pathname": record.pathname,
                "filename": record.filename,
                "module": record.module,
                "lineno": record.lineno,
                "funcName": record.funcName,
                "created": record.created,
                "msecs": record.msecs,
                "exc_text": exc_text,
                "stack_info": record.stack_info,
                "threadName": record.threadName,
                "processName": "ray worker",
                "process": record.process,
            }
        except Exception:
            self.handleError(record)
            return
        call.post(("log", fields))


_installed = False


def _forward_logging() -> None:
    """Install the forwarder on the worker's root logger (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    root = logging.getLogger()
    root.addHandler(_Forwarder())
    # Records at INFO and above are what an action keeps by default (SPEC §2).
    _capture_from(logging.INFO)


def _capture_from(level: int) -> None:
    """Let records at `level` and above reach the forwarder: lower the root logger to it.

    A task's `log_level` (lower than INFO: `DEBUG`) lowers it when the task first
    runs on this worker, as declaring the task lowers the driver's. The worker
    runs only flowsdk bodies; its root logger is this module's to set.
    """
    root = logging.getLogger()
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
