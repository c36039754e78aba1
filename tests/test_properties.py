"""The runtime's guarantees, checked on random action trees (hypothesis).

They are: one terminal phase per action, nothing left running, no body after closure,
the outcome each parent sees, no cancel-count leak, and an abort reaching exactly its
subtree.

Each example is a tree of at most ~30 actions (depth <= 6, width <= 8) run by
one task, `node(path)`, whose behaviour is looked up by its path:

- leaves return a value, raise a user exception, sleep until cancelled (a
  detached child nobody awaits: root exit ends it), get `t.cancel()`ed by their
  parent, get `t.cancel()`ed and absorb it (catch `CancelledError` and return a
  value: as in asyncio, a SUCCEEDED child whose parent gets that value), or get
  aborted or marked as failed through the `RunHandle`;
- inner nodes start their children (as asyncio tasks or with a direct await),
  then either gather them with `return_exceptions=True` and return, or wait
  until they themselves are cancelled by their parent, aborted or marked as failed.

The test aborts (or marks as failed) each such target once its whole subtree has
started (events, no sleeps), in a drawn order and after a drawn number of loop
yields; in some examples it stops the run instead, abandoning what is in progress,
once a drawn number of those requests went out (then some actions may never have
started, or never been called). It checks every guarantee on the records, the event
log and what each parent saw.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowsdk
from flowsdk import ActionPhase, EventKind, Task
from flowsdk.errors import ActionAbortedError, ActionMarkedFailedError, RuntimeUserError
from tests.support import assert_clean

# How many random trees: 60 in the suite, more in a soak.
EXAMPLES = int(os.environ.get("FLOWSDK_PROPERTY_EXAMPLES", "60"))
# The store the runs record in: memory in the suite; `make soak` also runs them on SQLite
# (FLOWSDK_PROPERTY_STORE=sqlite), where the records and events are read back from the file.
ON_SQLITE = os.environ.get("FLOWSDK_PROPERTY_STORE", "memory") == "sqlite"
MAX_DEPTH = 6
MAX_WIDTH = 8
MAX_NODES = 30

LEAF_KINDS = ("value", "raise", "sleep", "cancel", "absorb", "abort", "fail")
INNER_KINDS = ("gather", "gather", "cancel", "abort", "fail")
# The key of the run's stop-and-abandon in the outcomes of the operator's requests.
STOPPED = "stop"
# Kinds an operator stops through the `RunHandle`: its own request, applied or not.
OPERATED = {"abort": ("ABORTED", "external"), "fail": ("FAILED", "mark_failed")}
# Kinds that end only when cancelled: their parent must not await them directly.
TASK_ONLY = ("sleep", "cancel", "absorb")
# Kinds their parent cancels with `t.cancel()` once they have started.
CANCELLED_BY_PARENT = ("cancel", "absorb")


@dataclass(frozen=True)
class Node:
    """One action of the tree: what its body does, and how its parent awaits it."""

    kind: str
    direct: bool = False
    children: tuple[Node, ...] = ()
    inner: bool = False


def _natural(node: Node) -> tuple[str, str | None]:
    """(phase, cause) the action ends with when nothing above it interferes."""
    if node.kind in ("value", "absorb") or (node.inner and node.kind == "gather"):
        return ("SUCCEEDED", None)
    return {
        "raise": ("FAILED", None),
        "sleep": ("ABORTED", "root_exit"),
        "cancel": ("ABORTED", "cancelled"),
        **OPERATED,
    }[node.kind]


@st.composite
def _subtree(draw: st.DrawFn, depth: int, budget: list[int]) -> Node:
    if depth < MAX_DEPTH and budget[0] > 0 and draw(st.booleans()):
        kind = draw(st.sampled_from(INNER_KINDS))
        width = draw(st.integers(0, min(MAX_WIDTH, budget[0])))
        budget[0] -= width
        children = tuple(draw(_subtree(depth + 1, budget)) for _ in range(width))
        inner = True
    else:
        kind = draw(st.sampled_from(LEAF_KINDS))
        children = ()
        inner = False
    direct = kind not in TASK_ONLY and draw(st.booleans())
    return Node(kind, direct, children, inner)


@st.composite
def trees(draw: st.DrawFn) -> Node:
    """A root (gathering, or waiting to be aborted) and up to MAX_NODES actions below it."""
    budget = [MAX_NODES]
    kind = draw(st.sampled_from(("gather", "gather", "gather", "abort")))
    width = draw(st.integers(0, MAX_WIDTH))
    budget[0] -= width
    children = tuple(draw(_subtree(1, budget)) for _ in range(width))
    return Node(kind, False, children, inner=True)


def _walk(node: Node, path: str = "r") -> Iterator[tuple[str, Node]]:
    yield path, node
    for i, child in enumerate(node.children):
        yield from _walk(child, f"{path}.{i}")


def _ancestors(path: str) -> list[str]:
    """Strict ancestors of `path`, nearest first."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


