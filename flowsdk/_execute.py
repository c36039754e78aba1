"""The two coroutines of every action: the caller's handle and the action's own task.

Every action runs its body in an asyncio task of its own (the *action task*,
`run_action`), created here. What a caller awaits is a thin *handle*
coroutine (`action_handle`) that starts the action on its first step and then
waits on a plain future that the action resolves when it ends. Two
consequences shape the runtime:

- The runtime only ever cancels action tasks it owns, never a caller's task,
  so an abort never leaks into a parent's `cancelling()` count.
- No task awaits another task directly through the SDK, so cancelling an
  action never recurses through an await chain: teardown of a depth-2,000
  tree is a flat loop.
"""

from __future__ import annotations

import asyncio
import time
import types
from asyncio import CancelledError
from collections.abc import Generator
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any

from flowsdk._action import ActionState, Request, current
from flowsdk._attempts import backoff, held_back, retry, retry_after_timeout, start_timer
from flowsdk._describe import safe_str
from flowsdk._group import group_label
from flowsdk._limit import over_limit
from flowsdk._outcome import absorbs, outcome
from flowsdk._payload import IMMUTABLE as _IMMUTABLE
from flowsdk._payload import decode_inputs
from flowsdk._phases import AbortCause, ActionPhase
from flowsdk._recording import ACTION_ROWS
from flowsdk.errors import NotInRunError
from flowsdk.executors import LOCAL

if TYPE_CHECKING:
    from flowsdk._options import TaskSpec
    from flowsdk._runtime import Runtime

__all__ = [
    "HANDLE_CODE",
    "OWN_CODE",
    "action_handle",
    "hosted_wait",
    "note_unobserved",
    "run_action",
    "spawn",
    "start_child",
]

SUCCEEDED, FAILED, RUNNING = ActionPhase.SUCCEEDED, ActionPhase.FAILED, ActionPhase.RUNNING
QUEUED = ActionPhase.QUEUED
ANCESTOR = AbortCause.ANCESTOR
TIMEOUT = AbortCause.TIMEOUT  # a constant: an Enum member read from its class is slow on 3.11
# Requests that do not stop the calls below them (`stopped_above`): a collateral one (its
# origin is above it) and a task's own timeout.
_NOT_OPERATORS = (ANCESTOR, TIMEOUT)
_Task = asyncio.Task
_Future = asyncio.Future
_new = object.__new__
_init = ActionState.__init__
# asyncio.current_task, without its Python frame on 3.11 (the table it reads).
_current_task = getattr(asyncio.tasks, "_current_tasks", {}).get or asyncio.current_task
_time = time.time
_running_loop = asyncio._get_running_loop
_TERMINAL = tuple(p for p in ActionPhase if p.terminal)  # a tuple: `in` compares identity first
_MISSING: Any = object()
# Bound once: on 3.11 a method looked up on a C object at the call site is a
# generic attribute lookup and a new bound method every time.
_enter = current.set
_all_immutable = _IMMUTABLE.issuperset


