"""`GET /api/runs/RUN/stream`: a run's live changes as server-sent events.

First the current state (one `event: run`, then one `event: action` per action,
then the run's last 300 events, one `event: event` each), then every change
(`event: event`, `event: action`, `event: run`), as `RunFollower` (`_follow.py`) reads it: each
poll reads only the events recorded since the last one and re-reads only the
actions those events name, so following a run of 20,000 actions costs what
its changes cost, not its size. Once the run has ended: `event: end` with the
final run record, and the stream closes.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from flowsdk._follow import NewAttempt, RunFollower
from flowsdk._service import ControlService

__all__ = ["POLL_INTERVAL", "stream"]

POLL_INTERVAL = 0.05  # how often the store is asked for new events (a keyed, indexed read)
KEEPALIVE = 15.0  # a comment line this often, so proxies keep an idle stream open
# The first picture is written in chunks of at most this many messages: one write per
# message would cost a send each, 20,000 of them for a run of 20,000 actions.
MESSAGES_AT_ONCE = 2_000
# ... and holds the run's last `LAST_EVENTS` events: what the page's event log shows.
LAST_EVENTS = 300
_encoder = msgspec.json.Encoder()
_HEADS = {kind: b"event: %s\ndata: " % kind.encode() for kind in ("run", "action", "event", "end")}


def _sse(kind: str, value: Any) -> bytes:
    return _HEADS[kind] + _encoder.encode(value) + b"\n\n"


def _first(follower: RunFollower) -> list[bytes]:
    """The first picture, in chunks: the run, each of its actions, and its latest events.

    Each message is encoded straight into its chunk's buffer: no object per message
    is made, so the picture of a large run costs the page's bytes once.
    """
    run = follower.start()
    messages = itertools.chain(
        [("run", run.record)],
        (("action", a) for a in run.actions),
        (("event", e) for e in run.events[-LAST_EVENTS:]),
    )
    chunks: list[bytes] = []
    buffer = bytearray()
    for count, (kind, value) in enumerate(messages, 1):
        buffer += _HEADS[kind]
        _encoder.encode_into(value, buffer, -1)  # -1: appended
        buffer += b"\n\n"
        if count % MESSAGES_AT_ONCE == 0:
            chunks.append(bytes(buffer))
            buffer.clear()
    if buffer:
        chunks.append(bytes(buffer))
    return chunks


def _poll(follower: RunFollower) -> tuple[list[bytes], bool]:
    """The new messages, and whether the run has ended (all read)."""
    changes = follower.poll()
    out = [_sse("event", e) for e in changes.events]
    out += [_sse("action", a) for a in changes.actions]
    if changes.record is not None:
        out.append(_sse("run", changes.record))
    return out, changes.ended


async def stream(request: Request, service: ControlService) -> Response:
    """`GET /api/runs/RUN/stream`."""
    follower = RunFollower(service, request.path_params["run"])
    first = await run_in_threadpool(_first, follower)  # 404/403 before the stream opens

    async def body() -> AsyncIterator[bytes]:
        for message in first:
            yield message
        try:
            async for message in changes():
                yield message
        except NewAttempt:
            return

    async def changes() -> AsyncIterator[bytes]:
        quiet = 0.0
        while True:
            messages, ended = await run_in_threadpool(_poll, follower)
            for message in messages:
                yield message
            if ended:
                # One more read after the end: the runner's final rows are committed
                # with (or before) the terminal run phase, so this sees them all.
                messages, _ = await run_in_threadpool(_poll, follower)
                for message in messages:
                    yield message
                record = await run_in_threadpool(service.store.load_record, follower.run)
                yield _sse("end", record)
                return
            quiet = 0.0 if messages else quiet + POLL_INTERVAL
            if quiet >= KEEPALIVE:
                quiet = 0.0
                yield b": keepalive\n\n"
            await asyncio.sleep(POLL_INTERVAL)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
