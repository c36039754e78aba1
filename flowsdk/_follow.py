"""Following one attempt of a run by keyed reads: what the console's stream and `watch` share.

The first picture is one whole read of the attempt. Each poll after it reads
only the events recorded since the last one (`events_since`) and re-reads
only the actions those events name (`load_actions`), so following a run of a
million actions costs what its changes cost, not its size.
"""

from __future__ import annotations

from typing import Any

from flowsdk._records import ActionRecord, Event, EventKind, RunRecord
from flowsdk._result import Run
from flowsdk._service import ControlService

__all__ = ["Changes", "NewAttempt", "RunFollower"]


class NewAttempt(Exception):
    """The run followed has a newer attempt than the one the follower began with."""


class Changes:
    """What one poll found: new events, the actions they name, the run's record if it changed."""

    __slots__ = ("actions", "ended", "events", "record")

    def __init__(
        self,
        events: list[Event],
        actions: list[ActionRecord],
        record: RunRecord | None,
        ended: bool,
    ) -> None:
        self.events = events
        self.actions = actions  # re-read, in start order
        self.record = record  # the run's record, when it changed
        # The run had ended when this poll began: one more poll reads its last rows.
        self.ended = ended


class RunFollower:
    """Reads what changed in one attempt of a run since the last poll (blocking reads)."""

    def __init__(self, service: ControlService, run: str) -> None:
        self.service = service
        self.run = run
        self.attempt = 0
        self.cursor = -1
        self.record: RunRecord | None = None
        # Actions named by an event whose row did not show that event's phase yet
        # (the writer may commit an event before the row): read again next poll.
        self.pending: dict[str, str | None] = {}

    def start(self) -> Run[Any]:
        """Read the latest attempt whole: the first picture, from which polls go on."""
        run = self.service.get_run(self.run)
        self.record = run.record
        self.attempt = run.record.attempt
        events = run.events
        self.cursor = events[-1].seq if events else -1
        shown = {a.name: a.phase.value for a in run.actions}
        latest: dict[str, str | None] = {}
        for e in events:
            if e.kind is EventKind.ACTION and e.action is not None:
                latest[e.action] = e.phase
        # Events read after the actions may name changes the actions do not show yet.
        self.pending = {n: p for n, p in latest.items() if shown.get(n) != p}
        return run

    def poll(self) -> Changes:
        """Read what changed since the last poll.

        Raises:
            NewAttempt: a new attempt began; follow it with a new follower.
        """
        store = self.service.store
        state = store.run_state(self.run)
        ended = state.phase.terminal
        if state.attempt != self.attempt:
            raise NewAttempt
        events = store.events_since(self.run, self.cursor, attempt=self.attempt)
        run_changed = False
        for e in events:
            self.cursor = e.seq
            if e.kind is EventKind.ACTION and e.action is not None:
                self.pending[e.action] = e.phase
            elif e.kind in (EventKind.RUN, EventKind.REQUEST):
                run_changed = True
        actions: list[ActionRecord] = []
        if self.pending:
            actions = store.load_actions(self.run, self.attempt, list(self.pending))
            for action in actions:
                if self._caught_up(action):
                    del self.pending[action.name]
        record = None
        if run_changed or ended or (self.record and self.record.phase is not state.phase):
            found = store.load_record(self.run, self.attempt)
            if found != self.record:
                self.record = record = found
        return Changes(events, actions, record, ended)

    def _caught_up(self, action: ActionRecord) -> bool:
        expected = self.pending.get(action.name)
        return expected is None or action.phase.value == expected or action.phase.terminal
