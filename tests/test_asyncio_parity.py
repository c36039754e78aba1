"""Plain asyncio semantics: the same program under bare asyncio and as tasks.

Each program is written once, against a decorator `task`: the identity under
plain asyncio, `env.task` under flowsdk. Its `main` observes what asyncio
lets it observe (a value, an exception's type, `cancelling()` counts, an
`ExceptionGroup`'s shape) and returns that observation; the test runs it both
ways and compares. The one allowed difference is SPEC §7's wrapping: a
child's exception reaches its awaiter as `RuntimeUserError` whose
`__cause__` is the original, so `seen` unwraps it (and checks it is there).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

import flowsdk
from flowsdk import ActionPhase, EventKind
from flowsdk.errors import ActionAbortedError, RuntimeUserError
from tests.support import assert_clean

F = TypeVar("F", bound=Callable[..., Any])
Deco = Callable[[F], F]
Main = Callable[[], Coroutine[Any, Any, Any]]
Program = Callable[[Callable[[Any], Any]], Main]

_envs = itertools.count()


def seen(exc: BaseException, *, wrapped: bool) -> Any:
    """Describe an exception as the awaiter sees it, minus SPEC §7's wrapping."""
    if isinstance(exc, RuntimeUserError) and exc.__cause__ is not None:
        assert wrapped, f"wrapped under plain asyncio? {exc!r}"
        exc = exc.__cause__
    if isinstance(exc, BaseExceptionGroup):
        return [type(exc).__name__, sorted(str(seen(e, wrapped=wrapped)) for e in exc.exceptions)]
    return type(exc).__name__


async def observe(awaitable: Any, *, wrapped: bool) -> list[Any]:
    """Await and say what came back: `["value", v]` or `["raised", description]`."""
    try:
        return ["value", await awaitable]
    except BaseException as exc:  # the observation itself, whatever it is
        return ["raised", seen(exc, wrapped=wrapped)]


def _users_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
    """A task factory of the user's own, that makes tasks as asyncio does."""
    return asyncio.Task(coro, loop=loop, **kwargs)


# The loop's task factory each program runs under, both ways: none (asyncio's
# own), a user's own, and, on Python 3.12+, asyncio's eager one, which starts
# a task's coroutine inside `create_task`.
FACTORIES: dict[str, Any] = {"default": None, "users": _users_factory}
if sys.version_info >= (3, 12):
    FACTORIES["eager"] = asyncio.eager_task_factory  # type: ignore[attr-defined,unused-ignore]
_factory: list[str] = ["default"]


@pytest.fixture(autouse=True, params=list(FACTORIES))
def factory(request: pytest.FixtureRequest) -> Iterator[str]:
    """The name of the task factory `both` runs the program under."""
    _factory[0] = request.param
    yield request.param
    _factory[0] = "default"


async def both(program: Callable[[Callable[[Any], Any], bool], Main]) -> tuple[Any, Any, Any]:
    """Run `program` under plain asyncio and as tasks; return both observations and the run.

    Both under the loop's task factory of this test's `factory`.
    """
    loop = asyncio.get_running_loop()
    loop.set_task_factory(FACTORIES[_factory[0]])
    try:
        plain_main = program(lambda fn: fn, False)
        plain = await asyncio.create_task(plain_main())
        env = flowsdk.TaskEnvironment(f"parity{next(_envs)}")
        flow_main = program(env.task, True)
        run = await flowsdk.run_async(env.task(flow_main))
    finally:
        loop.set_task_factory(None)
    return _plain(plain), _plain(run.result()), run


def _plain(value: Any) -> Any:
    # Outputs come back decoded from their record: tuples as lists.
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def by_task(run: flowsdk.Run[Any], name: str) -> list[Any]:
    return [a for a in run.actions if a.task.endswith(f".{name}")]


# -- D1: a child that absorbs its cancel gives its value ---------------------------


async def test_child_absorbing_t_cancel_gives_its_value() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        started = asyncio.Event()

        @task
        async def child() -> int:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return 42
            return 0

        async def main() -> list[Any]:
            t = asyncio.create_task(child())
            await started.wait()
            t.cancel("early stop")
            got = await observe(t, wrapped=wrapped)
            me = asyncio.current_task()
            assert me is not None
            return [got, t.cancelled(), me.cancelling()]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == [["value", 42], False, 0]
    [child] = by_task(run, "child")
    assert child.phase is ActionPhase.SUCCEEDED
    warnings = [e for e in run.events if e.kind is EventKind.WARNING]
    assert any(e.action == child.name and "absorbed" in (e.message or "") for e in warnings)
    assert_clean(run)


