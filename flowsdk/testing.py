"""Helpers for testing workflows in your own pytest suite.

- `Gate`: a point inside task bodies where they wait until the test lets them
  through, so a test can act while they are known to be running.
- `start_and_control`: start a run, wait until a condition holds (bodies at a
  gate), apply an abort, stop or mark-failed to its `RunHandle`, and return the
  ended `Run` with what the control returned.
- `store_fixture`, `new_store`, `sqlite_url`: fresh stores, one per test, so one
  test can run against both `memory://` and SQLite.

Everything here uses only flowsdk's public API and the running event loop:
no sleeps, no threads. Importing this module opens no store, starts no thread
and does not import pytest (a dev dependency); `store_fixture` imports pytest
when it is called, so only suites that use it need pytest installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, TypeVarTuple, cast, get_args

import flowsdk
from flowsdk.errors import FlowError
from flowsdk.store import Store, open_store

if TYPE_CHECKING:
    import pytest

__all__ = [
    "Condition",
    "Gate",
    "STORE_KINDS",
    "StoreKind",
    "new_store",
    "sqlite_url",
    "start_and_control",
    "store_fixture",
]

R = TypeVar("R")
C = TypeVar("C")
Ts = TypeVarTuple("Ts")

StoreKind = Literal["memory", "sqlite"]
"""A kind of store `new_store` and `store_fixture` make."""

STORE_KINDS: tuple[StoreKind, ...] = get_args(StoreKind)
"""Every kind of store, in the order `store_fixture` uses by default."""


class Gate:
    """A point where task bodies wait until the test lets them through.

    A body calls `await gate.enter()`: that counts it as entered (running) and
    holds it until the test calls `release()` (one more body through, the one
    held longest first) or `release_all()` (every body, now and later). The
    test waits for bodies with `await gate.wait_running(n)`, which raises
    `TimeoutError` instead of hanging when they never come. The gate is built
    on futures of the running loop only: no sleeps, no threads; it can be made
    outside a loop and used by one loop at a time.

    Args:
        name: Shown in the repr and in error messages.
        timeout: Deadline of `wait_running`, in seconds, so that a test whose
            bodies never come fails with a message instead of hanging; `None`
            for none.

    Example:
        ```python
        gate = Gate("trial")

        @env.task
        async def trial() -> None:
            await gate.enter()  # running; held until released
        ```
    """

    def __init__(self, name: str = "gate", *, timeout: float | None = 10.0) -> None:
        self.name = name
        self.timeout = timeout
        self._entered = 0
        self._permits = 0
        self._open = False
        self._held: deque[asyncio.Future[None]] = deque()
        self._watchers: list[tuple[int, asyncio.Future[None]]] = []

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<Gate {self.name!r} {state}: {self._entered} entered, {self.waiting} held>"

    @property
    def entered(self) -> int:
        """How many bodies have called `enter()` in all, cancelled ones included."""
        return self._entered

    @property
    def waiting(self) -> int:
        """How many bodies are held at the gate now."""
        return sum(not waiter.done() for waiter in self._held)

    @property
    def is_open(self) -> bool:
        """Whether `release_all()` was called: bodies no longer wait."""
        return self._open

    async def enter(self) -> None:
        """Count this body as running, then wait until the gate lets it through.

        Returns at once, without yielding to the loop, if the gate is open or a
        `release()` is waiting to be used. Cancelled while held, the body gets
        `CancelledError` as from any await and leaves the gate; a release that
        reached it in the same loop step goes to the next body instead of
        being lost.
        """
        self._entered += 1
        self._notify_watchers()
        if self._open:
            return
        if self._permits:
            self._permits -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_one()
            raise
        finally:
            with contextlib.suppress(ValueError):  # release() already took it off
                self._held.remove(waiter)

    def release(self, n: int = 1) -> None:
        """Let `n` more bodies through: those held longest first, then the next to enter.

        Not idempotent: each call lets more bodies through. A release with no
        body held is kept for the next body to enter, which then does not wait.

        Raises:
            ValueError: `n` is negative.
        """
        if n < 0:
            raise ValueError(f"release(n={n}): n must be 0 or more")
        for _ in range(n):
            self._release_one()

    def release_all(self) -> None:
        """Open the gate for good: every held body goes on and later ones do not wait.

        Idempotent.
        """
        self._open = True
        while self._held:
            waiter = self._held.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def wait_running(self, n: int = 1) -> None:
        """Wait until `n` bodies in all have entered the gate.

        Bodies that were let through or cancelled since still count: entries
        only add up. Returns at once, without yielding, if `n` have entered.
        Cancelling the wait leaves the gate unchanged. A read: idempotent.

        Raises:
            TimeoutError: fewer than `n` bodies entered within the gate's
                `timeout` (the message says how many did).
        """
        try:
            async with asyncio.timeout(self.timeout):
                await self._entries(n)
        except TimeoutError:
            raise TimeoutError(
                f"{self!r}: waited {self.timeout} s for {n} bodies to enter; "
                f"{self._entered} entered"
            ) from None

    async def _entries(self, n: int) -> None:
        """Wait, without a deadline, until `n` bodies have entered."""
        if self._entered >= n:
            return
        watcher: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, watcher)
        self._watchers.append(entry)
        try:
            await watcher
        finally:
            with contextlib.suppress(ValueError):  # _notify_watchers already took it off
                self._watchers.remove(entry)

    def _notify_watchers(self) -> None:
        reached = [(n, w) for n, w in self._watchers if n <= self._entered]
        for entry in reached:
            self._watchers.remove(entry)
            if not entry[1].done():
                entry[1].set_result(None)

    def _release_one(self) -> None:
        while self._held:
            waiter = self._held.popleft()
            # A waiter cancelled in this step is done but still queued; skip it.
            if not waiter.done():
                waiter.set_result(None)
                return
        self._permits += 1


Condition = Gate | asyncio.Event | Callable[[], Awaitable[object]]
"""What `start_and_control` waits for: a gate's first entry, an event, or an async callable."""


