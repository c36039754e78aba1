"""What a streaming store shows while a run goes on.

The run's loop holds an action's changes and builds one row of its latest
state at the writer's next round (see `flowsdk.store._writer`). These tests
pin what that must never cost a reader: a row older than an event that names
it, events out of order, or a loop that blocks hiding what the run did.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flowsdk
from flowsdk import ActionPhase, EventKind
from flowsdk.errors import RunNotFoundError
from flowsdk.store import open_store
from flowsdk.testing import Gate
from tests.runners.harness import sqlite_url
from tests.support import assert_clean

env = flowsdk.TaskEnvironment("store_live_tests")

# How far along an action is, by phase: a row may be ahead of an event, never behind.
RANK = {"QUEUED": 0, "RUNNING": 1, "STOPPING": 2}


@env.task
async def leaf(i: int) -> int:
    await asyncio.sleep(0)
    return i


HELD = Gate("held")  # never released: its bodies end cancelled


@env.task
async def sleeper() -> None:
    await HELD.enter()


@env.task
async def busy(n: int) -> int:
    """Sequential calls, a fan-out, then cancellations with a reason (not routine events)."""
    total = 0
    for i in range(n):
        total += await leaf(i)
    total += sum(await asyncio.gather(*(leaf(i) for i in range(n))))
    for _ in range(10):
        entered = HELD.entered
        sleepers = [asyncio.create_task(sleeper()) for _ in range(20)]
        await HELD.wait_running(entered + len(sleepers))
        # Not a synchronisation (every assertion holds whatever the timing): it spreads
        # the bursts over writer rounds, so that the reader reads between them.
        await asyncio.sleep(0.02)  # spreads the bursts over writer rounds
        for t in sleepers:
            t.cancel("enough")
        await asyncio.gather(*sleepers, return_exceptions=True)
    return total


def test_a_reader_never_sees_an_event_before_its_actions_row_nor_events_out_of_order(
    url: str,
) -> None:
    """Follow a live run as the console does: events by cursor, then the actions they name."""
    n = 400
    problems: list[str] = []
    seen: list[int] = []
    done = threading.Event()

    def follow() -> None:
        store = open_store(url)
        try:
            cursor = -1
            deadline = time.monotonic() + 50
            while time.monotonic() < deadline:
                finished = done.is_set()  # read before the last poll: nothing is missed
                with contextlib.suppress(RunNotFoundError):
                    events = store.events_since("live", cursor, attempt=1)
                    seqs = [e.seq for e in events]
                    if seqs != list(range(cursor + 1, cursor + 1 + len(seqs))):
                        problems.append(f"after {cursor}: {seqs[:5]}...")
                    if events:
                        cursor = seqs[-1]
                        seen.extend(seqs)
                        named = {
                            e.action: e.phase
                            for e in events
                            if e.kind is EventKind.ACTION and e.action and e.phase
                        }
                        for record in store.load_actions("live", 1, list(named)):
                            want = named[record.name]
                            if RANK.get(record.phase.value, 3) < RANK.get(want, 3):
                                problems.append(f"{record.name}: row {record.phase} event {want}")
                if finished:
                    return
                time.sleep(0.005)  # polls the store, as the console does, until the deadline
            problems.append("the run did not end in time")
        finally:
            store.close()

    reader = threading.Thread(target=follow)
    reader.start()
    try:
        run = flowsdk.run(busy, n, name="live", store=url)
    finally:
        done.set()
        reader.join(60)
    assert run.result() == 2 * sum(range(n))
    assert problems == []
    assert seen == list(range(len(run.events)))
    assert_clean(run)


def store_phase(path: Path, sql: str, *params: object) -> str | None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        row = conn.execute(sql, params).fetchone()
    return None if row is None else str(row[0])


def event_phase(path: Path, run: str, action: str, phase: str) -> str | None:
    """`phase` if the store's event log has the action's event of that phase yet."""
    store = open_store(sqlite_url(path))
    try:
        events = store.events_since(run, -1)
    except RunNotFoundError:
        return None  # the run's first write has not happened yet
    finally:
        store.close()
    return phase if any(e.action == action and e.phase == phase for e in events) else None


@env.task
async def blocker(path: str) -> list[str]:
    """Start a child, then block the loop until the store shows the child and this body."""
    child = asyncio.create_task(sleeper())  # QUEUED from here: its body would start next step
    me = flowsdk.current_action()
    at = Path(path)
    wanted: dict[str, tuple[Callable[[], str | None], str]] = {
        "this body RUNNING": (
            lambda: store_phase(
                at, "SELECT phase FROM actions WHERE run = ? AND name = ?", me.run, me.name
            ),
            "RUNNING",
        ),
        "its child QUEUED": (
            lambda: store_phase(
                at, "SELECT phase FROM actions WHERE run = ? AND parent = ?", me.run, me.name
            ),
            "QUEUED",
        ),
        "its RUNNING event": (lambda: event_phase(at, me.run, me.name, "RUNNING"), "RUNNING"),
    }
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while wanted and time.monotonic() < deadline:
        for what, (read, phase) in list(wanted.items()):
            if read() == phase:
                seen.append(what)
                del wanted[what]
        time.sleep(0.01)  # noqa: ASYNC251 - blocks the loop on purpose, until the deadline
    child.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await child
    return seen


def test_a_body_that_blocks_the_loop_is_shown_running_with_what_it_started(
    tmp_path: Path,
) -> None:
    """While the loop is blocked, the writer records what the run did before the block."""
    path = tmp_path / "s.db"
    run = flowsdk.run(blocker, str(path), name="blocked", store=sqlite_url(path))
    assert sorted(run.result()) == ["its RUNNING event", "its child QUEUED", "this body RUNNING"]
    assert [a.phase for a in run.actions] == [ActionPhase.SUCCEEDED, ActionPhase.ABORTED]
    assert_clean(run)


def test_the_writer_asks_again_once_it_has_taken_the_last_answer_or_after_a_second() -> None:
    """Behind its queue, the writer lets the loop's held changes merge: fewer rows per action."""
    from flowsdk.store._held import EVENT, HELD_WHILE_BEHIND, HeldChanges

    def asked(held: HeldChanges) -> bool:
        """Whether the writer has asked the loop and is waiting for its answer."""
        return held._held_asked is not None

    def take(held: HeldChanges, n: int) -> None:
        """What the writer's round does with its queue: take (at most) `n` operations."""
        for _ in range(min(n, len(held._ops))):
            held._ops.popleft()
        held._answer_left -= n

    loop = asyncio.new_event_loop()
    try:
        held = HeldChanges(loop)
        held._ops.append((EVENT, None))  # e.g. a progress report, queued at once
        held.routine(0, 0.0, "a0", "QUEUED")
        held._ask_for_held()
        assert asked(held)
        loop.run_until_complete(asyncio.sleep(0))  # the loop answers: sends what it held
        assert not asked(held)
        held.routine(1, 0.0, "a0", "RUNNING")
        held._ask_for_held()
        assert not asked(held)  # its last answer is not written yet
        held._ops.append((EVENT, None))  # queued meanwhile, after the answer
        take(held, 2)  # the round takes the answer (and what was before it)
        held._ask_for_held()
        assert asked(held)  # keeping up: asks every round, whatever else is queued
        loop.run_until_complete(asyncio.sleep(0))
        held.routine(2, 0.0, "a0", "SUCCEEDED")
        take(held, 1)  # behind: the round took part of the queue, not the answer
        held._ask_for_held()
        assert not asked(held)
        held._held_last -= HELD_WHILE_BEHIND  # as if a second had passed
        held._ask_for_held()
        assert asked(held)  # a second at most between two asks
        loop.run_until_complete(asyncio.sleep(0))
        assert [op.seq for op in held._ops] == [1, 2]  # each event once, in order
    finally:
        loop.close()


