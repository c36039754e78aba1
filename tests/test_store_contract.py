"""The store contract (SPEC §5, §6): what `flowsdk.Client` reads back, whatever the store.

Every test runs against a `MemoryStore` object, a SQLite store in tmp_path and
a new database on the session's PostgreSQL server; the last one checks that
they all keep the same records.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import threading
import time
from asyncio import CancelledError
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

import flowsdk
from flowsdk import AbortCause, AbortRequest, ActionPhase, EventKind, RunPhase, StopRequest
from flowsdk.errors import (
    ActionAbortedError,
    ActionNotFoundError,
    RunExistsError,
    RunNotFoundError,
    RuntimeUserError,
)
from flowsdk.store import ControlReply, MemoryStore, Store, open_store
from flowsdk.testing import Gate, new_store, start_and_control
from tests.support import assert_clean, causes, phases


def read(store: str | Store, name: str) -> flowsdk.Run[Any]:
    """Read one run back through a Client of its own."""
    with flowsdk.Client(store) as client:
        return client.get_run(name)


def test_runs_lists_newest_first_filters_by_phase_and_limits(store: str | Store) -> None:
    """Client.runs(): the latest runs first; phase= and limit= narrow the list."""
    env = flowsdk.TaskEnvironment("history")

    @env.task
    async def ok() -> int:
        return 1

    @env.task
    async def bad() -> int:
        raise ValueError("no")

    for name, task in [("first", ok), ("second", bad), ("third", ok)]:
        flowsdk.run(task, name=name, store=store)
    with flowsdk.Client(store) as client:
        everything = client.runs()
        succeeded = [r.name for r in client.runs(phase=RunPhase.SUCCEEDED)]
        failed = [r.name for r in client.runs(phase="FAILED")]
        latest = [r.name for r in client.runs(limit=2)]
    assert [(r.name, r.phase) for r in everything] == [
        ("third", RunPhase.SUCCEEDED),
        ("second", RunPhase.FAILED),
        ("first", RunPhase.SUCCEEDED),
    ]
    assert (succeeded, failed, latest) == (["third", "first"], ["second"], ["third", "second"])
    for record in everything:
        assert record.attempt == 1
        assert record.ended_at is not None
        assert record.ended_at >= record.started_at
        assert record.stop is None
        assert record.task.startswith(f"{__name__}:")


def test_get_run_keeps_phases_causes_groups_and_attempts(store: str | Store) -> None:
    """A stored run: each action's phase, abort cause, group and attempt count."""
    env = flowsdk.TaskEnvironment("record")
    calls: list[int] = []
    victim_running, orphan_running = Gate("victim"), Gate("orphan")

    @env.task(retries=2, backoff=0)
    async def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("not yet")
        return 3

    @env.task
    async def victim() -> None:
        await victim_running.enter()

    @env.task
    async def orphan() -> None:
        await orphan_running.enter()

    @env.task
    async def root() -> int:
        with flowsdk.group("stage"):
            value = await flaky()
        t = asyncio.create_task(victim())
        await victim_running.wait_running()
        t.cancel()
        with contextlib.suppress(CancelledError):
            await t
        asyncio.create_task(orphan())  # noqa: RUF006 -- left to the root's exit
        await orphan_running.wait_running()
        return value

    flowsdk.run(root, name="shape", store=store)
    run = read(store, "shape")
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "SUCCEEDED", "a2": "ABORTED", "a3": "ABORTED"}
    assert causes(run) == {"a0": None, "a1": None, "a2": "cancelled", "a3": "root_exit"}
    assert [a.group for a in run.actions] == [None, "stage", None, None]
    assert [a.attempt for a in run.actions] == [1, 3, 1, 1]
    assert [a.parent for a in run.actions] == [None, "a0", "a0", "a0"]
    assert [a.task.rsplit(".", 1)[1] for a in run.actions] == ["root", "flaky", "victim", "orphan"]
    assert [a.key for a in run.actions] == ["a0", "a0/1", "a0/2", "a0/3"]
    assert run.phase is RunPhase.SUCCEEDED
    assert_clean(run)


