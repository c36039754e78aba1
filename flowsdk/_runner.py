"""Driving one run on an event loop: its root, its teardown, its end record, Ctrl-C.

`Runner` is what `flowsdk.run`, `run_async`, `start` and a retry share: it
records the new run, starts the root, waits for the teardown, records the
run's end and closes its recorder. `run_sync` drives it on a fresh loop of its
own, with the SIGINT handling of `flowsdk.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
from asyncio import CancelledError
from typing import TYPE_CHECKING, Any

from flowsdk import _logs as logs
from flowsdk._control import apply_request
from flowsdk._execute import HANDLE_CODE, OWN_CODE, note_unobserved, spawn
from flowsdk._fork import run_ended, run_started
from flowsdk._gather import start_gathered
from flowsdk._history import History
from flowsdk._limit import check_max_actions
from flowsdk._loader import task_path
from flowsdk._local import run_ended_here, run_started_here
from flowsdk._names import check_name, new_run_name
from flowsdk._payload import encode_inputs
from flowsdk._phases import AbortCause, ActionPhase
from flowsdk._recording import action_row
from flowsdk._records import Actor, action_records, event_from_row
from flowsdk._result import NO_VALUE, Run
from flowsdk._runtime import Runtime
from flowsdk.store import RunRecorder, Store, StoredRun, open_store

if TYPE_CHECKING:
    from flowsdk._task import Task

__all__ = ["Runner", "no_running_loop", "run_sync", "unpartial"]

logger = logging.getLogger("flowsdk")

# How long `flowsdk.run` waits, after the run has ended, for tasks that are
# still pending (abandoned actions, plain asyncio tasks) before naming them.
FINAL_DRAIN = 1.0


class Runner:
    """Drives one run on the current loop: the root, teardown and the end record."""

    def __init__(
        self,
        task: Task[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None,
        store: str | Store | None,
        *,
        owns_loop: bool,
        attempt: int = 1,
        history: History | None = None,
        max_actions: int | None = None,
    ) -> None:
        if not hasattr(task, "_handle"):
            raise TypeError(
                f"flowsdk runs a task declared with @env.task, not {task!r}; "
                "decorate the async function with a TaskEnvironment's .task"
            )
        self.max_actions = check_max_actions(max_actions)
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.inputs = encode_inputs(task, args, kwargs)
        self.attempt = attempt
        self.history = history
        self.name = check_name("run", name) if name is not None else new_run_name(task.fn.__name__)
        self.owns_loop = owns_loop
        self.store = open_store(store)
        # Opened here from a URL: what the run's reads open is closed here too.
        self.owns_store = store is None or isinstance(store, str)
        self.runtime: Runtime | None = None
        self.recorder: RunRecorder
        self.interrupts = 0

    async def begin(self) -> Runtime:
        """Record the new run and create its root action (its body starts on the next step).

        Raises:
            RunExistsError: the store has a run of that name.
            StoreError: the store cannot be used.
        """
        loop = asyncio.get_running_loop()
        runtime = Runtime(
            self.name,
            loop,
            task_path=task_path(self.task),
            workdir=os.getcwd(),
            attempt=self.attempt,
            history=self.history,
            max_actions=self.max_actions,
        )
        self.handler = functools.partial(apply_request, runtime)
        # The root exists before the run is recorded, so that the run's row, its root
        # and the root's recorded inputs are written in one transaction: a runner
        # killed right after never leaves a run that cannot be retried.
        root = runtime.new_root(self.task, self.args, self.kwargs, self.inputs)
        self.recorder = await self.store.open_run(
            runtime.run_record(),
            loop,
            self.handler,
            actions=[action_row(root)],
            events=runtime.log.rows([root]),
            on_lost=runtime.lost,
        )
        runtime.attach(self.recorder)
        run_started(loop)  # a child forked by a body exits before it runs anything more
        run_started_here(self.store, runtime.name, loop, self.handler)  # `Client` on this loop
        runtime.track_tasks(OWN_CODE, HANDLE_CODE, start_gathered)
        self.runtime = runtime
        logs.install()  # records emitted in bodies are kept with their actions
        spawn(runtime, root)
        return runtime

    async def finish(self) -> Run[Any]:
        """Wait for the root and the teardown, then record the run's end.

        Cancelled, it aborts the run (root cause `cancelled`), waits for the
        teardown, then re-raises `CancelledError`; cancelled again, it abandons
        the remaining actions.
        """
        runtime = self.runtime
        assert runtime is not None
        try:
            return await self._finish(runtime)
        finally:
            logs.uninstall()

    async def _finish(self, runtime: Runtime) -> Run[Any]:
        cancelled = 0
        while not runtime.drained.done():
            try:
                await asyncio.shield(runtime.drained)
            except CancelledError:
                cancelled += 1
                if cancelled == 1:
                    runtime.abort_run(
                        AbortCause.CANCELLED, reason="the task running the run was cancelled"
                    )
                else:
                    runtime.abandon_all(None)
        runtime.end()
        note_unobserved(runtime)
        tracker = runtime.tracker
        if tracker is not None:
            tracker.close()
            left = tracker.survivors()
            if left and not self.owns_loop:
                # flowsdk.run drains its own loop; under run_async they stay in the caller's.
                runtime.warn(
                    None,
                    "plain asyncio tasks started by the run were cancelled at its end but are "
                    "still running: " + ", ".join(_task_label(t) for t in left),
                )
        stored = _final_records(runtime, self.store, self.owns_store)
        self.recorder.finished(stored)
        root = runtime.root
        assert root is not None
        value = root.value if root.phase is ActionPhase.SUCCEEDED else NO_VALUE
        result: Run[Any] = Run(stored, value=value, exc=root.exc)
        try:
            await self.recorder.close()
        finally:
            run_ended(runtime.loop)
            run_ended_here(self.store, runtime.name)
        if cancelled:
            raise CancelledError
        return result

    def on_signal(self, signum: int) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: abort the run first; on the second, stop waiting."""
        runtime = self.runtime
        if runtime is None:
            return
        self.interrupts += 1
        name = signal.Signals(signum).name
        if self.interrupts > 1:
            runtime.abandon_all(None)
            return
        logger.warning(
            "run %s: %s; aborting (send it again to stop waiting for cleanup)",
            runtime.name,
            "interrupted" if signum == signal.SIGINT else f"received {name}",
        )
        if signum == signal.SIGINT:
            runtime.interrupt(
                KeyboardInterrupt(), reason="interrupted (SIGINT)", by=Actor.local().name
            )
        else:
            # The conventional exit status of a process ended by signal N is 128 + N;
            # raising SystemExit runs the user's own finally blocks on the way out.
            runtime.interrupt(SystemExit(128 + signum), cause=AbortCause.SIGNAL, reason=name)