class _Action:
    """What `HeldChanges` needs of an action: something to hold, with a phase to show."""

    def __init__(self, phase: str) -> None:
        self.phase = phase


class _Rows:
    """A row builder for `HeldChanges` alone: an action's row is its latest phase."""

    def build(self, action: _Action) -> Any:
        return action.phase

    build_at_once = build


def test_the_loop_answers_an_ask_that_lands_in_a_burst_once_the_burst_has_passed() -> None:
    """A wide fan-out's step moves thousands of actions: one row each, not one before and after."""
    from flowsdk.store._held import BURST, HeldChanges

    loop = asyncio.new_event_loop()
    try:
        held = HeldChanges(loop)
        rows = _Rows()
        actions = [_Action("QUEUED") for _ in range(4 * BURST)]

        def start(action: _Action) -> None:
            action.phase = "RUNNING"
            held.changed(action, rows)
            loop.call_soon(end, action)

        def end(action: _Action) -> None:
            action.phase = "SUCCEEDED"
            held.changed(action, rows)

        for action in actions:
            held.changed(action, rows)
            loop.call_soon(start, action)
        held.routine(0, 0.0, "a0", "QUEUED")
        # The writer's ask arrives behind the burst's first step: answered at once,
        # it would find every action RUNNING, and each would get a second row.
        held._ask_for_held()
        loop.run_until_complete(asyncio.sleep(0))
        assert list(held._ops)[: len(actions)] == ["SUCCEEDED"] * len(actions)
        assert len(held._ops) == len(actions) + 1  # and the event, after the rows

        # Few callbacks ready: answered on the loop's next step, whatever the phases.
        held._ops.clear()  # the writer takes the answer
        held._answer_left = 0
        actions[0].phase = "FAILED"
        held.changed(actions[0], rows)
        held._ask_for_held()
        loop.run_until_complete(asyncio.sleep(0))
        assert list(held._ops) == ["FAILED"]
    finally:
        loop.close()


