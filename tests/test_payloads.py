"""Recording action inputs and outputs with msgspec (SPEC §6 "Recording and retry").

Inputs are encoded (and so snapshotted) by the call `task(...)` itself; the
body receives a decoded snapshot typed by its annotations. Outputs are encoded
when the body returns. What cannot be recorded, or is over `max_payload`,
raises `SerializationError` and leaves nothing half-stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import enum
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import flowsdk
from flowsdk._payload import encode_inputs, inputs_digest, same_inputs
from flowsdk.errors import RuntimeUserError, SerializationError
from flowsdk.testing import sqlite_url
from tests.support import assert_clean, phases

# Types a body may take and return; at module level so that the annotations
# (strings, under `from __future__ import annotations`) resolve.


@dataclasses.dataclass
class Point:
    x: int
    y: float


class Box(msgspec.Struct, frozen=True):
    label: str
    corners: list[Point]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Bundle:
    point: Point
    box: Box
    when: datetime.datetime
    day: datetime.date
    ident: uuid.UUID
    color: Color
    blob: bytes
    nested: dict[str, list[tuple[int, str]]]
    numbers: set[int]
    count: int
    ratio: float
    ok: bool
    nothing: None


SAMPLE = Bundle(
    point=Point(1, 2.5),
    box=Box(label="b", corners=[Point(0, 0.0), Point(3, 4.0)]),
    when=datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.UTC),
    day=datetime.date(2024, 5, 6),
    ident=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    color=Color.BLUE,
    blob=b"\x00\xff\x10",
    nested={"k": [(1, "a"), (2, "b")], "empty": []},
    numbers={3, 1, 2},
    count=7,
    ratio=0.25,
    ok=True,
    nothing=None,
)


def stored_payloads(db: Path, run: str) -> dict[str, tuple[bytes | None, bytes | None]]:
    """Read each action's recorded (inputs, output) straight from the SQLite file."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT name, inputs, output FROM actions WHERE run = ? ORDER BY seq", (run,)
        ).fetchall()
    return {name: (inputs, output) for name, inputs, output in rows}


@contextlib.contextmanager
def unrecordable(kind: str) -> Iterator[object]:
    """A value msgspec cannot encode: a lambda, an open socket, an asyncio.Lock."""
    if kind == "socket":
        with socket.socket() as sock:
            yield sock
    elif kind == "lock":
        yield asyncio.Lock()
    else:
        yield lambda: 1


# -- inputs that cannot be recorded ----------------------------------------------------


@pytest.mark.parametrize("kind", ["lambda", "socket", "lock"])
def test_unrecordable_argument_raises_from_the_call_naming_task_and_parameter(kind: str) -> None:
    """Unrecordable argument: SerializationError (TypeError) from task(...); no action, no body."""
    env = flowsdk.TaskEnvironment("i1")
    ran: list[object] = []
    caught: list[SerializationError] = []

    @env.task
    async def child(size: int, handler: object = None) -> None:
        ran.append(handler)

    @env.task
    async def root() -> None:
        with unrecordable(kind) as value:
            try:
                _ = child(1, value)  # never awaited: the call itself must raise
            except SerializationError as exc:
                caught.append(exc)
            try:
                _ = child(2, handler=value)
            except SerializationError as exc:
                caught.append(exc)

    run = flowsdk.run(root)
    assert len(caught) == 2
    for exc in caught:
        assert isinstance(exc, TypeError)
        assert "'i1.child'" in str(exc)
        assert "'handler'" in str(exc)
    assert ran == []
    assert phases(run) == {"a0": "SUCCEEDED"}
    assert_clean(run)


def test_unrecordable_argument_does_not_use_up_a_call_ordinal() -> None:
    """A refused call creates no action, so the next call gets the key a0/1."""
    env = flowsdk.TaskEnvironment("i1key")

    @env.task
    async def child(value: object) -> str:
        return "ran"

    @env.task
    async def root() -> str:
        with pytest.raises(SerializationError):
            await child(object())
        return await child("data")

    run = flowsdk.run(root)
    assert run.result() == "ran"
    assert [(a.name, a.key) for a in run.actions] == [("a0", "a0"), ("a1", "a0/1")]
    assert_clean(run)


# -- payloads over max_payload ----------------------------------------------------------