async def start_and_control(
    task: Callable[[*Ts], Awaitable[R]],
    *args: *Ts,
    when: Condition,
    control: Callable[[flowsdk.RunHandle[R]], Awaitable[C]],
    name: str | None = None,
    store: str | os.PathLike[str] | Store | None = None,
    # Not the caller's asyncio.timeout: this deadline covers the wait for `when`
    # only, not the control or the run's end, and its error can name the run's phase.
    timeout: float | None = 10.0,  # noqa: ASYNC109
) -> tuple[flowsdk.Run[R], C]:
    """Start a run, act on it once a condition holds, and return it when it has ended.

    Starts `task(*args)` with `flowsdk.start`, waits until `when` holds, awaits
    `control(handle)` (e.g. `lambda h: h.abort("a1", reason="test")`), then
    waits for the run to end. The control runs in the loop step in which the
    condition was seen to hold, as after a plain `await event.wait()`. As with
    `flowsdk.start`, arguments for the task are positional (the static type
    checker checks them against the task's parameters); pass keyword
    arguments with `functools.partial`.

    If the wait or the control fails, or this call is cancelled, the run is
    aborted and its end awaited before the error propagates, so no run
    outlives the test.

    Args:
        task: A task declared with `@env.task` (or a `functools.partial` of one).
        *args: Positional arguments for the task.
        when: What to wait for: a `Gate` (its first entry), an `asyncio.Event`
            (set), or an async callable such as `lambda: gate.wait_running(3)`.
        control: Called once with the run's handle; its result is returned.
            It may do more than one thing, e.g. stop then release a gate.
        name: The run's name; default: generated.
        store: Where the run is recorded (as for `flowsdk.start`).
        timeout: Seconds to wait for `when`; `None` waits without a deadline.

    Returns:
        The ended run and the value `control` returned.

    Raises:
        TimeoutError: `when` did not hold within `timeout`.
        AssertionError: the run ended before `when` held (the message gives
            its phase; `__cause__` is what its `result()` raised, if anything).
    """
    condition = _as_condition(when)
    # flowsdk.start accepts a task or a partial of one at run time; the
    # Callable type above is what lets the checker match `*args` to it.
    handle = await flowsdk.start(cast("flowsdk.Task[..., R]", task), *args, name=name, store=store)
    ended = asyncio.get_running_loop().create_task(handle.wait(), name=f"wait for {handle.name}")
    try:
        await _wait_for(condition, when, handle, ended, timeout)
        outcome = await control(handle)
        run = await ended
    except BaseException:
        await _abort_and_wait(handle, ended)
        raise
    return run, outcome


def _as_condition(when: Condition) -> Callable[[], Awaitable[object]]:
    if isinstance(when, Gate):
        gate = when

        async def first_entry() -> None:
            await gate._entries(1)  # no deadline of its own: start_and_control has one

        return first_entry
    if isinstance(when, asyncio.Event):
        return when.wait
    if callable(when):
        return when
    raise TypeError(
        f"when= takes a Gate, an asyncio.Event or an async callable, not {type(when).__name__}"
    )