def test_a_loop_that_stays_busy_still_answers_the_writer() -> None:
    """More than BURST callbacks ready at every step: the answer waits at most HELD_IN_BURST."""
    from flowsdk.store._held import BURST, HeldChanges

    loop = asyncio.new_event_loop()
    try:
        held = HeldChanges(loop)
        rows = _Rows()
        action = _Action("RUNNING")
        held.changed(action, rows)
        steps = [0]

        def busy() -> None:
            steps[0] += 1
            if not held._ops:
                loop.call_soon(busy)  # busy until the answer comes

        for _ in range(2 * BURST):
            loop.call_soon(busy)
        held._ask_for_held()

        async def until_answered() -> None:
            while not held._ops:
                await asyncio.sleep(0)

        loop.run_until_complete(asyncio.wait_for(until_answered(), timeout=30))
        assert list(held._ops) == ["RUNNING"]
        assert steps[0] > 2 * BURST  # it did wait behind the busy steps
    finally:
        loop.close()


def test_the_writer_copies_a_blocked_loops_rows_while_the_loop_still_adds_to_them() -> None:
    """The copy is one snapshot: the loop may add changes in the middle of it.

    On Python 3.11 allocating an object can run a garbage collection, and the
    Python code a collection runs (callbacks, finalizers) lets another thread
    take the GIL. The writer copies a blocked loop's held rows while the loop
    may still note changes (a step of tens of thousands of actions can take
    over a second): here a collection callback, run in the middle of the copy,
    notes a change as the loop would. Copying by iterating the dict failed with
    "dictionary changed size during iteration", and that failure stopped the run.
    """
    import gc

    from flowsdk.store._held import LOOP_BLOCKED_WARNING, HeldChanges

    loop = asyncio.new_event_loop()
    threshold = gc.get_threshold()
    try:
        held = HeldChanges(loop)
        rows = _Rows()
        # More than CPython keeps ready-made pairs for: the copy allocates new ones.
        for _ in range(5_000):
            held.changed(_Action("RUNNING"), rows)
        late = _Action("QUEUED")

        starts = [0]

        def loop_notes_a_change(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                starts[0] += 1
                if starts[0] == 5:  # in the middle of the copy, if the copy collects
                    held.changed(late, rows)

        held._ask_for_held()  # asked; the loop never answers
        assert held._held_asked is not None
        held._held_asked -= LOOP_BLOCKED_WARNING  # as if a second had passed
        gc.callbacks.append(loop_notes_a_change)
        gc.set_threshold(1)  # a collection at each allocation the copy makes
        try:
            held._ask_for_held()
        finally:
            gc.set_threshold(*threshold)
            gc.callbacks.remove(loop_notes_a_change)
        if starts[0] >= 5:
            assert late in held._held  # the loop's change, noted during the copy
        copied = list(held._ops)
        assert copied[:5_000] == ["RUNNING"] * 5_000
        assert copied[5_000:] in ([], ["QUEUED"])  # before or after the snapshot, never half
    finally:
        loop.close()