async def action_handle(
    runtime: Runtime,
    parent: ActionState,
    task: TaskSpec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: str,
    inputs: bytes,
    recorded: bytes | None,
) -> Any:
    """Start one child action and return (or raise) what its parent should see.

    This is the coroutine `task(...)` returns inside a run. `Task` copies it
    under the user's function name. Cancelled while waiting (`t.cancel()`, a
    parent's `asyncio.timeout`, teardown), it cancels the action (a message
    given to `t.cancel(msg)` becomes the abort's reason), waits for the
    action's cleanup, then re-raises `CancelledError`; a second cancel
    interrupts that cleanup, as it would in asyncio. In a task of its own,
    the cancel goes to the action at once, by the future this coroutine
    waits on (`ActionState.__call__`); awaited in its parent's body, on this
    coroutine's next step. With a `recorded` output (a retried run's history,
    or the cache) the body does not run: the action is recorded as replayed.
    """
    direct = gathering[0]
    if direct is not None:
        # The first step, run by the task factory for `gather`: no task of its own.
        return direct(runtime, parent, task, args, kwargs, key, inputs, recorded)
    if _running_loop() is not runtime.loop:
        raise elsewhere(runtime, task)  # nothing started: the call is refused where awaited
    rec = runtime.log.streaming
    if rec is not None and rec.congested():
        await rec.relieved()  # backpressure: the store is far behind this run
    if recorded is None and task.options.cache and not task.options.cache_override:
        recorded = await runtime.cache_get(task, inputs)
    if recorded is not None:
        return runtime.replay(parent, task, key, inputs, recorded)
    host: Any = _current_task(runtime.loop)
    hosted = host is not parent.atask
    tracker = runtime.tracker
    # In a task of its own, the context made for that task (`TaskTracker.contexts`).
    context = tracker.contexts.pop(host, None) if hosted and tracker is not None else None
    del host
    action = start_child(runtime, parent, task, args, kwargs, key, inputs, context)
    done = action.done
    assert done is not None
    if hosted:
        # A task of its own (create_task, gather...): its cancel cancels the
        # action at once (`ActionState.__call__`).
        done.cancel = action  # type: ignore[method-assign]
    if action.req is not None:
        # Called below an operator's request (`stopped_above`): the action ends at its
        # first step, its body never called. A cancel the caller has pending (the abort
        # that arrived in this step) lands at this await, as it would at any other, and
        # only once; otherwise the caller gets the action's outcome below.
        try:
            await asyncio.sleep(0)
        except CancelledError:
            action.done = action.context = None
            raise
    try:
        await done
    except CancelledError as exc:
        # What leaves this frame keeps it (and its locals) in a traceback, and the
        # caller's task keeps what leaves it: no local may lead back to that task,
        # nor to an exception caught here, or the action waits for the collector.
        reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
        del exc
        # Whether the cancel reached the action: passed on below, or (a task of its
        # own) by `ActionState.__call__`, which notes it on the future.
        passed = hasattr(done, "asked")
        try:
            if action.phase not in _TERMINAL and not hosted:
                passed = True
                # Awaited in its parent's body: pass the cancel on, wait for the end. A
                # later cancel interrupts the cleanup this one began, as in asyncio, or,
                # under another cause, stops the wait (`Delivery.from_caller_again`).
                runtime.cancel_from_caller(action, reason)
                while action.phase not in _TERMINAL:
                    action.done = runtime.loop.create_future()
                    try:
                        await action.done
                    except CancelledError:
                        if not runtime.cancel_again_from_caller(action):
                            raise
        finally:
            context = action.context
            if context is not None and len(context) > 1:  # more than the SDK's own `current`
                adopt_context(action)
            action.done = action.context = None
        phase = action.phase
        if not passed:
            # The action had ended before the cancel came, in the same loop step: the
            # cancel is the caller's own and stands, as for a coroutine that returned
            # just before it: the caller gets the outcome, and `CancelledError` at its
            # next await (its task's count of cancels unchanged).
            caller: Any = _current_task(runtime.loop)
            caller.cancel(reason)
            caller.uncancel()
        if phase is SUCCEEDED:
            # As in asyncio: the child absorbed the cancel and returned, so the
            # awaiter gets its value.
            return action.value
        if phase is FAILED:
            # Its cleanup raised: as in asyncio, the awaiter gets that error, not
            # CancelledError, even while it is being cancelled itself.
            note_failure_host(runtime, action)
            return outcome(action)
        raise
    context = action.context
    if context is not None and len(context) > 1:  # more than the SDK's own `current`
        adopt_context(action)
    # The action has ended and its awaiter is back: its future and context
    # are not needed any more, nor, once handed over, what it returned or
    # raised (a long run keeps only its records, not every value and traceback).
    action.done = action.context = None
    if action.phase is SUCCEEDED:
        value = action.value
        action.value = None
        return value
    return failure(runtime, action)


@types.coroutine
def _primed() -> Generator[None, None, None]:
    """Suspend once: where the task factory leaves a call's waiter before its task exists."""
    yield