class Scenario:
    """The plan of one example and everything its bodies observed."""

    def __init__(self, tree: Node) -> None:
        self.nodes = dict(_walk(tree))
        self.started = {path: asyncio.Event() for path in self.nodes}
        self.progress = asyncio.Event()
        self.names: dict[str, str] = {}
        self.returned: dict[str, int] = {}
        self.raised: dict[str, ValueError] = {}
        self.views: dict[str, dict[str, object]] = {}
        self.violations: list[str] = []
        self.aborted: set[str] = set()
        self.stopped = False  # a stop-and-abandon was applied: no body may start after it
        self.root_done = False
        self.hosts: list[asyncio.Task[int]] = []

    def mark_started(self, path: str) -> None:
        self.started[path].set()
        self.progress.set()

    def check_cancelling(self, path: str, where: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        # The body's own cancellation may have been delivered meanwhile (a stop-and-abandon
        # in the step its child ended in): then it is pending, and counted once, as in
        # asyncio; the body sees it at its next `await`. No other cancel may be left over.
        own = 0 if flowsdk.current_action().abort is None else 1
        if task.cancelling() > own:
            self.violations.append(f"{path}: cancelling()={task.cancelling()} after {where}")

    async def body(self, path: str, task: Task[[str], int]) -> int:
        self.names[path] = flowsdk.current_action().name
        if self.root_done:
            self.violations.append(f"{path}: body started after the root finished")
        if self.stopped:
            self.violations.append(f"{path}: body started after the run was stopped")
        if any(p in self.aborted for p in [path, *_ancestors(path)]):
            self.violations.append(f"{path}: body started after an abort of it or an ancestor")
        try:
            node = self.nodes[path]
            if node.inner:
                return await self.inner(path, node, task)
            return await self.leaf(path, node)
        finally:
            if path == "r":
                self.root_done = True

    async def leaf(self, path: str, node: Node) -> int:
        self.mark_started(path)
        if node.kind == "value":
            self.returned[path] = len(path)
            return len(path)
        if node.kind == "raise":
            self.raised[path] = ValueError(path)
            raise self.raised[path]
        if node.kind == "absorb":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.returned[path] = len(path)
                return len(path)
        await asyncio.sleep(3600)
        raise AssertionError(f"{path} was never cancelled")

    async def inner(self, path: str, node: Node, task: Task[[str], int]) -> int:
        view = self.views.setdefault(path, {})
        children = [(f"{path}.{i}", child) for i, child in enumerate(node.children)]
        tasks: dict[str, asyncio.Task[int]] = {}
        for cpath, child in children:
            if not child.direct:
                tasks[cpath] = asyncio.create_task(task(cpath))
                self.hosts.append(tasks[cpath])
        for cpath, child in children:
            if child.kind in CANCELLED_BY_PARENT:
                await self.started[cpath].wait()
                tasks[cpath].cancel()
        for cpath, child in children:
            if child.direct:
                try:
                    view[cpath] = await task(cpath)
                except (RuntimeUserError, ActionAbortedError) as exc:
                    view[cpath] = exc
                    self.check_cancelling(path, f"catching {type(exc).__name__} from {cpath}")
        for cpath in tasks:
            await self.started[cpath].wait()
        self.mark_started(path)
        awaited = [p for p in tasks if self.nodes[p].kind != "sleep"]
        if node.kind == "gather":
            results = await asyncio.gather(*(tasks[p] for p in awaited), return_exceptions=True)
            view.update(zip(awaited, results, strict=True))
            self.check_cancelling(path, "gather")
            self.returned[path] = len(path)
            return len(path)
        await asyncio.gather(
            *(tasks[p] for p in awaited), asyncio.sleep(3600), return_exceptions=True
        )
        raise AssertionError(f"{path} was never cancelled")


@dataclass(frozen=True)
class Stop:
    """A stop-and-abandon: after `after` of the operator's requests, then `yields` loop steps."""

    after: int
    yields: int


async def _drive(
    sc: Scenario, order: list[str], yields: dict[str, int], stop: Stop | None, store: str
) -> None:
    env = flowsdk.TaskEnvironment("props")

    @env.task
    async def node(path: str) -> int:
        return await sc.body(path, node)

    handle = await flowsdk.start(node, "r", store=store)
    outcomes: dict[str, str] = {}
    remaining = list(order)
    async with asyncio.timeout(30):  # a deadlock guard, not a timing assertion
        while remaining or stop is not None:
            sent = len(order) - len(remaining)
            if stop is not None and sent == stop.after:
                for _ in range(stop.yields):
                    await asyncio.sleep(0)
                result = await handle.stop(abandon=True, reason="property")
                assert result.outcome in ("applied", "already_ended"), result
                outcomes[STOPPED] = result.outcome
                sc.stopped = result.outcome == "applied"
                break
            ready = [p for p in remaining if sc.started[p].is_set()]
            if not ready:
                sc.progress.clear()
                await sc.progress.wait()
                continue
            target = ready[0]
            remaining.remove(target)
            for _ in range(yields[target]):
                await asyncio.sleep(0)
            sc.aborted.add(target)
            if target == "r":
                result = await handle.abort(reason="property")
            elif sc.nodes[target].kind == "fail":
                result = await handle.mark_failed(sc.names[target], reason="property")
            else:
                result = await handle.abort(sc.names[target], reason="property")
            assert result.outcome in ("applied", "already_ended"), result
            outcomes[target] = result.outcome
        run = await handle.wait()
        await asyncio.gather(*sc.hosts, return_exceptions=True)
    assert handle.phase.terminal
    _check(sc, run, outcomes)
    me = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    # Abandoned bodies are not waited for: cancelled, they end within a few steps.
    for _ in range(100 if sc.stopped else 0):
        if not pending:
            break
        await asyncio.sleep(0)
        pending = [t for t in pending if not t.done()]
    assert not pending, pending


def _check(sc: Scenario, run: flowsdk.Run[int], outcomes: dict[str, str]) -> None:
    # One terminal phase and one terminal event each, all terminal.
    assert_clean(run)
    assert not sc.violations, sc.violations  # no body after closure, no cancel-count leak
    records = {a.name: a for a in run.actions}
    if STOPPED in outcomes:
        # Stopped, some may never have been called, or never started: those are ABANDONED.
        assert set(sc.names.values()) <= set(records)
        started = {e.action for e in run.events if e.phase == "RUNNING"}
        for name in set(records) - set(sc.names.values()):
            assert name not in started, name
            record = records[name]
            assert record.abort is not None, name
            assert (record.phase.value, record.abort.cause.value) == ("ABANDONED", "stop"), name
    else:
        assert sorted(records) == sorted(sc.names.values())
        assert set(sc.names) == set(sc.nodes)
    for path, name in sc.names.items():
        ancestors = _ancestors(path)
        assert records[name].parent == (sc.names[ancestors[0]] if ancestors else None)

    terminal = {p.value for p in ActionPhase if p.terminal}
    first_stop: dict[str, int] = {}
    last_event: dict[str, str] = {}
    ended: dict[str, int] = {}
    for event in run.events:
        if event.kind is not EventKind.ACTION or event.action is None:
            continue
        assert last_event.get(event.action) not in terminal, f"{event} after a terminal phase"
        last_event[event.action] = event.phase or ""
        if event.phase == "STOPPING" or event.phase in terminal:
            first_stop.setdefault(event.action, event.seq)
        if event.phase in terminal:
            ended[event.action] = event.seq
    for name, record in records.items():
        assert last_event[name] == record.phase.value, name

    # When each disturber hit: an applied abort at its request event, a parent's
    # cancel at the cancelled action's first STOPPING (or terminal) event.
    hit: dict[str, int] = {}
    for path, node in sc.nodes.items():
        if path not in sc.names:
            continue  # never started (stopped first)
        name = sc.names[path]
        if node.kind in CANCELLED_BY_PARENT:
            hit[path] = first_stop[name]
        elif outcomes.get(path) == "applied":
            wanted = None if path == "r" else name
            hit[path] = next(
                e.seq
                for e in run.events
                if e.kind is EventKind.REQUEST and e.action == wanted and e.reason == "property"
            )

    # A stop-and-abandon ends every action still in progress when it is applied.
    stop_seq = None
    if outcomes.get(STOPPED) == "applied":
        stop_seq = next(
            e.seq
            for e in run.events
            if e.kind is EventKind.REQUEST and (e.message or "").startswith("stop (abandon)")
        )

    # Abort scope (and the outcome phases): each action's phase follows from the plan and
    # from what was aborted or cancelled above it before it was itself stopped.
    for path, node in sc.nodes.items():
        if path not in sc.names:
            continue
        record = records[sc.names[path]]
        got = (record.phase.value, record.abort.cause.value if record.abort else None)
        allowed: set[tuple[str, str | None]]
        if stop_seq is not None and ended[record.name] > stop_seq:
            allowed = {("ABANDONED", "stop")}
        elif node.kind in OPERATED and outcomes.get(path) == "applied":
            allowed = {OPERATED[node.kind]}
        else:
            mine = first_stop[sc.names[path]]
            disturbers = [a for a in _ancestors(path) if a in hit and hit[a] < mine]
            if not disturbers:
                allowed = {_natural(node)}
            else:
                allowed = {("ABORTED", "ancestor")}
                by_code = all(sc.nodes[a].kind == "cancel" for a in disturbers)
                if node.kind == "sleep" and by_code:
                    # Not awaited by the cancelled ancestor: its lifetime is the root's.
                    allowed.add(("ABORTED", "root_exit"))
                if node.kind == "absorb" and by_code:
                    # Workflow code's cancel reached it through an ancestor: absorbed.
                    allowed.add(("SUCCEEDED", None))
                if by_code and node.kind in ("value", "raise", "gather"):
                    # As in plain asyncio, `t.cancel()` travels down one await level per
                    # loop step: an action that ends by itself may end before it arrives.
                    allowed.add(_natural(node))
        assert got in allowed, f"{path} ({record.name}, {node.kind}): {got} not in {allowed}"

    # Outcome mapping: what each parent saw matches the child's recorded phase.
    for parent, view in sc.views.items():
        for child, seen in view.items():
            record = records[sc.names[child]]
            where = f"{parent} saw {child} ({record.name} {record.phase.value}): {seen!r}"
            if record.phase is ActionPhase.SUCCEEDED:
                assert seen == sc.returned[child], where
            elif record.phase is ActionPhase.FAILED:
                assert isinstance(seen, RuntimeUserError), where
                if record.abort is not None:  # marked as failed: that is the error's cause
                    assert record.abort.cause.value == "mark_failed", where
                    assert isinstance(seen.__cause__, ActionMarkedFailedError), where
                    assert outcomes.get(child) == "applied", where
                else:
                    assert seen.__cause__ is sc.raised[child], where
                assert seen.action == record.name, where
            elif record.abort is not None and record.abort.cause.value == "external":
                assert isinstance(seen, ActionAbortedError), where
                assert seen.action == record.name, where
                assert outcomes.get(child) == "applied", where
            else:
                assert isinstance(seen, asyncio.CancelledError), where

    if stop_seq is not None:
        assert run.phase is flowsdk.RunPhase.STOPPED
        return
    root = records[sc.names["r"]]
    if outcomes.get("r") == "applied":
        assert run.phase is flowsdk.RunPhase.ABORTED
        assert root.abort is not None
        assert root.abort.cause.value == "external"
    else:
        assert run.phase is flowsdk.RunPhase.SUCCEEDED
        assert run.result() == len("r")


def _example(tree: Node, data: st.DataObject) -> None:
    sc = Scenario(tree)
    targets = [p for p, n in sc.nodes.items() if n.kind in OPERATED]
    order = data.draw(st.permutations(targets), label="abort order")
    yields = data.draw(
        st.fixed_dictionaries({p: st.integers(0, 3) for p in targets}), label="yields"
    )
    # Two examples in three do not stop the run.
    stop = data.draw(
        st.none() | st.none() | st.builds(Stop, st.integers(0, len(targets)), st.integers(0, 3)),
        label="stop-and-abandon",
    )
    if not ON_SQLITE:
        asyncio.run(_drive(sc, list(order), yields, stop, "memory://"))
        return
    with tempfile.TemporaryDirectory(prefix="flowsdk-property-") as folder:
        asyncio.run(_drive(sc, list(order), yields, stop, f"sqlite:///{folder}/runs.db"))


@settings(
    # `make soak` raises it (FLOWSDK_PROPERTY_EXAMPLES=10000).
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    # The leak bundle's fixtures run once around all examples, which is what we want.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tree=trees(), data=st.data())
def test_random_trees_keep_guarantees_1_to_7(tree: Node, data: st.DataObject) -> None:
    """One terminal state, lifetime, no body after closure, outcome mapping, abort scope."""
    _example(tree, data)