def test_events_are_in_order_with_one_terminal_event_per_action(store: str | Store) -> None:
    """The event log: seq 0..n, the run's RUNNING first and its end last, one terminal each."""
    env = flowsdk.TaskEnvironment("events")

    @env.task
    async def child(i: int) -> int:
        return i

    @env.task
    async def root() -> int:
        return sum(await asyncio.gather(*(child(i) for i in range(3))))

    flowsdk.run(root, name="log", store=store)
    run = read(store, "log")
    events = run.events
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert (events[0].kind, events[0].phase) == (EventKind.RUN, "RUNNING")
    assert (events[-1].kind, events[-1].phase) == (EventKind.RUN, "SUCCEEDED")
    for action in run.actions:
        steps = [e.phase for e in events if e.kind is EventKind.ACTION and e.action == action.name]
        assert steps == ["QUEUED", "RUNNING", "SUCCEEDED"], action.name
    assert_clean(run)


def test_stored_failure_keeps_error_type_message_and_traceback(store: str | Store) -> None:
    """A failed action's record: its exception's type name, message and traceback text."""
    env = flowsdk.TaskEnvironment("failure")

    @env.task
    async def broken() -> int:
        raise KeyError("missing-key")

    @env.task
    async def root() -> int:
        with contextlib.suppress(RuntimeUserError):
            await broken()
        raise ValueError("root-gave-up")

    flowsdk.run(root, name="boom", store=store)
    run = read(store, "boom")
    child, top = run.action("a1").error, run.action("a0").error
    assert child is not None
    assert top is not None
    assert (child.type, child.message) == ("KeyError", "'missing-key'")
    assert "in broken" in child.traceback
    assert child.traceback.rstrip().endswith("KeyError: 'missing-key'")
    assert (top.type, top.message) == ("ValueError", "root-gave-up")
    assert "in root" in top.traceback
    assert phases(run) == {"a0": "FAILED", "a1": "FAILED"}
    assert run.phase is RunPhase.FAILED


def test_result_of_a_stored_failed_run_raises_runtime_user_error(store: str | Store) -> None:
    """Run.result() of a stored FAILED run: RuntimeUserError with the recorded type and message."""
    env = flowsdk.TaskEnvironment("result")

    @env.task
    async def root() -> int:
        raise ValueError("root-gave-up")

    flowsdk.run(root, name="failed", store=store)
    run = read(store, "failed")
    with pytest.raises(RuntimeUserError) as exc:
        run.result()
    assert (exc.value.error_type, exc.value.error_message) == ("ValueError", "root-gave-up")
    assert "root-gave-up" in exc.value.error_traceback
    assert (exc.value.run, exc.value.action) == ("failed", "a0")


def test_result_of_a_stored_run_raises_what_the_live_run_raised(store: str | Store) -> None:
    """SPEC §7: a child's failure passing through the root is not wrapped twice in the store."""
    env = flowsdk.TaskEnvironment("passthrough")

    @env.task
    async def broken() -> int:
        raise KeyError("missing-key")

    @env.task
    async def root() -> int:
        return await broken()

    live = flowsdk.run(root, name="through", store=store)
    with pytest.raises(RuntimeUserError) as in_process:
        live.result()
    with pytest.raises(RuntimeUserError) as stored:
        read(store, "through").result()
    assert (stored.value.error_type, stored.value.error_message) == (
        in_process.value.error_type,
        in_process.value.error_message,
    )
    assert stored.value.error_type == "KeyError"


async def test_stored_abort_keeps_reason_requester_and_request_event(store: str | Store) -> None:
    """An abort's record: cause external, the reason, who asked and when; a REQUEST event."""
    env = flowsdk.TaskEnvironment("abortrec")
    running = Gate()

    @env.task
    async def child() -> None:
        await running.enter()

    @env.task
    async def root() -> None:
        with contextlib.suppress(ActionAbortedError):
            await child()

    handle = await flowsdk.start(root, name="aborted", store=store)
    await running.wait_running()
    await handle.abort("a1", reason="operator-said-so")
    await handle.wait()
    run = read(store, "aborted")
    abort = run.action("a1").abort
    assert abort is not None
    assert (abort.cause, abort.reason) == (AbortCause.EXTERNAL, "operator-said-so")
    assert abort.requested_by is not None
    assert f"pid {os.getpid()}" in abort.requested_by
    assert abort.requested_at is not None
    [request] = [e for e in run.events if e.kind is EventKind.REQUEST]
    assert (request.action, request.reason) == ("a1", "operator-said-so")
    assert request.requested_by == abort.requested_by
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "ABORTED"}
    assert_clean(run)