def _final_records(runtime: Runtime, store: Store, owned: bool) -> StoredRun:
    """The records of a run that has ended (lists built when first read).

    A run that spilled (more than `KEEP_IN_MEMORY` actions, with a store that
    streams every change) has forgotten its finished actions and events: its
    records are read back from the store, once, when first asked for. A store
    the run opened itself (`owned`) is closed again once they are read, so that
    no connection is left for the garbage collector to close.
    """
    name = runtime.name
    if runtime.forgotten.spilled:
        attempt = runtime.attempt
        loaded: list[StoredRun] = []

        def load() -> StoredRun:
            if not loaded:
                try:
                    loaded.append(store.load_run(name, attempt))
                finally:
                    if owned:
                        store.close()
            return loaded[0]

        return StoredRun(
            runtime.run_record(),
            lambda: load().actions,
            lambda: load().events,
            lambda: load().payloads,
        )
    actions = runtime.actions.values()
    log = runtime.log
    return StoredRun(
        runtime.run_record(),
        lambda: action_records(name, log.action_rows(actions)),
        lambda: [event_from_row(e) for e in log.rows(actions)],
        lambda: log.payloads(actions),
    )


def no_running_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        "flowsdk.run() cannot be called from a running event loop; "
        "use 'await flowsdk.run_async(...)' (or 'await flowsdk.start(...)') instead"
    )