async def hosted_wait(runtime: Runtime, action: ActionState) -> Any:
    """The rest of a call's handle in a task of its own, once the task factory started its action.

    `create_task`, a `TaskGroup`, `ensure_future`...: the run's task factory runs
    the handle's first step itself when it makes the task (`_gather.start_direct`),
    so the body starts on the loop's next step, as the coroutine would in asyncio,
    and the task runs this, `action_handle`'s course for a task of its own, in the
    context made for it, which is the body's own (nothing to adopt). The factory
    runs it to `_primed` first, and the task's first step comes before the body's:
    a cancel of the task before that step lands there and ends the action
    unstarted, as asyncio never starts a coroutine whose task was cancelled before
    its first step.
    """
    done = action.done
    assert done is not None
    waiting = False
    try:
        await _primed()
        if action.atask is None and action.phase is QUEUED:
            # Started inside `create_task` by a factory of the user's (eager): the body's
            # task is not made yet (`_gather.start_direct`), and starts now, as eagerly.
            make: Any = runtime.tracker.previous  # type: ignore[union-attr]
            started(action, make(runtime.loop, run_action(runtime, action), context=action.context))
            del make
        if action.req is not None:
            await asyncio.sleep(0)  # called below an operator's request: as in `action_handle`
        waiting = True
        await done
    except CancelledError as exc:
        # As in `action_handle`: no local may lead back to the task or to `exc`.
        reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
        del exc
        if not waiting:
            # Cancelled before it waited: the action is still queued, its body unstarted,
            # and never starts (`Delivery.deliver`), or (called below an operator's
            # request) ends at its first step.
            action(reason)
            action.done = action.context = None
            raise
        action.done = action.context = None
        phase = action.phase
        if not hasattr(done, "asked"):
            # The action had ended before the cancel came: the caller's own, it stands.
            caller: Any = _current_task(runtime.loop)
            caller.cancel(reason)
            caller.uncancel()
        if phase is SUCCEEDED:
            return action.value  # the body absorbed the cancel and returned
        if phase is FAILED:
            note_failure_host(runtime, action)
            return outcome(action)  # its cleanup raised
        raise
    action.done = action.context = None
    if action.phase is SUCCEEDED:
        value = action.value
        action.value = None
        return value
    return failure(runtime, action)


def failure(runtime: Runtime, action: ActionState) -> Any:
    """Raise what the awaiter of an action that ended unsuccessfully gets (`outcome`).

    Once handed over, the run keeps only its record of the error, not the error.
    """
    note_failure_host(runtime, action)
    try:
        return outcome(action)
    finally:
        action.exc = None


def elsewhere(runtime: Runtime, task: TaskSpec) -> NotInRunError:
    """The error for a call made in a run and awaited on another event loop (a thread's)."""
    return NotInRunError(
        f"task {task.name!r} was called in run {runtime.name!r} but awaited on another event "
        "loop (asyncio.run in a worker thread?): its action can only start on the run's loop. "
        "Await the call in the run's own code, or call the task in that thread (it then runs "
        "as a plain coroutine, with no action)"
    )


def adopt_context(action: ActionState) -> None:
    """Make the body's context-variable writes visible in the awaiter's context.

    As in asyncio, where a coroutine runs in the context of the task awaiting
    it (or the `context=` given to `create_task`): what the body set is what
    the caller's context holds afterwards. The SDK's own `current` stays the
    caller's. Cheap: a context holds a handful of variables.
    """
    context = action.context
    if context is None or len(context) < 2:  # only the SDK's own `current`: nothing to copy
        return
    for var, value in context.items():
        if var is not current and var.get(_MISSING) is not value:
            var.set(value)


def start_child(
    runtime: Runtime,
    parent: ActionState,
    task: TaskSpec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: str,
    inputs: bytes,
    context: Context | None,
    done: asyncio.Future[Any] | None = None,
    later: bool = False,
) -> ActionState:
    """Create a child action of `parent`, record it QUEUED and create its task.

    The per-call path, in one function: what `Runtime._new` and `spawn` do,
    without their calls (the root and replayed actions go through those).
    The body runs in `context` if given: the context of the task of its own
    made for the call (`create_task`, `gather`...) that asyncio gives a copy
    of the caller's context; the body's writes land in it, as they would in
    asyncio, with no second copy to make and adopt. Otherwise in a copy of the
    current context, which the awaiter adopts. The action's end resolves a new
    future, or settles `done`, the future `gather` holds for the call (`direct`).
    With `later`, the caller makes the action's task (after the task awaiting it).
    """
    if runtime.closed:
        # The root exited between the call and this first step: the action
        # never starts, as if it had been cancelled before its first step.
        raise CancelledError
    seq = runtime.started
    limit = runtime.max_actions
    if limit is not None and seq >= limit:
        raise over_limit(runtime, task, parent)  # `max_actions`: the run fails
    runtime.started = seq + 1
    # Allocated, then initialised by a plain call: calling the class adds, on 3.11,
    # `type.__call__` and `slot_tp_init`, 350 instructions per action.
    action = _new(ActionState)
    _init(action, runtime, seq, parent, task, args, kwargs, key, group_label.get())
    action.inputs = inputs
    name = action.name
    runtime.actions[seq] = action
    runtime.live[name] = action
    log = runtime.log
    action.queued_seq = number = log.number()
    streaming = log.streaming
    if streaming is not None:
        streaming.routine(number, action.started_at, name, "QUEUED")
        streaming.changed(action, ACTION_ROWS)
    loop = runtime.loop
    if done is None:
        # A plain asyncio future, awaited only by the handle: `loop.create_future`
        # would add a Python frame to every call.
        action.done = _Future(loop=loop)
    else:
        action.done = done
        action.direct = True  # what `gather` holds: the action's end settles it
    if parent.req is not None:
        stopped_above(action)  # before its task exists: an eager factory would start it
    if context is None:
        context = copy_context()  # the copy asyncio would make: the awaiter adopts its writes
    action.context = context
    if not later:
        tracker = runtime.tracker
        if tracker is None:
            started(action, loop.create_task(run_action(runtime, action), context=context))
        elif tracker.previous is None:
            action.atask = _Task(run_action(runtime, action), loop=loop, context=context)
        else:  # the user's factory makes it, and may start the body at once (eager),
            # whose calls are its own, not those of a `gather` this call may be under
            gathering[0] = gathering[1] = None
            started(action, tracker.previous(loop, run_action(runtime, action), context=context))
    return action