async def test_a_cancel_that_comes_as_the_awaited_child_returns_lands_at_the_next_await() -> None:
    """The child returns and its caller is cancelled in one loop step: the cancel stands.

    In asyncio the caller gets the child's value, then `CancelledError` at its
    next await. (The cancel used to be dropped: an operator's abort arriving
    so ran the caller on, starting actions, under a run recorded ABORTED.)
    """

    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        caller: list[asyncio.Task[Any]] = []

        @task
        async def child() -> int:
            # The caller's cancel runs in the loop step in which this call's end is seen.
            asyncio.get_running_loop().call_soon(caller[0].cancel, "late")
            return 1

        @task
        async def parent() -> list[Any]:
            me = asyncio.current_task()
            assert me is not None
            caller.append(me)
            value = await child()
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError as exc:
                return [value, "cancelled at the next await", str(exc), me.cancelling()]
            return [value, "not cancelled", "", me.cancelling()]

        async def main() -> list[Any]:
            return await observe(asyncio.create_task(parent()), wrapped=wrapped)

        return main

    plain, flow, run = await both(program)
    assert plain == flow == ["value", [1, "cancelled at the next await", "late", 1]]
    assert_clean(run)


async def test_wait_for_returns_the_value_of_a_child_absorbing_its_timeout() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        @task
        async def child() -> str:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return "partial"
            return "full"

        async def main() -> list[Any]:
            got = await observe(asyncio.wait_for(child(), 0.01), wrapped=wrapped)
            me = asyncio.current_task()
            assert me is not None
            return [got, me.cancelling()]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == [["value", "partial"], 0]  # Python 3.11's wait_for
    assert [a.phase for a in by_task(run, "child")] == [ActionPhase.SUCCEEDED]


async def test_timeout_block_around_an_absorbing_child_keeps_the_value() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        @task
        async def child() -> int:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return 7
            return 0

        async def main() -> list[Any]:
            async def timed() -> Any:
                async with asyncio.timeout(0.01):
                    return await child()

            got = await observe(timed(), wrapped=wrapped)
            me = asyncio.current_task()
            assert me is not None
            return [got, me.cancelling()]

        return main

    plain, flow, _ = await both(program)
    assert plain == flow == [["value", 7], 0]


async def test_outer_task_absorbing_its_cancel_returns_its_value() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        started = asyncio.Event()

        @task
        async def leaf() -> None:
            started.set()
            await asyncio.sleep(3600)

        @task
        async def middle() -> str:
            try:
                await leaf()
            except asyncio.CancelledError:
                return "absorbed"
            return "finished"

        async def main() -> list[Any]:
            t = asyncio.create_task(middle())
            await started.wait()
            t.cancel()
            return [await observe(t, wrapped=wrapped), t.cancelled()]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == [["value", "absorbed"], False]
    assert [a.phase for a in by_task(run, "middle")] == [ActionPhase.SUCCEEDED]
    assert [a.phase for a in by_task(run, "leaf")] == [ActionPhase.ABORTED]


@pytest.mark.parametrize("request_kind", ["abort", "mark_failed"])
async def test_operator_requests_cannot_be_absorbed(request_kind: str) -> None:
    """SPEC §1: an operator's request is not workflow code's cancel: it keeps its outcome."""
    env = flowsdk.TaskEnvironment(f"parity_{request_kind}")
    started = asyncio.Event()
    names: list[str] = []

    @env.task
    async def child() -> int:
        names.append(flowsdk.current_action().name)
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return 42
        return 0

    @env.task
    async def main() -> str:
        try:
            await child()
        except ActionAbortedError:
            return "aborted"
        except RuntimeUserError as exc:
            return f"failed: {type(exc.__cause__).__name__}"
        return "value"

    handle = await flowsdk.start(main)
    await started.wait()
    if request_kind == "abort":
        await handle.abort(names[0], reason="operator")
    else:
        await handle.mark_failed(names[0], reason="operator")
    run = await handle.wait()
    [record] = by_task(run, "child")
    assert record.abort is not None
    if request_kind == "abort":
        assert run.result() == "aborted"
        assert record.phase is ActionPhase.ABORTED
        assert record.abort.cause.value == "external"
    else:
        assert run.result() == "failed: ActionMarkedFailedError"
        assert record.phase is ActionPhase.FAILED
        assert record.abort.cause.value == "mark_failed"


