"""`GET /api/runs/RUN/stream`: a run's live changes as server-sent events.

First the current state (one `event: run`, then one `event: action` per action,
then the run's last 300 events, one `event: event` each), then every change
(`event: event`, `event: action`, `event: run`), as `RunFollower` (`_follow.py`) reads it: each
poll reads only the events recorded since the last one and re-reads only the
actions those events name, so following a run of 20,000 actions costs what
its changes cost, not its size. Once the run has ended: `event: end` with the
final run record, and the stream closes.

While the run is live, `event: queued` carries the control requests its runner has
not answered yet (`QueuedRequest`s, as `show --json`'s `"queued_requests"`): in the
first picture when there are some, then the whole list each time it changes (`[]`
once the last one was applied). `event: end` means none is left.
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
from flowsdk.store import QueuedRequest

__all__ = ["POLL_INTERVAL", "stream"]

POLL_INTERVAL = 0.05  # how often the store is asked for new events (a keyed, indexed read)
KEEPALIVE = 15.0  # a comment line this often, so proxies keep an idle stream open
# The first picture is written in chunks of at most this many messages: one write per
# message would cost a send each, 20,000 of them for a run of 20,000 actions.
MESSAGES_AT_ONCE = 2_000
# ... and holds the run's last `LAST_EVENTS` events: what the page's event log shows.
LAST_EVENTS = 300
# The requests a blocked runner has not answered are read every `QUEUED_EVERY` polls
# (0.5 s): one keyed statement, the same `flowsdk watch` makes. Reading them every poll
# would add a third statement to the two a poll makes (`run_state`, `events_since`) for
# something that only matters after a requester waited 10 s in vain; half a second
# late to appear is nothing beside that. While the page shows some, any change the
# poll brings (applying a request writes events) reads them again at once, so a line
# goes as soon as its request has been applied. Once the run has ended none is read.
QUEUED_EVERY = 10
_encoder = msgspec.json.Encoder()
_HEADS = {
    kind: b"event: %s\ndata: " % kind.encode()
    for kind in ("run", "action", "event", "queued", "end")
}


def _sse(kind: str, value: Any) -> bytes:
    return _HEADS[kind] + _encoder.encode(value) + b"\n\n"


def _queued(follower: RunFollower) -> list[QueuedRequest]:
    """The requests the runner of the followed run has not answered; none once it has ended."""
    record = follower.record
    if record is None or record.phase.terminal:
        return []
    return follower.service.queued_requests(follower.run)


def _first(follower: RunFollower) -> tuple[list[bytes], list[QueuedRequest]]:
    """The first picture, in chunks, and the requests it says are queued.

    The run, the requests its runner has not answered (when there are some), each
    of its actions, and its latest events. Each message is encoded straight into
    its chunk's buffer: no object per message is made, so the picture of a large
    run costs the page's bytes once.
    """
    run = follower.start()
    queued = _queued(follower)
    messages = itertools.chain(
        [("run", run.record)],
        [("queued", queued)] if queued else [],
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
    return chunks, queued


def _poll(
    follower: RunFollower, shown: list[QueuedRequest], due: bool
) -> tuple[list[bytes], bool, list[QueuedRequest]]:
    """The new messages, whether the run has ended (all read), and the queued requests.

    The requests are read when `due`, or when the page shows some and the run
    changed (see `QUEUED_EVERY`); an `event: queued` is sent when they differ from
    `shown`.
    """
    changes = follower.poll()
    out = [_sse("event", e) for e in changes.events]
    out += [_sse("action", a) for a in changes.actions]
    if changes.record is not None:
        out.append(_sse("run", changes.record))
    queued = shown
    if not changes.ended and (due or (shown and out)):
        queued = _queued(follower)
        if queued != shown:
            out.append(_sse("queued", queued))
    return out, changes.ended, queued


async def stream(request: Request, service: ControlService) -> Response:
    """`GET /api/runs/RUN/stream`."""
    follower = RunFollower(service, request.path_params["run"])
    first, shown = await run_in_threadpool(_first, follower)  # 404/403 before the stream opens

    async def body() -> AsyncIterator[bytes]:
        for message in first:
            yield message
        try:
            async for message in changes():
                yield message
        except NewAttempt:
            return

    async def changes() -> AsyncIterator[bytes]:
        nonlocal shown
        quiet = 0.0
        for count in itertools.count(1):
            due = count % QUEUED_EVERY == 0
            messages, ended, shown = await run_in_threadpool(_poll, follower, shown, due)
            for message in messages:
                yield message
            if ended:
                # One more read after the end: the runner's final rows are committed
                # with (or before) the terminal run phase, so this sees them all.
                messages, _, _ = await run_in_threadpool(_poll, follower, shown, False)
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