def test_input_over_max_payload_is_refused_by_the_call(tmp_path: Path) -> None:
    """SerializationError states the size and the limit; no action is stored."""
    env = flowsdk.TaskEnvironment("i2in", max_payload=1024)
    ran: list[int] = []

    @env.task
    async def child(blob: bytes) -> int:
        ran.append(len(blob))
        return len(blob)

    @env.task
    async def root() -> str:
        try:
            await child(b"x" * 2000)
        except SerializationError as exc:
            return str(exc)
        return "not refused"

    run = flowsdk.run(root, name="i2in", store=sqlite_url(tmp_path / "s.db"))
    size = len(msgspec.msgpack.encode(((b"x" * 2000,), {}, ["blob"])))  # values, then names
    message = run.result()
    assert "'i2in.child'" in message
    assert f"{size:,} bytes" in message
    assert "1,024 bytes" in message
    assert ran == []
    assert list(stored_payloads(tmp_path / "s.db", "i2in")) == ["a0"]
    assert_clean(run)


def test_a_call_without_arguments_records_empty_inputs_under_its_limit(tmp_path: Path) -> None:
    """No arguments: the inputs read back as none (and still count against `max_payload`)."""
    env = flowsdk.TaskEnvironment("noargs")
    tight = flowsdk.TaskEnvironment("tight", max_payload=2)

    @env.task
    async def child() -> int:
        return 1

    @tight.task
    async def squeezed() -> int:
        return 2

    @env.task
    async def root() -> str:
        await child()
        try:
            await squeezed()
        except SerializationError as exc:
            return str(exc)
        return "not refused"

    run = flowsdk.run(root, name="noargs", store=sqlite_url(tmp_path / "s.db"))
    assert "3 bytes, over the limit of 2 bytes" in run.result()
    inputs, output = stored_payloads(tmp_path / "s.db", "noargs")["a1"]
    assert inputs is not None
    assert msgspec.msgpack.decode(inputs) == [[], {}]
    assert output == msgspec.msgpack.encode(1)
    assert list(stored_payloads(tmp_path / "s.db", "noargs")) == ["a0", "a1"]


def test_output_over_max_payload_fails_the_action_and_stores_no_output(tmp_path: Path) -> None:
    """The child is FAILED with a SerializationError stating size and limit; output NULL."""
    env = flowsdk.TaskEnvironment("i2out")
    caught: list[RuntimeUserError] = []

    @env.task(max_payload=1024)
    async def child() -> bytes:
        return b"x" * 2000

    @env.task
    async def root() -> None:
        try:
            await child()
        except RuntimeUserError as exc:
            caught.append(exc)

    db = tmp_path / "s.db"
    run = flowsdk.run(root, name="i2out", store=sqlite_url(db))
    [exc] = caught
    assert isinstance(exc.__cause__, SerializationError)
    message = str(exc.__cause__)
    assert f"{len(msgspec.msgpack.encode(b'x' * 2000)):,} bytes" in message
    assert "1,024 bytes" in message
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "FAILED"}
    error = run.action("a1").error
    assert error is not None
    assert error.type.endswith("SerializationError")
    inputs, output = stored_payloads(db, "i2out")["a1"]
    assert inputs is not None
    assert output is None
    assert_clean(run)


def test_root_input_over_max_payload_starts_no_run(tmp_path: Path) -> None:
    """`flowsdk.run` refuses the root's oversized input before anything is recorded."""
    env = flowsdk.TaskEnvironment("i2root", max_payload=1024)

    @env.task
    async def root(blob: bytes) -> int:
        return len(blob)

    url = sqlite_url(tmp_path / "s.db")
    with pytest.raises(SerializationError, match="1,024 bytes"):
        flowsdk.run(root, b"x" * 2000, name="i2root", store=url)
    with flowsdk.Client(url) as client:
        assert client.runs() == []


# -- outputs that cannot be recorded -----------------------------------------------------


def test_generator_returned_fails_the_child_with_serialization_error(tmp_path: Path) -> None:
    """A child returning a generator FAILS; parent gets RuntimeUserError from SerializationError."""
    env = flowsdk.TaskEnvironment("i4")
    caught: list[RuntimeUserError] = []

    def numbers() -> Iterator[int]:
        yield 1

    @env.task
    async def child() -> Any:
        return numbers()

    @env.task
    async def root() -> None:
        try:
            await child()
        except RuntimeUserError as exc:
            caught.append(exc)

    db = tmp_path / "s.db"
    run = flowsdk.run(root, name="i4", store=sqlite_url(db))
    [exc] = caught
    assert isinstance(exc.__cause__, SerializationError)
    assert "'i4.child'" in str(exc.__cause__)
    assert "generator" in str(exc.__cause__)
    assert exc.action == "a1"
    assert phases(run) == {"a0": "SUCCEEDED", "a1": "FAILED"}
    assert stored_payloads(db, "i4")["a1"][1] is None
    assert_clean(run)