# Handled like Ctrl-C while `flowsdk.run` drives a run in the main thread (SPEC §3).
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_sync(runner: Runner) -> Run[Any]:
    """Drive `runner` on a fresh event loop, with the signal handling of `flowsdk.run`."""
    no_running_loop()
    loop = asyncio.new_event_loop()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: object) -> None:
            # In the main thread, between two bytecodes: hand the signal to the loop,
            # which wakes up for it (as `asyncio.Runner` does for Ctrl-C). Not
            # `loop.add_signal_handler`: it and its removal list the valid signals
            # each time, about 0.15 ms a call; six calls were half of a short run.
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(runner.on_signal, signum)

        for signum in HANDLED_SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
    try:
        result = loop.run_until_complete(_begin_and_finish(runner))
        _final_drain(loop, runner)
        if runner.runtime is not None:
            runner.runtime.release()
    finally:
        try:
            for number, handler in previous.items():
                signal.signal(number, handler if handler is not None else signal.SIG_DFL)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
    runtime = runner.runtime
    if runtime is not None and runtime.base_exc is not None:
        raise runtime.base_exc
    return result


async def _begin_and_finish(runner: Runner) -> Run[Any]:
    await runner.begin()
    return await runner.finish()


def _task_label(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return f"{task.get_name()} ({getattr(coro, '__qualname__', coro)})"


def _final_drain(loop: asyncio.AbstractEventLoop, runner: Runner) -> None:
    """Cancel what is still pending on our own loop, wait a bounded time, name survivors.

    What can be left: plain asyncio tasks that workflow code started and never
    awaited, the cleanup of abandoned actions, and bodies that ignored two
    cancellations (zombies, which are not cancelled a third time). None may
    keep the process from exiting. After a second Ctrl-C nothing is waited for.
    """
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not pending:
        return
    runtime = runner.runtime
    names: dict[asyncio.Task[Any], str] = {}
    zombies: set[asyncio.Task[Any]] = set()
    if runtime is not None:
        for action in runtime.actions.values():
            if action.atask is not None and not action.atask.done():
                names[action.atask] = f"action {action.name} ({action.task.name})"
        zombies = {a.atask for a in runtime.delivery.zombies if a.atask is not None}
    if runner.interrupts < 2:
        waiting = [t for t in pending if t not in zombies]
        for t in waiting:
            t.cancel()
        if waiting:
            loop.run_until_complete(asyncio.wait(waiting, timeout=FINAL_DRAIN))
    survivors = [t for t in pending if not t.done()]
    for t in survivors:
        logger.warning(
            "run %s: %s did not finish after cancellation; it is abandoned",
            runtime.name if runtime else "?",
            names.get(t) or _task_label(t),
        )
        # A body that also ignores GeneratorExit makes close() raise RuntimeError:
        # nothing more can be done for it.
        with contextlib.suppress(RuntimeError):
            t.get_coro().close()
        # The loop is closing with this task still pending; that is reported above.
        t._log_destroy_pending = False  # type: ignore[attr-defined]
    # A survivor may already have a step scheduled (it was cancelled): let it run
    # into its closed coroutine now, and retrieve the outcome, reported above.
    loop.run_until_complete(asyncio.sleep(0))
    for t in survivors:
        if t.done() and not t.cancelled():
            t.exception()


def unpartial(task: Any, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Split `functools.partial(task, *a, **kw)` into the task and its arguments."""
    kwargs: dict[str, Any] = {}
    while isinstance(task, functools.partial):
        args = (*task.args, *args)
        kwargs = {**task.keywords, **kwargs}
        task = task.func
    return task, args, kwargs