async def test_root_exit_cannot_be_absorbed() -> None:
    """SPEC §1: the lifetime rule wins: a detached child absorbing the root's exit is ABORTED."""
    env = flowsdk.TaskEnvironment("parity_root_exit")
    started = asyncio.Event()
    absorbed: list[int] = []
    detached: list[asyncio.Task[int]] = []

    @env.task
    async def child() -> int:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            absorbed.append(1)
            return 42
        return 0

    @env.task
    async def main() -> str:
        detached.append(asyncio.create_task(child()))
        await started.wait()
        return "done"

    run = await flowsdk.run_async(main)
    await asyncio.gather(*detached, return_exceptions=True)
    assert run.result() == "done"
    assert absorbed == [1]
    [record] = by_task(run, "child")
    assert record.phase is ActionPhase.ABORTED
    assert record.abort is not None
    assert record.abort.cause.value == "root_exit"


# -- D2: cleanup errors reach an awaiter that is itself being cancelled -------------


@pytest.mark.parametrize("depth", [1, 2, 3])
async def test_cleanup_error_reaches_a_cancelled_awaiter_at_any_depth(depth: int) -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        started = asyncio.Event()

        @task
        async def leaf() -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            finally:
                raise ZeroDivisionError("cleanup")

        @task
        async def level(n: int) -> None:
            if n == 0:
                await leaf()
            else:
                await level(n - 1)

        async def main() -> list[Any]:
            t = asyncio.create_task(level(depth - 1))
            await started.wait()
            t.cancel()
            return [await observe(t, wrapped=wrapped), t.cancelled()]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == [["raised", "ZeroDivisionError"], False]
    assert_clean(run)


async def test_taskgroup_members_cleanup_errors_form_its_exception_group() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        started: list[int] = []
        all_started = asyncio.Event()

        @task
        async def member(i: int) -> None:
            started.append(i)
            if len(started) == 2:
                all_started.set()
            try:
                await asyncio.sleep(3600)
            finally:
                raise ValueError(i)

        @task
        async def holder() -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(member(0))
                tg.create_task(member(1))
                await asyncio.sleep(3600)

        async def main() -> list[Any]:
            t = asyncio.create_task(holder())
            await all_started.wait()
            t.cancel()
            return [await observe(t, wrapped=wrapped), t.cancelled()]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == [["raised", ["ExceptionGroup", ["ValueError", "ValueError"]]], False]
    assert_clean(run)


# -- D3: other BaseExceptions propagate unwrapped, without aborting the run ---------


class Halt(BaseException):
    """A user's own BaseException (not an interrupt, not a cancel)."""


async def test_base_exception_reaches_the_awaiter_unwrapped() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        @task
        async def child() -> None:
            raise Halt("stop here")

        async def main() -> list[Any]:
            try:
                await child()
            except Halt as exc:
                return ["caught", type(exc).__name__, str(exc)]
            return ["not caught"]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == ["caught", "Halt", "stop here"]
    assert run.phase is flowsdk.RunPhase.SUCCEEDED
    [child] = by_task(run, "child")
    assert child.phase is ActionPhase.FAILED
    assert child.abort is None


async def test_base_exceptions_join_a_taskgroups_base_exception_group() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        @task
        async def member(i: int) -> int:
            if i == 2:  # the last: an eager factory runs this inside `create_task`
                raise Halt(i)
            await asyncio.sleep(3600)
            return i

        async def main() -> list[Any]:
            async def grouped() -> None:
                async with asyncio.TaskGroup() as tg:
                    for i in range(3):
                        tg.create_task(member(i))

            return await observe(grouped(), wrapped=wrapped)

        return main

    plain, flow, run = await both(program)
    assert plain == flow == ["raised", ["BaseExceptionGroup", ["Halt"]]]
    assert run.phase is flowsdk.RunPhase.SUCCEEDED
    assert sorted(a.phase.value for a in by_task(run, "member")) == [
        "ABORTED",
        "ABORTED",
        "FAILED",
    ]