# -- inputs are snapshotted by the call ----------------------------------------------------


def test_caller_mutation_after_the_call_does_not_reach_the_child() -> None:
    """The child sees the arguments as they were at the call, and so does the record."""
    env = flowsdk.TaskEnvironment("i5")
    seen: list[tuple[list[int], dict[str, list[str]]]] = []

    @env.task
    async def child(items: list[int], meta: dict[str, list[str]]) -> int:
        seen.append((items, meta))
        return len(items)

    @env.task
    async def root() -> int:
        items = [1, 2]
        meta = {"tags": ["a"]}
        pending = asyncio.create_task(child(items, meta))  # its action starts later
        items.append(3)
        meta["tags"].append("b")
        return await pending

    run = flowsdk.run(root)
    assert seen == [([1, 2], {"tags": ["a"]})]
    assert run.result() == 2
    inputs = run.payloads()["a1"][0]
    assert inputs is not None
    # The values as passed, then the positional values' parameter names.
    assert msgspec.msgpack.decode(inputs) == [[[1, 2], {"tags": ["a"]}], {}, ["items", "meta"]]
    assert_clean(run)


def test_each_attempt_of_a_retried_action_gets_a_fresh_snapshot() -> None:
    """An attempt that mutated its argument does not change what the next attempt receives."""
    env = flowsdk.TaskEnvironment("i5retry")
    seen: list[list[int]] = []

    @env.task(retries=1, backoff=0)
    async def child(items: list[int]) -> int:
        seen.append(list(items))
        items.append(99)
        if flowsdk.current_action().attempt == 1:
            raise ValueError("first attempt fails")
        return len(items)

    @env.task
    async def root() -> int:
        return await child([1, 2])

    run = flowsdk.run(root)
    assert seen == [[1, 2], [1, 2]]
    assert run.result() == 3
    assert_clean(run)


# -- round trips -----------------------------------------------------------------------------


def test_inputs_reach_the_body_as_their_annotated_types() -> None:
    """Dataclasses, Structs, datetime, date, UUID, Enum, bytes, sets and nested containers."""
    env = flowsdk.TaskEnvironment("typed_in")
    seen: list[tuple[Any, ...]] = []

    @env.task
    async def consume(
        point: Point,
        box: Box,
        when: datetime.datetime,
        day: datetime.date,
        ident: uuid.UUID,
        color: Color,
        blob: bytes,
        nested: dict[str, list[tuple[int, str]]],
        numbers: set[int],
        bundle: Bundle,
    ) -> None:
        seen.append((point, box, when, day, ident, color, blob, nested, numbers, bundle))

    sent = (
        SAMPLE.point,
        SAMPLE.box,
        SAMPLE.when,
        SAMPLE.day,
        SAMPLE.ident,
        SAMPLE.color,
        SAMPLE.blob,
        SAMPLE.nested,
        SAMPLE.numbers,
        SAMPLE,
    )

    @env.task
    async def root() -> None:
        await consume(*sent)

    run = flowsdk.run(root)
    [got] = seen
    assert got == sent
    assert [type(v) for v in got] == [type(v) for v in sent]
    assert type(got[7]["k"][0]) is tuple
    assert got[0] is not SAMPLE.point  # a snapshot, not the caller's object
    assert_clean(run)


def test_recorded_output_is_decoded_as_the_annotated_return_type(tmp_path: Path) -> None:
    """An output replayed from the store (cache=True, second run) equals what the body returned."""
    env = flowsdk.TaskEnvironment("typed_out")
    bodies: list[int] = []
    got: list[Bundle] = []

    @env.task(cache=True)
    async def produce() -> Bundle:
        bodies.append(1)
        return SAMPLE

    @env.task
    async def root() -> None:
        got.append(await produce())

    url = sqlite_url(tmp_path / "s.db")
    flowsdk.run(root, store=url)
    second = flowsdk.run(root, store=url)
    assert bodies == [1]
    assert second.action("a1").replayed
    replayed = got[1]
    assert replayed == SAMPLE
    assert type(replayed) is Bundle
    assert (type(replayed.box), type(replayed.box.corners[0])) == (Box, Point)
    assert (type(replayed.color), type(replayed.ident)) == (Color, uuid.UUID)
    assert type(replayed.nested["k"][0]) is tuple
    assert_clean(second)