def stopped_above(action: ActionState) -> None:
    """Give an action called below an operator's request that request's `ancestor` one.

    No body starts once an abort is recorded for it or an ancestor (SCENARIOS §3,
    3b): a call made by a body below one, in the step the request arrived in or in
    a cleanup, is recorded and ended by `run_action` at its first step (cause
    `ancestor`), its body never called. So it is for every request an operator or
    the run's end makes (abort, mark-failed, a signal). Workflow code's own
    cancellation (`Request.native`) and a task's `timeout` are not such requests: as
    in asyncio, their cleanup may call more work, and it runs, unless an operator's
    request stands above them.
    """
    above = action.parent
    while above is not None:
        req = above.req
        if req is not None and not req.native and req.cause not in _NOT_OPERATORS:
            action.req = Request(ANCESTOR, None, None)
            return
        above = above.parent


# While the run's task factory runs the first step of a call's handle for `gather`
# or a task of its own (`_gather.start_gathered`), what the handle calls instead of
# its own course, and the context made for the task of its own. A list, so that the
# other module sets it at the cost of a list item.
gathering: list[Any] = [None, None]


def spawn(runtime: Runtime, action: ActionState) -> ActionState:
    """Create the action's task (its body starts on the loop's next step)."""
    loop = runtime.loop
    action.done = loop.create_future()
    # The copy asyncio would make, kept so that the awaiter can adopt the body's writes.
    action.context = context = copy_context()
    tracker = runtime.tracker
    if tracker is not None and tracker.previous is None:
        # Our own task: skip the tracking factory (it would only skip it).
        action.atask = asyncio.Task(run_action(runtime, action), loop=loop, context=context)
    else:
        started(action, loop.create_task(run_action(runtime, action), context=context))
    return action


def started(action: ActionState, task: asyncio.Task[None]) -> None:
    """Keep the task a factory of the user's made for the action, unless it has ended.

    A factory that starts tasks eagerly (`asyncio.eager_task_factory`, Python
    3.12+) runs the body's first step inside `create_task`: `run_action` took its
    task then (`current_task`), and a body that returned in that step has ended
    and let it go already.
    """
    if not task.done():
        action.atask = task