async def test_base_exception_of_the_root_fails_the_run_and_is_what_result_raises() -> None:
    env = flowsdk.TaskEnvironment("parity_root_base")

    @env.task
    async def main() -> None:
        raise Halt("root")

    run = await flowsdk.run_async(main)
    assert run.phase is flowsdk.RunPhase.FAILED
    with pytest.raises(Halt, match="root"):
        run.result()


# -- D4: context variables live in the context asyncio gives ------------------------

cvar: contextvars.ContextVar[int] = contextvars.ContextVar("parity_cvar", default=0)


async def test_child_context_writes_land_in_the_context_given_to_create_task() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        @task
        async def child(value: int) -> None:
            cvar.set(value)

        async def main() -> list[Any]:
            ctx = contextvars.copy_context()
            await asyncio.create_task(child(1), context=ctx)
            in_ctx = ctx.get(cvar)
            after_task = cvar.get()  # a task of its own: its writes stay in its context
            await child(2)  # awaited directly: it runs in this very context
            return [in_ctx, after_task, cvar.get()]

        return main

    plain, flow, _ = await both(program)
    assert plain == flow == [1, 0, 2]


async def test_child_in_a_task_of_its_own_sees_the_context_copied_when_the_task_was_made() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        @task
        async def child(value: int) -> int:
            seen = cvar.get()
            cvar.set(value)
            await asyncio.sleep(0)
            return seen * 100 + cvar.get()

        async def main() -> list[Any]:
            cvar.set(5)
            t = asyncio.create_task(child(7))
            g = asyncio.gather(child(8), child(9))
            cvar.set(6)  # after the copies were made, before the bodies run
            return [await t, await g, cvar.get()]

        return main

    plain, flow, _ = await both(program)
    assert plain == flow == [507, [508, 509], 6]


# -- D5: a body that cancels its own task and returns at once -----------------------


async def test_body_cancelling_its_own_task_ends_cancelled() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        @task
        async def child() -> int:
            me = asyncio.current_task()
            assert me is not None
            me.cancel()
            return 1

        async def main() -> list[Any]:
            t = asyncio.create_task(child())
            return [await observe(t, wrapped=wrapped), t.cancelled()]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == [["raised", "CancelledError"], True]
    [child] = by_task(run, "child")
    assert child.phase is ActionPhase.ABORTED
    assert child.abort is not None
    assert child.abort.cause.value == "cancelled"


# -- D6: when a cancel of the awaiting task reaches the body ---------------------------


async def test_cancel_of_a_task_of_its_own_reaches_the_body_in_the_step_asyncio_gives() -> None:
    """`t.cancel()` lands in the child's body on the loop's next step, as in asyncio.

    The cancel goes to the action at once, not through a first wake-up of `t`:
    after one `sleep(0)` of the canceller the body has run its `except`.
    """

    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        started = asyncio.Event()
        seen_by_body: list[str] = []

        @task
        async def child() -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen_by_body.append("cancelled")
                raise

        async def main() -> list[Any]:
            t = asyncio.create_task(child())
            await started.wait()
            t.cancel()
            await asyncio.sleep(0)
            after_one_step = list(seen_by_body)
            return [after_one_step, await observe(t, wrapped=wrapped), t.cancelled()]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == [["cancelled"], ["raised", "CancelledError"], True]
    assert_clean(run)


@pytest.mark.parametrize("made_by", ["create_task", "ensure_future", "TaskGroup"])
async def test_a_task_of_its_own_starts_its_body_on_the_loops_next_step(made_by: str) -> None:
    """After one `sleep(0)` the body has run to its first `await`, as asyncio's would.

    The common idiom (start a worker, yield once, then talk to it) works as in
    asyncio, and a cancel then reaches the body's cleanup.
    """

    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        log: list[str] = []

        @task
        async def child(i: int) -> None:
            log.append(f"start {i}")
            try:
                await asyncio.sleep(3600)
            finally:
                log.append(f"cleanup {i}")

        async def main() -> list[Any]:
            if made_by == "TaskGroup":
                try:
                    async with asyncio.TaskGroup() as tg:
                        t = tg.create_task(child(1))
                        await asyncio.sleep(0)
                        after_one_step = list(log)
                        t.cancel()
                except BaseException as exc:  # the observation itself
                    return [after_one_step, seen(exc, wrapped=wrapped), log]
                return [after_one_step, t.cancelled(), log]
            make = asyncio.create_task if made_by == "create_task" else asyncio.ensure_future
            t = make(child(1))
            await asyncio.sleep(0)
            after_one_step = list(log)
            t.cancel()
            return [after_one_step, await observe(t, wrapped=wrapped), log]

        return main

    plain, flow, run = await both(program)
    assert plain == flow
    assert plain[0] == ["start 1"]
    assert plain[2] == ["start 1", "cleanup 1"]
    assert_clean(run)