def test_dict_key_order_does_not_change_the_recorded_inputs() -> None:
    """Equal inputs compare equal whatever the key order; the body keeps the caller's order."""
    env = flowsdk.TaskEnvironment("keyorder")
    seen: list[list[str]] = []

    @env.task
    async def child(config: dict[str, Any]) -> None:
        seen.append(list(config))

    @env.task
    async def root() -> None:
        await child({"b": 1, "a": {"y": [1], "x": None}})
        await child({"a": {"x": None, "y": [1]}, "b": 1})

    run = flowsdk.run(root)
    payloads = run.payloads()
    first, second = payloads["a1"][0], payloads["a2"][0]
    assert first is not None
    assert second is not None
    assert same_inputs(first, second)
    assert inputs_digest(first) == inputs_digest(second)
    assert seen == [["b", "a"], ["a", "b"]]
    assert_clean(run)


_NOT_RECORDABLE = object()


def test_inputs_that_bind_to_the_same_values_are_the_same_inputs() -> None:
    """By position or keyword, a default left out or given: one call (retry, cache)."""
    env = flowsdk.TaskEnvironment("bound")

    @env.task
    async def f(
        x: int, by: int = 2, *rest: int, mode: object = _NOT_RECORDABLE, **more: int
    ) -> None:
        return None

    def inputs(*args: Any, **kwargs: Any) -> bytes:
        return encode_inputs(f, args, kwargs)

    same = [inputs(1), inputs(x=1), inputs(1, 2), inputs(by=2, x=1), inputs(1, by=2)]
    assert all(same_inputs(same[0], other, f) for other in same)
    assert len({inputs_digest(one, f) for one in same}) == 1
    others = [inputs(2), inputs(1, 3), inputs(1, 2, 5), inputs(1, z=4), inputs(1, mode=None)]
    assert not any(same_inputs(same[0], other, f) for other in others)
    assert len({inputs_digest(one, f) for one in [same[0], *others]}) == 6
    # Without the task (or recorded for a signature the function no longer has): as given.
    assert not same_inputs(inputs(1), inputs(x=1))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("missing", "missing a required argument: 'a'"),
        ("too_many", "too many positional arguments"),
        ("unknown_keyword", "got an unexpected keyword argument 'c'"),
        ("twice", "multiple values for argument 'a'"),
        ("keyword_only_missing", "missing a required argument: 'mode'"),
    ],
)
def test_arguments_that_do_not_fit_raise_typeerror_from_the_call_and_create_no_action(
    call: str, message: str
) -> None:
    """As in plain asyncio: `add()` raises TypeError at the call; no action, no retry."""
    env = flowsdk.TaskEnvironment("fit", retries=2)
    caught: list[TypeError] = []

    @env.task
    async def add(a: int, b: int = 1, *, mode: str) -> int:
        return a + b

    loose: Any = add  # calls a type checker refuses, made as a program would make them
    calls = {
        "missing": lambda: loose(mode="x"),
        "too_many": lambda: loose(1, 2, 3, mode="x"),
        "unknown_keyword": lambda: loose(1, c=2, mode="x"),
        "twice": lambda: loose(1, a=2, mode="x"),
        "keyword_only_missing": lambda: loose(1),
    }

    @env.task
    async def root() -> int:
        for _ in range(2):  # the second time from what the first one learned
            try:
                _ = calls[call]()
            except TypeError as exc:
                caught.append(exc)
        return await add(1, mode="x") + await add(1, 2, mode="y") + await add(a=1, mode="z")

    run = flowsdk.run(root)
    assert run.result() == 2 + 3 + 2
    assert len(caught) == 2
    for exc in caught:
        assert type(exc) is TypeError
        fit = "task 'fit.add' called with arguments that do not fit add(a, b=1, *, mode)"
        assert str(exc) == f"{fit}: {message}"
    assert phases(run) == {
        "a0": "SUCCEEDED",
        "a1": "SUCCEEDED",
        "a2": "SUCCEEDED",
        "a3": "SUCCEEDED",
    }
    assert_clean(run)


def test_a_root_called_with_arguments_that_do_not_fit_is_refused_before_anything_is_recorded(
    tmp_path: Path,
) -> None:
    """`flowsdk.run(add)` without `add`'s argument: TypeError, no run recorded."""
    env = flowsdk.TaskEnvironment("fitroot")

    @env.task
    async def add(a: int) -> int:
        return a

    store = sqlite_url(tmp_path / "store.db")
    with pytest.raises(TypeError, match="missing a required argument: 'a'"):
        flowsdk.run(add, store=store)
    with flowsdk.Client(store) as client:
        assert client.runs() == []