async def _wait_for(
    condition: Callable[[], Awaitable[object]],
    when: Condition,
    handle: flowsdk.RunHandle[Any],
    ended: asyncio.Task[flowsdk.Run[Any]],
    limit: float | None,
) -> None:
    """Wait until `condition()` returns; fail at the deadline or as soon as the run has ended."""
    loop = asyncio.get_running_loop()
    waiting = True
    deadline = asyncio.timeout(limit)

    def run_ended(_: object) -> None:
        # Expire the deadline now: asyncio.timeout turns its own cancel into
        # TimeoutError and leaves any other cancel of this task alone.
        # A deadline already expiring refuses a new time, in a callback no one would see.
        if waiting and not deadline.expired():
            deadline.reschedule(loop.time())

    try:
        async with deadline:
            ended.add_done_callback(run_ended)
            try:
                await condition()
            finally:
                waiting = False
                ended.remove_done_callback(run_ended)
    except TimeoutError:
        if ended.done() and not ended.cancelled():
            early = _ended_early(ended.result(), when)
            raise early from early.__cause__
        if not deadline.expired():
            raise  # the condition's own deadline (e.g. Gate.wait_running) passed
        raise TimeoutError(
            f"run {handle.name} is still {handle.phase.value}: {when!r} did not hold "
            f"within {limit} s"
        ) from None


def _ended_early(run: flowsdk.Run[Any], when: Condition) -> AssertionError:
    error = AssertionError(f"run {run.name} ended {run.phase.value} before {when!r} held")
    try:
        run.result()
    except Exception as exc:  # whatever the run ended with explains why
        error.__cause__ = exc
    return error


async def _abort_and_wait(
    handle: flowsdk.RunHandle[Any], ended: asyncio.Task[flowsdk.Run[Any]]
) -> None:
    """Abort the run unless it has ended, and wait for its end (cleanup included)."""
    if not handle.phase.terminal:
        # The error being raised matters more than a refused abort.
        with contextlib.suppress(FlowError):
            await handle.abort(reason="flowsdk.testing.start_and_control failed")
    await handle.wait()
    # `ended` may have been cancelled with this call; it is over either way.
    await asyncio.wait([ended])


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """Return the store URL of a SQLite database file, made absolute (`sqlite:////abs/x.db`)."""
    return "sqlite:///" + str(Path(path).absolute())


def new_store(kind: StoreKind, directory: str | os.PathLike[str]) -> str | Store:
    """Return a new, empty store of `kind`, to pass as `store=` and to `flowsdk.Client`.

    Opens nothing: a SQLite file is created by the first run recorded in it.

    Args:
        kind: `"memory"`: a store object (`open_store("memory://")`); each
            `memory://` URL opens a new, empty store, so the object is what
            lets a test read its runs back. `"sqlite"`: the URL of a database
            file in `directory` that does not exist yet, with a new random
            name at each call.
        directory: Where a SQLite file goes (pytest's `tmp_path`).

    Raises:
        ValueError: `kind` is not one of `STORE_KINDS`.
    """
    if kind == "memory":
        return open_store("memory://")
    if kind == "sqlite":
        # A random name, not "the next free one": two calls before any run
        # must still give two stores, and an empty file would be refused.
        while (path := Path(directory) / f"flowsdk-{secrets.token_hex(6)}.db").exists():
            pass
        return sqlite_url(path)
    raise ValueError(f"unknown store kind {kind!r}; use one of {', '.join(STORE_KINDS)}")


def store_fixture(
    kinds: Sequence[StoreKind] = STORE_KINDS, *, name: str | None = None
) -> Callable[..., object]:
    """Return a pytest fixture giving a new store of each of `kinds` in turn.

    Assign the result to a name in a test module or `conftest.py`; the fixture
    takes that name (or `name`), and every test that asks for it runs once per
    kind, with the test id `[memory]` or `[sqlite]`. The value is what
    `new_store(kind, tmp_path)` returns. pytest is imported here, not when
    `flowsdk.testing` is imported.

    Example:
        ```python
        store = flowsdk.testing.store_fixture()

        def test_history(store: str | Store) -> None:
            flowsdk.run(main, name="first", store=store)
        ```

    Raises:
        ValueError: `kinds` is empty or names an unknown kind.
    """
    import pytest

    unknown = [kind for kind in kinds if kind not in STORE_KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"store_fixture(kinds={list(kinds)!r}): give one or more of {', '.join(STORE_KINDS)}"
        )

    @pytest.fixture(params=list(kinds), name=name)
    def store(request: pytest.FixtureRequest, tmp_path: Path) -> str | Store:
        kind: StoreKind = request.param
        return new_store(kind, tmp_path)

    return store