async def test_result_of_a_stored_aborted_run_raises_action_aborted_error(
    store: str | Store,
) -> None:
    """Run.result() of a stored ABORTED run raises ActionAbortedError with the abort's reason."""
    env = flowsdk.TaskEnvironment("abortres")
    running = Gate()

    @env.task
    async def root() -> None:
        await running.enter()

    await start_and_control(
        root, when=running, control=lambda h: h.abort(reason="not-today"), name="gone", store=store
    )
    run = read(store, "gone")
    with pytest.raises(ActionAbortedError) as exc:
        run.result()
    assert (exc.value.run, exc.value.action) == ("gone", "a0")
    assert (exc.value.reason, exc.value.cause) == ("not-today", "external")
    assert run.phase is RunPhase.ABORTED


def test_duplicate_run_name_raises_run_exists_error(store: str | Store) -> None:
    """A second run under a name the store has raises RunExistsError; the first is untouched."""
    env = flowsdk.TaskEnvironment("dup")
    ran: list[int] = []

    @env.task
    async def root(i: int) -> int:
        ran.append(i)
        return i

    flowsdk.run(root, 1, name="nightly", store=store)
    before = read(store, "nightly")
    with pytest.raises(RunExistsError, match="nightly"):
        flowsdk.run(root, 2, name="nightly", store=store)
    after = read(store, "nightly")
    assert ran == [1]
    assert (after.record, after.actions, after.events) == (
        before.record,
        before.actions,
        before.events,
    )
    with flowsdk.Client(store) as client:
        assert [r.name for r in client.runs()] == ["nightly"]


def test_unknown_run_raises_run_not_found_error_suggesting_close_names(
    store: str | Store,
) -> None:
    """RunNotFoundError (a LookupError) names the run and suggests the closest names."""
    env = flowsdk.TaskEnvironment("lookup")

    @env.task
    async def root() -> None:
        pass

    flowsdk.run(root, name="nightly-etl", store=store)
    with flowsdk.Client(store) as client:
        with pytest.raises(RunNotFoundError) as typo:
            client.get_run("nightly-elt")
        with pytest.raises(RunNotFoundError):
            client.get_run("nightly-etl", attempt=2)
        with pytest.raises(LookupError):
            client.abort("weekly")
        assert client.get_run("nightly-etl", attempt=1).phase is RunPhase.SUCCEEDED
    assert "nightly-elt" in str(typo.value)
    assert "nightly-etl" in str(typo.value)


