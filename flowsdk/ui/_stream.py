"""`GET /api/runs/RUN/stream`: a run's live changes as server-sent events.

First the current state (one `event: run`, then one `event: action` per
action), then every change: each poll reads only the events recorded since
the last one (`events_since`) and re-reads only the actions those events
name (`load_actions`), so following a run of 20,000 actions costs what its
changes cost, not its size. Once the run has ended: `event: end` with the
final run record, and the stream closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from flowsdk._records import ActionRecord, EventKind, RunRecord
from flowsdk._service import ControlService
from flowsdk.store import Store

__all__ = ["POLL_INTERVAL", "stream"]

POLL_INTERVAL = 0.05  # how often the store is asked for new events (a keyed, indexed read)
KEEPALIVE = 15.0  # a comment line this often, so proxies keep an idle stream open
_encoder = msgspec.json.Encoder()


def _sse(kind: str, value: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(value) + b"\n\n"


class _NewAttempt(Exception):
    """The run followed has a newer attempt than the one the stream began with."""


class _Follower:
    """Reads what changed in one attempt of a run since the last poll (blocking store reads)."""

    def __init__(self, store: Store, run: str) -> None:
        self.store = store
        self.run = run
        self.attempt = 0
        self.cursor = -1
        self.record: RunRecord | None = None
        # Actions named by an event whose row did not show that event's phase yet
        # (the writer may commit an event before the row): read again next poll.
        self.pending: dict[str, str | None] = {}

    def start(self, service: ControlService) -> list[bytes]:
        run = service.get_run(self.run)
        self.record = run.record
        self.attempt = run.record.attempt
        actions = run.actions
        events = run.events
        self.cursor = events[-1].seq if events else -1
        shown = {a.name: a.phase.value for a in actions}
        latest: dict[str, str | None] = {}
        for e in events:
            if e.kind is EventKind.ACTION and e.action is not None:
                latest[e.action] = e.phase
        # Events read after the actions may name changes the actions do not show yet.
        self.pending = {n: p for n, p in latest.items() if shown.get(n) != p}
        return [_sse("run", run.record), *(_sse("action", a) for a in actions)]

    def poll(self) -> tuple[list[bytes], bool]:
        """Return the new messages, and whether the run has ended (all read).

        Raises:
            _NewAttempt: a new attempt began; the stream closes without `end`
                and the page opens a new one, which starts from that attempt.
        """
        state = self.store.run_state(self.run)
        ended = state.phase.terminal
        if state.attempt != self.attempt:
            raise _NewAttempt
        out: list[bytes] = []
        events = self.store.events_since(self.run, self.cursor, attempt=self.attempt)
        run_changed = False
        for e in events:
            self.cursor = e.seq
            out.append(_sse("event", e))
            if e.kind is EventKind.ACTION and e.action is not None:
                self.pending[e.action] = e.phase
            elif e.kind in (EventKind.RUN, EventKind.REQUEST):
                run_changed = True
        if self.pending:
            for action in self.store.load_actions(self.run, self.attempt, list(self.pending)):
                out.append(_sse("action", action))
                if self._caught_up(action):
                    del self.pending[action.name]
        if run_changed or ended or (self.record and self.record.phase is not state.phase):
            record = self.store.load_record(self.run, self.attempt)
            if record != self.record:
                self.record = record
                out.append(_sse("run", record))
        return out, ended

    def _caught_up(self, action: ActionRecord) -> bool:
        expected = self.pending.get(action.name)
        return expected is None or action.phase.value == expected or action.phase.terminal


async def stream(request: Request, service: ControlService) -> Response:
    """`GET /api/runs/RUN/stream`."""
    follower = _Follower(service.store, request.path_params["run"])
    first = await run_in_threadpool(follower.start, service)  # 404/403 before the stream opens

    async def body() -> AsyncIterator[bytes]:
        for message in first:
            yield message
        try:
            async for message in changes():
                yield message
        except _NewAttempt:
            return

    async def changes() -> AsyncIterator[bytes]:
        quiet = 0.0
        while True:
            messages, ended = await run_in_threadpool(follower.poll)
            for message in messages:
                yield message
            if ended:
                # One more read after the end: the runner's final rows are committed
                # with (or before) the terminal run phase, so this sees them all.
                messages, _ = await run_in_threadpool(follower.poll)
                for message in messages:
                    yield message
                record = await run_in_threadpool(follower.store.load_record, follower.run)
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
