"""A long run keeps bounded memory (SPEC §10, 1M actions).

Past `KEEP_IN_MEMORY` started actions, a finished action is forgotten by the
runtime. On a store that streams every change the store has its record,
events are no longer kept in memory, and the ended run's records are read
back from the store; on `memory://` the run's log keeps it compact. Control
requests naming a forgotten action or group still get their answer. The threshold is lowered
here so that the tests stay small. On every store, what a finished action
returned or raised is let go once its caller has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import random
import tracemalloc
import types
import weakref
from pathlib import Path
from typing import Any, cast

import pytest

import flowsdk
from flowsdk import _runtime
from flowsdk._action import ActionState, current
from flowsdk._tree import Forgotten
from flowsdk.errors import ActionNotFoundError, RuntimeUserError
from flowsdk.testing import Gate
from tests.support import open_files

KEEP = 20


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_runtime, "KEEP_IN_MEMORY", KEEP)


def _held() -> int:
    """How many actions the calling action's runtime holds."""
    state = current.get()
    assert state is not None
    return len(state.runtime.actions)  # type: ignore[attr-defined]


env = flowsdk.TaskEnvironment("spill")


@env.task
async def leaf(i: int) -> int:
    await asyncio.sleep(0)
    return i * 2


@env.task
async def waves(count: int, size: int) -> list[int]:
    held = []
    for w in range(count):
        with flowsdk.group(f"wave{w}"):
            await asyncio.gather(*(leaf(i) for i in range(size)))
        held.append(_held())
    return held


def test_a_long_sqlite_run_forgets_finished_actions_and_reads_its_records_back(
    tmp_path: Path,
) -> None:
    run = flowsdk.run(waves, 10, 30, store=f"sqlite:///{tmp_path / 's.db'}")
    held = run.result()
    # Past the threshold, what the runtime holds does not grow with the waves.
    assert max(held[2:]) <= KEEP + 2, held
    assert len(run.actions) == 301
    assert {a.phase for a in run.actions} == {flowsdk.ActionPhase.SUCCEEDED}
    assert [a.name for a in run.actions] == [f"a{i}" for i in range(301)]
    # Every transition is in the log: QUEUED, RUNNING and SUCCEEDED of each action.
    assert [e.seq for e in run.events] == list(range(len(run.events)))
    assert sum(1 for e in run.events if e.action is not None) == 3 * 301
    with flowsdk.Client(f"sqlite:///{tmp_path / 's.db'}") as client:
        stored = client.get_run(run.name)
    assert [a.name for a in stored.actions] == [a.name for a in run.actions]


def test_reading_a_spilled_run_back_leaves_no_connection_open(tmp_path: Path) -> None:
    """A run given a URL opened its store: reading its records back closes what it opened."""
    run = flowsdk.run(waves, 3, 30, store=f"sqlite:///{tmp_path / 's.db'}")
    assert len(run.actions) == 91  # read back from the file
    assert len(run.events) == 3 * 91 + 2
    # The run is still alive, and nothing of its store is open (not left to the collector).
    assert open_files(tmp_path / "s.db") == []


def _picture(run: flowsdk.Run[Any]) -> list[object]:
    """What a run recorded, but its times: actions, values and the event log."""
    actions = [(a.name, a.parent, a.task, a.group, a.phase, a.key, a.attempt) for a in run.actions]
    payloads = run.payloads()
    payloads["a0"] = (payloads["a0"][0], None)  # the root returns what it held: not the same
    events = [(e.seq, e.kind, e.action, e.phase, e.cause, e.message) for e in run.events]
    return [actions, sorted(payloads.items()), events]


