"""Many children suspended at once, for the benchmarks that measure them (bench_core (c), (d)).

`Gate` counts the bodies that started and releases them together;
`traced_kb_per_item` is the memory each holds while all wait; `two_task_floor`
is that memory for the structure alone that a flowsdk call in a task of its
own has, in bare asyncio (the design's floor of the in-flight row).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

__all__ = ["Gate", "traced_kb_per_item", "two_task_floor"]


class Gate:
    """Counts the bodies that started; releases them all at once."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.all_in = asyncio.Event()
        self.release = asyncio.Event()

    def arrive(self) -> None:
        self.count += 1
        if self.count == self.expected:
            self.all_in.set()


async def traced_kb_per_item(gate: Gate, spawn: Callable[[], asyncio.Task[Any]]) -> float:
    """Spawn `gate.expected` tasks; return the KB each holds while all are suspended."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tasks = [spawn() for _ in range(gate.expected)]
        await gate.all_in.wait()
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    gate.release.set()
    await asyncio.gather(*tasks)
    return used / gate.expected / 1024


_acting: contextvars.ContextVar[object] = contextvars.ContextVar("acting")


async def two_task_floor(n: int) -> float:
    """KB per in-flight call of a bare-asyncio copy of flowsdk's two Tasks, nothing else."""
    gate = Gate(n)
    loop = asyncio.get_running_loop()

    async def sleeper() -> bool:
        gate.arrive()
        return await gate.release.wait()

    async def body(done: asyncio.Future[bool]) -> None:
        _acting.set(done)
        try:
            done.set_result(await sleeper())
        except BaseException as exc:
            done.set_exception(exc)

    async def call() -> bool:
        done: asyncio.Future[bool] = loop.create_future()
        # Kept, as an action keeps its body's task (a list: 8 bytes a task).
        bodies.append(asyncio.create_task(body(done), context=contextvars.copy_context()))
        return await done

    bodies: list[asyncio.Task[None]] = []
    return await traced_kb_per_item(gate, lambda: asyncio.create_task(call()))