@pytest.mark.parametrize("made_by", ["create_task", "ensure_future", "TaskGroup", "gather"])
async def test_a_call_cancelled_before_its_first_step_never_runs_the_body(
    made_by: str, factory: str
) -> None:
    """A task of its own, or `gather`, cancelled before the loop's next step: no body runs.

    Under an eager factory there is no such moment: the body has run to its end
    inside `create_task`, and the cancel comes too late, in asyncio as here.
    """

    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        started: list[int] = []

        @task
        async def child(i: int) -> int:
            started.append(i)
            return i

        async def main() -> list[Any]:
            if made_by == "gather":
                g = asyncio.gather(child(1), child(2))
                cancelled = g.cancel()
                return [cancelled, await observe(g, wrapped=wrapped), started]
            if made_by == "TaskGroup":
                async with asyncio.TaskGroup() as tg:
                    t = tg.create_task(child(1))
                    cancelled = t.cancel()
                return [cancelled, t.cancelled(), started]
            make = asyncio.create_task if made_by == "create_task" else asyncio.ensure_future
            t = make(child(1))
            cancelled = t.cancel()
            return [cancelled, await observe(t, wrapped=wrapped), started]

        return main

    plain, flow, run = await both(program)
    assert plain == flow
    children = by_task(run, "child")
    assert len(children) == (2 if made_by == "gather" else 1)
    if factory == "eager":
        assert plain[0] is False
        assert plain[2] == ([1, 2] if made_by == "gather" else [1])
        assert {a.phase for a in children} == {ActionPhase.SUCCEEDED}
    else:
        assert plain[0] is True
        assert plain[2] == []
        # recorded as cancelled before they started
        assert {(a.phase, a.abort.cause.value if a.abort else None) for a in children} == {
            (ActionPhase.ABORTED, "cancelled")
        }
    assert_clean(run)


async def test_two_cancels_in_one_step_are_one_and_the_awaiter_waits_for_the_cleanup() -> None:
    """`t.cancel(); t.cancel()`: one `CancelledError` in the body; `t` gets its cleanup's error."""

    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        started = asyncio.Event()
        cancels: list[int] = []

        @task
        async def child() -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels.append(1)
                for _ in range(3):  # a cleanup that takes a few steps
                    await asyncio.sleep(0)
                raise ValueError("cleanup") from None

        async def main() -> list[Any]:
            t = asyncio.create_task(child())
            await started.wait()
            t.cancel()
            t.cancel()
            return [await observe(t, wrapped=wrapped), len(cancels)]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == [["raised", "ValueError"], 1]
    [child] = by_task(run, "child")
    assert child.phase is ActionPhase.FAILED