def test_one_action_is_read_in_full_as_the_whole_run_holds_it(store: str | Store) -> None:
    """Client.get_action: the record, values and events the run holds for it; get_record."""
    env = flowsdk.TaskEnvironment("detail")

    @env.task
    async def leaf(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        return x * 10

    @env.task
    async def mid(n: int) -> int:
        got = await asyncio.gather(*(leaf(i) for i in range(n)), return_exceptions=True)
        return sum(g for g in got if isinstance(g, int))

    @env.task
    async def root() -> int:
        with flowsdk.group("stage"):
            first = await mid(4)
        return first + await mid(3)

    flowsdk.run(root, name="detail", store=store)
    run = read(store, "detail")
    assert len(run.actions) == 10
    with flowsdk.Client(store) as client:
        assert client.get_record("detail") == run.record
        assert client.get_record("detail", attempt=1) == run.record
        for action in run.actions:
            detail = client.get_action("detail", action.name, attempt=1)
            assert detail.record == run.record
            assert detail.action == action  # whole key, group, error and all
            assert (detail.inputs, detail.output) == run.payloads()[action.name]
            assert detail.events == [e for e in run.events if e.action == action.name]
            assert [e.phase for e in detail.events][-1] == action.phase
        record, outline = client.service.get_outline("detail")
        assert record == run.record
        assert [(a.name, a.parent, a.phase) for a in outline] == [
            (a.name, a.parent, a.phase.value) for a in run.actions
        ]
        some = ["a7", "a1", "a4", "a99"]
        records, payloads = client.service.get_actions("detail", 1, some)
        assert records == [run.action(n) for n in ["a1", "a4", "a7"]]  # start order, known ones
        assert payloads == {n: run.payloads()[n] for n in ["a1", "a4", "a7"]}
        with pytest.raises(ActionNotFoundError) as missing:
            client.get_action("detail", "a10")
        with pytest.raises(RunNotFoundError):
            client.get_action("detail", "a1", attempt=2)
        with pytest.raises(RunNotFoundError):
            client.get_record("detail", attempt=2)
        with pytest.raises(RunNotFoundError):
            client.get_action("detial", "a1")
    names = [a.name for a in run.actions]
    assert str(missing.value) == str(ActionNotFoundError.for_action("detail", "a10", names))
    assert "a0..a9 (10 actions)" in str(missing.value)


@pytest.mark.parametrize("caller", ["loop", "thread"])
async def test_client_controls_a_live_memory_store_run_in_the_same_process(caller: str) -> None:
    """A Client on the same memory:// store object aborts a live run, from its loop or a thread."""
    env = flowsdk.TaskEnvironment("memlive")
    running = Gate()

    @env.task
    async def root() -> None:
        await running.enter()

    memory = MemoryStore()
    handle = await flowsdk.start(root, name="live", store=memory)
    await running.wait_running()
    with flowsdk.Client(memory) as client:
        assert [r.phase for r in client.runs()] == [RunPhase.RUNNING]
        if caller == "loop":
            result = client.abort("live", reason="from-a-client")
        else:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # joined: no thread leaks
                result = await asyncio.get_running_loop().run_in_executor(
                    pool, functools.partial(client.abort, "live", reason="from-a-client")
                )
        run = await handle.wait()
        again = client.abort("live")
    assert (result.outcome, result.phase) == (flowsdk.Outcome.APPLIED, "RUNNING")
    assert causes(run) == {"a0": "external"}
    abort = run.action("a0").abort
    assert abort is not None
    assert abort.reason == "from-a-client"
    assert abort.requested_by == flowsdk.Actor.local().name
    assert again.outcome is flowsdk.Outcome.ALREADY_ENDED


def _comparable(run: flowsdk.Run[Any]) -> tuple[Any, ...]:
    """A run's records without the times, which differ from one run to the next."""
    actions = [
        msgspec.structs.replace(
            a,
            started_at=None,
            ended_at=None,
            abort=msgspec.structs.replace(a.abort, requested_at=None) if a.abort else None,
        )
        for a in run.actions
    ]
    events = [(e.seq, e.kind, e.action, e.phase, e.cause, e.reason, e.message) for e in run.events]
    record = (run.record.name, run.record.phase, run.record.attempt, run.record.task)
    return record, actions, events


def _twin() -> flowsdk.Task[[], int]:
    """A workflow with a retried failure, a group and a root exit (a fresh gate per run)."""
    env = flowsdk.TaskEnvironment("same")
    running = Gate()

    @env.task(retries=1, backoff=0)
    async def bad() -> int:
        raise ValueError("always")

    @env.task
    async def orphan() -> None:
        await running.enter()

    @env.task
    async def root() -> int:
        with flowsdk.group("g"), contextlib.suppress(RuntimeUserError):
            await bad()
        asyncio.create_task(orphan())  # noqa: RUF006 -- left to the root's exit
        await running.wait_running()
        return 1

    return root


def test_memory_sqlite_and_postgres_stores_keep_the_same_records(
    tmp_path: Path, pg_url: str
) -> None:
    """The same workflow read back from memory://, SQLite and PostgreSQL gives equal records."""
    memory, sqlite = new_store("memory", tmp_path), new_store("sqlite", tmp_path)
    for store in (memory, sqlite, pg_url):
        flowsdk.run(_twin(), name="twin", store=store)
    from_memory, from_sqlite = read(memory, "twin"), read(sqlite, "twin")
    assert _comparable(from_memory) == _comparable(from_sqlite)
    assert _comparable(read(pg_url, "twin")) == _comparable(from_sqlite)
    assert [a.phase for a in from_sqlite.actions] == [
        ActionPhase.SUCCEEDED,
        ActionPhase.FAILED,
        ActionPhase.ABORTED,
    ]


# -- the store protocols themselves: reader and control channel --------------------------------


def test_reader_follows_a_run_with_events_since_and_answers_run_state(store: str | Store) -> None:
    """`events_since` gives the events after a cursor; `run_state` is a keyed lookup."""
    env = flowsdk.TaskEnvironment("follow")

    @env.task
    async def leaf(i: int) -> int:
        return i

    @env.task
    async def root() -> int:
        return sum(await asyncio.gather(*(leaf(i) for i in range(3))))

    st = open_store(store)
    flowsdk.run(root, name="followed", store=st)
    everything = st.events_since("followed", -1)
    assert [e.seq for e in everything] == list(range(len(everything)))
    assert everything == read(st, "followed").events
    for cursor in range(len(everything)):  # a cursor may fall inside a packed write
        assert st.events_since("followed", cursor) == everything[cursor + 1 :], cursor
    assert st.events_since("followed", -1, attempt=1) == everything
    state = st.run_state("followed", "a2")
    assert (state.attempt, state.phase, state.target_phase) == (
        1,
        RunPhase.SUCCEEDED,
        ActionPhase.SUCCEEDED,
    )
    with pytest.raises(ActionNotFoundError, match="a0, a1, a2, a3"):
        st.run_state("followed", "a9")
    with pytest.raises(RunNotFoundError):
        st.events_since("nope", -1)
    with pytest.raises(RunNotFoundError):
        st.run_state("nope")
    st.close()


async def test_control_channel_answers_each_request_from_the_live_runner(
    store: str | Store,
) -> None:
    """`request()`: not found, applied (exactly once, with its requester), then already ended."""
    env = flowsdk.TaskEnvironment("channel")
    running = asyncio.Event()

    @env.task
    async def root() -> None:
        running.set()
        await asyncio.sleep(3600)

    st = open_store(store)
    handle = await flowsdk.start(root, name="chan", store=st)
    await running.wait()
    loop = asyncio.get_running_loop()

    def send(**fields: Any) -> ControlReply:
        request = AbortRequest(run="chan", requested_by="tester", **fields)
        return st.request(request, timeout=10)

    with concurrent.futures.ThreadPoolExecutor(
        1
    ) as pool:  # as another process would: not on the loop
        missing = await loop.run_in_executor(pool, functools.partial(send, action="a9"))
        applied = await loop.run_in_executor(pool, functools.partial(send, reason="via channel"))
        run = await handle.wait()
        ended = await loop.run_in_executor(pool, send)
    assert missing.result is None
    with pytest.raises(ActionNotFoundError, match="a9"):
        missing.unwrap()
    assert applied.unwrap().outcome is flowsdk.Outcome.APPLIED
    assert ended.unwrap().outcome is flowsdk.Outcome.ALREADY_ENDED
    abort = run.action("a0").abort
    assert abort is not None
    assert (abort.reason, abort.requested_by) == ("via channel", "tester")
    assert len([e for e in run.events if e.kind is EventKind.REQUEST]) == 1
    st.close()


def test_requests_a_blocked_runner_has_not_answered_are_listed_until_it_applies_them(
    store: str | Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`queued_requests()`: each request answered `queued`, oldest first, taken; then none.

    The body blocks the run's event loop (sync code in an `async def`): its runner
    cannot apply a request until the body lets go. None before, none once applied.
    """
    monkeypatch.setattr("flowsdk._service.ANSWER_TIMEOUT", 0.3)
    env = flowsdk.TaskEnvironment("blocked")
    entered, release = threading.Event(), threading.Event()

    @env.task
    async def stuck() -> None:
        entered.set()
        release.wait(30)  # blocks the loop, as the scenario wants (bounded by the test's wait)
        await asyncio.sleep(3600)

    with concurrent.futures.ThreadPoolExecutor(1) as pool, flowsdk.Client(store) as client:
        ended = pool.submit(flowsdk.run, stuck, name="blocked", store=store)
        try:
            assert entered.wait(30)
            assert client.queued_requests("blocked") == []
            before = datetime.now(UTC)
            answers = [
                client.stop("blocked", reason="first"),
                client.abort("blocked", reason="second"),
            ]
            after = datetime.now(UTC)
            assert [a.outcome for a in answers] == [flowsdk.Outcome.QUEUED] * 2
            # The runner's store thread takes each from the store (the loop cannot apply it).
            deadline = time.monotonic() + 30
            queued = client.queued_requests("blocked")
            while not all(q.taken for q in queued):
                assert time.monotonic() < deadline, queued
                time.sleep(0.01)
                queued = client.queued_requests("blocked")
        finally:
            release.set()
        run = ended.result(timeout=30)
        assert client.queued_requests("blocked") == []  # applied: answered, and the run ended
        with pytest.raises(RunNotFoundError, match="did you mean 'blocked'"):
            client.queued_requests("blokced")
        me = client.service.actor.name
    asked = [q.request.requested_at for q in queued]
    assert [msgspec.structs.replace(q.request, requested_at=None) for q in queued] == [
        StopRequest(run="blocked", reason="first", requested_by=me),
        AbortRequest(run="blocked", reason="second", requested_by=me),
    ]
    assert queued[0].id < queued[1].id
    assert before <= queued[0].at <= queued[1].at <= after
    assert asked[0] is not None
    assert asked[1] is not None
    assert before <= asked[0] <= asked[1] <= after
    assert run.phase.terminal
    assert run.record.stop is not None
    assert run.record.stop.reason == "first"
    # Recorded as asked, not as applied once the loop was released.
    assert run.record.stop.requested_at == asked[0]


def test_progress_and_logs_are_kept_bounded_and_read_back(store: str | Store) -> None:
    """Reports and captured log records are read back in order; an action keeps 1,000 records."""
    env = flowsdk.TaskEnvironment("traced")
    log = __import__("logging").getLogger("contract.traced")

    @env.task
    async def noisy(records: int) -> None:
        for i in range(records):
            log.info("record %d", i)
        for step in range(3):
            await flowsdk.report(step / 2, step=step, name="loss")

    @env.task
    async def main() -> None:
        await noisy(1005)
        await noisy(2)

    opened = open_store(store) if isinstance(store, str) else store
    try:
        run = flowsdk.run(main, name="traced", store=opened)
        assert run.phase is RunPhase.SUCCEEDED
        progress = opened.load_progress("traced", 1)
        assert [(p.action, p.name, p.step, p.value) for p in progress] == [
            (a, "loss", s, s / 2) for a in ("a1", "a2") for s in range(3)
        ]
        assert [(p.action, p.step) for p in opened.load_progress("traced", 1, "a2")] == [
            ("a2", 0),
            ("a2", 1),
            ("a2", 2),
        ]
        latest = opened.latest_progress("traced", 1)
        assert {a: (p.step, p.value) for a, p in latest.items()} == {
            "a1": (2, 1.0),
            "a2": (2, 1.0),
        }
        first = opened.load_logs("traced", 1, "a1")
        assert len(first) == 1000
        assert (first[0].n, first[0].message, first[-1].message) == (5, "record 5", "record 1004")
        assert {e.logger for e in first} == {"contract.traced"}
        everything = opened.load_logs("traced", 1)
        assert [e.seq for e in everything] == sorted(e.seq for e in everything)
        assert [e.message for e in everything[-2:]] == ["record 0", "record 1"]
        after = opened.load_logs("traced", 1, cursor=everything[-2].seq)
        assert [e.message for e in after] == ["record 1"]
        page = opened.load_logs("traced", 1, "a1", cursor=first[9].seq, limit=3)
        assert [e.message for e in page] == ["record 15", "record 16", "record 17"]
    finally:
        if isinstance(store, str):
            opened.close()