def test_a_long_memory_run_keeps_finished_actions_compact_and_records_them_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`memory://` has no rows to read back: the run keeps its finished actions compact.

    Past the threshold the runtime holds no more actions as the waves go on,
    and the ended run's records, values and event log are those of the same
    run that keeps every action as it is.
    """
    run = flowsdk.run(waves, 4, 30, store="memory://")
    held = run.result()
    assert max(held[2:]) <= KEEP + 2, held
    assert len(run.actions) == 121
    assert [a.name for a in run.actions] == [f"a{i}" for i in range(121)]
    assert sum(1 for e in run.events if e.action is not None) == 3 * 121
    monkeypatch.setattr(_runtime, "KEEP_IN_MEMORY", 10_000)
    whole = flowsdk.run(waves, 4, 30, store="memory://")
    assert whole.result()[-1] == 121
    assert _picture(run) == _picture(whole)


GATES: list[Gate] = []  # the current test's (a gate is entered once)


@env.task
async def holder() -> str:
    await asyncio.gather(*(leaf(i) for i in range(3 * KEEP)))
    with flowsdk.group("late"):
        await leaf(0)
    # The leaves above are forgotten by now: requests naming them are still answered.
    await GATES[-1].enter()
    return "done"


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_requests_naming_forgotten_actions_are_answered(tmp_path: Path, kind: str) -> None:
    store = f"sqlite:///{tmp_path / 's.db'}" if kind == "sqlite" else "memory://"
    GATES.append(gate := Gate("holder"))
    handle = await flowsdk.start(holder, store=store)
    await gate.wait_running(1)
    runtime = handle._runtime
    assert runtime.forgotten.spilled is (kind == "sqlite")
    assert 1 not in runtime.actions
    result = await handle.abort("a1", reason="too late")
    assert result.outcome is flowsdk.Outcome.ALREADY_ENDED
    assert result.phase == "SUCCEEDED"
    result = await handle.abort(group="late", reason="too late")
    assert result.outcome is flowsdk.Outcome.ALREADY_ENDED
    with pytest.raises(ActionNotFoundError):
        await handle.abort(f"a{10 * KEEP}")
    with pytest.raises(ActionNotFoundError):
        await handle.abort(group="never")
    gate.release()
    run = await handle.wait()
    assert run.result() == "done"
    assert run.phase is flowsdk.RunPhase.SUCCEEDED
    assert len(run.actions) == 3 * KEEP + 2


@dataclasses.dataclass
class Payload:
    """A recordable value that a weak reference can watch."""

    data: list[int]


freed_env = flowsdk.TaskEnvironment("freed")
WATCHED: list[weakref.ref[Payload]] = []


@freed_env.task
async def make() -> Payload:
    return Payload([1, 2, 3])


@freed_env.task
async def fail() -> None:
    model = Payload([4])  # a local that the error's traceback keeps alive
    WATCHED.append(weakref.ref(model))
    raise ValueError("no good")


@freed_env.task
async def caller() -> list[bool]:
    value = await make()
    WATCHED.append(weakref.ref(value))
    del value
    with contextlib.suppress(RuntimeUserError):
        await fail()
    gc.collect()  # only what something still refers to survives
    return [ref() is None for ref in WATCHED]  # while the run still goes on


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_what_a_finished_action_returned_or_raised_is_let_go_once_its_caller_has_it(
    kind: str, tmp_path: Path
) -> None:
    """A long run does not hold every value its actions returned, nor their tracebacks."""
    WATCHED.clear()
    store = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 's.db'}"
    run = flowsdk.run(caller, store=store)
    assert run.result() == [True, True]
    assert run.action("a1").phase is flowsdk.ActionPhase.SUCCEEDED
    assert run.action("a2").error is not None  # the record keeps the error's description


def _ended(seq: int, phase: flowsdk.ActionPhase, group: str | None = None) -> ActionState:
    """What `Forgotten.add` reads of a finished action."""
    return cast(ActionState, types.SimpleNamespace(seq=seq, phase=phase, group=group))


def test_forgotten_actions_that_all_ended_alike_keep_next_to_no_memory() -> None:
    """The forgotten actions of a fan-out that succeeded cost a few bytes, not one each."""
    count = 200_000
    order = list(range(1, count))  # a0, the root, is live: never forgotten
    random.Random(7).shuffle(order)  # actions end in any order
    action = types.SimpleNamespace(seq=0, phase=flowsdk.ActionPhase.SUCCEEDED, group=None)
    tracemalloc.start()
    try:
        forgotten = Forgotten()
        for seq in order:
            action.seq = seq
            forgotten.add(cast(ActionState, action))
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # The chunks that never complete (a0's, the last) keep a byte per action; the rest, one code.
    assert kept < 16 * 1024, kept  # a byte per action would be 200,000
    assert forgotten.get("a0", 0) is None
    for seq in (1, 4095, 4096, 100_000, count - 1):
        ended = forgotten.get(f"a{seq}", seq)
        assert ended is not None
        assert (ended.name, ended.phase) == (f"a{seq}", flowsdk.ActionPhase.SUCCEEDED)
    assert forgotten.get(f"a{count}", count) is None


def test_forgotten_actions_keep_each_its_own_phase_and_group() -> None:
    phases = [flowsdk.ActionPhase.SUCCEEDED, flowsdk.ActionPhase.FAILED]
    forgotten = Forgotten()
    for seq in range(3 * 4096):
        if seq != 5000:  # still live
            forgotten.add(_ended(seq, phases[seq % 7 == 0], "late" if seq == 9000 else None))
    forgotten.add(_ended(20_000, flowsdk.ActionPhase.ABORTED))
    for seq in (0, 6, 7, 4096, 4095 + 4096, 8192, 8197):
        ended = forgotten.get(f"a{seq}", seq)
        assert ended is not None, seq
        assert ended.phase is phases[seq % 7 == 0], seq
    assert forgotten.get("a5000", 5000) is None
    aborted = forgotten.get("a20000", 20_000)
    assert aborted is not None
    assert aborted.phase is flowsdk.ActionPhase.ABORTED
    for seq in (3 * 4096, 19_999, 20_001, 10**9):
        assert forgotten.get(f"a{seq}", seq) is None
    assert forgotten.groups == {"late"}