@pytest.mark.parametrize("shape", ["task of its own", "awaited in its caller", "gathered"])
async def test_a_second_cancel_interrupts_the_cleanup_the_first_began_and_the_caller_waits(
    shape: str,
) -> None:
    """Cancelled again while its cleanup runs, the child's cleanup is interrupted, as in asyncio.

    The caller's first cancel starts the child's `finally`; the second is
    delivered into that `finally`, and the caller goes on waiting until the
    child has ended: a cleanup that catches it and returns gives its value.
    """

    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        started, in_cleanup = asyncio.Event(), asyncio.Event()
        log: list[str] = []

        @task
        async def child(absorbs: bool) -> int:
            started.set()
            try:
                await asyncio.sleep(3600)
            finally:
                in_cleanup.set()
                try:
                    await asyncio.sleep(3600)  # a cleanup that would take an hour
                except asyncio.CancelledError:
                    log.append("cleanup interrupted")
                    if absorbs:
                        return 7
                    raise
            return 0

        async def caller(absorbs: bool) -> int:
            if shape == "gathered":
                [value] = await asyncio.gather(child(absorbs))
                return int(value)
            return int(await child(absorbs))

        async def once(absorbs: bool) -> list[Any]:
            started.clear()
            in_cleanup.clear()
            log.clear()
            call = child(absorbs) if shape == "task of its own" else caller(absorbs)
            t = asyncio.create_task(call)
            await started.wait()
            t.cancel()
            await in_cleanup.wait()
            t.cancel()
            return [await observe(t, wrapped=wrapped), list(log)]

        async def main() -> list[Any]:
            return [await once(False), await once(True)]

        return main

    plain, flow, run = await both(program)
    assert plain == flow
    assert plain[0] == [["raised", "CancelledError"], ["cleanup interrupted"]]
    assert plain[1][1] == ["cleanup interrupted"]
    children = sorted(by_task(run, "child"), key=lambda a: a.name)
    assert [a.phase for a in children] == [ActionPhase.ABORTED, ActionPhase.SUCCEEDED]
    assert children[0].abort is not None
    assert children[0].abort.cause.value == "cancelled"
    assert all(a.cleanup_incomplete for a in children)
    assert_clean(run)


# -- gather: the calls it wraps start and end as its tasks would -------------------------


async def test_gather_starts_bodies_next_step_and_its_cancel_reaches_them_as_asyncio() -> None:
    """`gather(child(1), child(2))`: each body runs on the loop's next step; `g.cancel(msg)`.

    The cancel returns True, a child that absorbs it still leaves `g`
    cancelled (with the message), as gather's own tasks would.
    """

    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        started: list[int] = []

        @task
        async def child(i: int) -> int:
            started.append(i)
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if i == 1:
                    return 10  # absorbs the cancel
                raise  # the last to end: gather's CancelledError is this one
            return i

        async def main() -> list[Any]:
            g = asyncio.gather(child(1), child(2), return_exceptions=True)
            await asyncio.sleep(0)
            after_one_step = sorted(started)
            cancel_returned = g.cancel("why")
            try:
                out: list[Any] = ["value", await g]
            except asyncio.CancelledError as exc:
                out = ["raised", list(exc.args)]
            return [after_one_step, cancel_returned, out]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == [[1, 2], True, ["raised", ["why"]]]
    phases = sorted(a.phase.value for a in by_task(run, "child"))
    assert phases == ["ABORTED", "SUCCEEDED"]


async def test_gather_child_cleanup_error_reaches_its_cancelled_awaiter() -> None:
    def program(task: Callable[[Any], Any], wrapped: bool) -> Main:
        started = asyncio.Event()

        @task
        async def leaf(fails: bool) -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            finally:
                if fails:
                    raise ZeroDivisionError("cleanup")

        async def parent() -> None:
            await asyncio.gather(leaf(True), leaf(False))

        async def main() -> list[Any]:
            t = asyncio.create_task(parent())
            await started.wait()
            t.cancel()
            return [await observe(t, wrapped=wrapped), t.cancelled()]

        return main

    plain, flow, run = await both(program)
    assert plain == flow == [["raised", "ZeroDivisionError"], False]
    assert_clean(run)


class _NamingLoop(asyncio.SelectorEventLoop):
    """`create_task` as in Python 3.13.0-3.13.2: `set_name(name)` on what the factory returns."""

    def create_task(self, coro: Any, *, name: Any = None, context: Any = None) -> Any:
        factory: Any = self.get_task_factory()
        if factory is None:  # before the run installs its own
            return asyncio.Task(coro, loop=self, name=name, context=context)
        task = factory(self, coro) if context is None else factory(self, coro, context=context)
        task.set_name(name)  # name None included (CPython gh-130033)
        return task


def test_gather_of_calls_works_where_asyncio_names_what_the_task_factory_returns() -> None:
    env = flowsdk.TaskEnvironment("named")

    @env.task
    async def child(i: int) -> int:
        await asyncio.sleep(0)
        return i

    @env.task
    async def main() -> list[int]:
        return list(await asyncio.gather(child(1), child(2)))

    with asyncio.Runner(loop_factory=_NamingLoop) as runner:
        run = runner.run(flowsdk.run_async(main))
    assert run.result() == [1, 2]
    assert_clean(run)