async def run_action(runtime: Runtime, action: ActionState) -> None:
    """Run an action's body, with retries and timeout; record how it ended.

    This is the action task's coroutine. The body is called through the
    task's executor, the one place a body is called. It never raises an
    `Exception`: every outcome is recorded on the action, so no task exception
    can go unretrieved.
    """
    _enter(action)
    if action.atask is None:  # started eagerly, inside `create_task` (`started`)
        action.atask = _current_task(runtime.loop)
    task = action.task
    fn = task.body
    options = task.options
    executor = options.runner
    if action.phase is QUEUED:
        if action.req is not None:
            # Called below an operator's request (`stopped_above`): never started.
            action.atask = None
            runtime.finish_cancelled(action)
            return
        log = runtime.log
        streaming = log.streaming
        at = _time()
        if streaming is not None and at > streaming.lease_until:
            try:
                at = await held_back(streaming)
            except CancelledError:
                action.atask = None  # cancelled before its body started, and recorded so
                raise
        # QUEUED -> RUNNING: legal by construction, recorded without the table check.
        action.phase = RUNNING
        action.running_at = at
        action.running_seq = number = log.number()
        if streaming is not None:
            streaming.routine(number, at, action.name, "RUNNING")
            streaming.changed(action, ACTION_ROWS)
    else:
        runtime.set_phase(action, RUNNING)
    try:
        while True:
            # Each attempt gets a fresh snapshot: an attempt that mutated its
            # arguments does not change what the next one receives.
            args = action.args
            kwargs = action.kwargs
            if kwargs or (args and not _all_immutable(map(type, args))):
                assert action.inputs is not None
                args, kwargs = decode_inputs(task, args, kwargs, action.inputs)
            timer = None
            if options.timed:
                timer = start_timer(runtime, action)
            try:
                if executor is LOCAL:
                    value = await fn(*args, **kwargs)  # the local executor's call, inlined
                else:
                    value = await executor.call(fn, args, kwargs)
            except CancelledError:
                if timer is not None:
                    timer.cancel()
                req = action.req
                timed_out = req is not None and req.cause is TIMEOUT
                if timed_out and retry_after_timeout(runtime, action):
                    if await backoff(runtime, action):
                        continue
                    return
                runtime.finish_cancelled(action)
                return
            except GeneratorExit:
                raise
            except BaseException as exc:
                if timer is not None:
                    timer.cancel()
                # Drop this frame from the traceback: the user sees their body's
                # frames, and the exception does not keep this frame (and so the
                # action) alive in a reference cycle.
                tb = exc.__traceback__
                if tb is not None and tb.tb_frame.f_code is _RUN_ACTION_CODE:
                    exc.__traceback__ = tb.tb_next
                del tb  # its first entry is this frame: kept here, a cycle through the action
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    runtime.finish_base_exception(action, exc)
                    return
                if action.req is None and retry(runtime, action, exc):
                    if await backoff(runtime, action):
                        continue
                    return
                runtime.finish_failed(action, exc)
                return
            if timer is not None:
                timer.cancel()
            req = action.req
            if req is None:
                if action.atask._must_cancel:  # type: ignore[union-attr]
                    # The body cancelled its own task and returned at once: as in
                    # asyncio, that task ends cancelled, not with the value. (A
                    # cancel requested and not delivered yet: asyncio's own flag,
                    # as no public API tells it from one the body handled.)
                    runtime.finish_cancelled(action)
                else:
                    runtime.finish_succeeded(action, value)
            elif absorbs(req):
                runtime.finish_absorbed(action, value)
            else:
                runtime.finish_cancelled(action)
            return
    except GeneratorExit:
        raise  # the coroutine is being closed (a zombie at the end of the run)
    except BaseException as exc:
        # The runtime's own bookkeeping failed (a bug, or an exception such as a
        # test harness's alarm landing in it): record the action CRASHED so that
        # nothing waits for it forever, then let a BaseException go on.
        runtime.crash(action, exc)
        if not isinstance(exc, Exception):
            raise
    finally:
        # The task is ending: the action no longer refers to it, so a finished
        # action is freed by reference counting (task, coroutine and all).
        action.atask = None
        if runtime.started >= runtime.forget_from and action.phase in _TERMINAL:
            runtime.forget(action)  # the store has its record, or the log


_RUN_ACTION_CODE = run_action.__code__
OWN_CODE = frozenset({run_action.__code__, action_handle.__code__, hosted_wait.__code__})
"""The code of the SDK's own coroutines: tasks running them are actions, not plain tasks."""
HANDLE_CODE = action_handle.__code__
"""The code of a call's handle (`TaskTracker` makes the context of a task running one)."""


def note_failure_host(runtime: Runtime, action: ActionState) -> None:
    """Remember the caller's task if it exists only to await `action`.

    Such a task (`asyncio.create_task(child())`) ends with the action's
    error. If workflow code never looks at it, `Runtime.report_unobserved`
    names the failure at the end of the run instead of asyncio's "Task
    exception was never retrieved" at garbage collection.
    """
    host = _current_task(runtime.loop)
    parent = action.parent
    if host is None or parent is None or host is parent.atask:
        return
    code = getattr(host.get_coro(), "cr_code", None)
    if code is action_handle.__code__ or code is hosted_wait.__code__:
        runtime.failure_hosts.append(host)


def note_unobserved(runtime: Runtime) -> None:
    """Log each failed child whose error workflow code never retrieved."""
    hosts, runtime.failure_hosts = runtime.failure_hosts, []
    for host in hosts:
        if host.done() and not host.cancelled() and getattr(host, "_log_traceback", False):
            host._log_traceback = False
            exc = host.exception()
            runtime.warn(
                None,
                f"an unobserved child failed: {type(exc).__name__}: {safe_str(exc) if exc else ''}",
            )
