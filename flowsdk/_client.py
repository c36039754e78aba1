"""`flowsdk.Client`: read and control runs from any process, through the store."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from types import TracebackType
from typing import Any

from flowsdk._phases import RunPhase
from flowsdk._records import (
    Actor,
    ControlRequest,
    ControlResult,
    LogEntry,
    Progress,
    PruneReport,
    RunRecord,
)
from flowsdk._result import Run
from flowsdk._service import ControlService, Permission
from flowsdk.store import QueuedRequest, Store, StoredAction, open_store
from flowsdk.store._location import masked_url, store_location

__all__ = ["Client"]


class Client:
    """The operations of the CLI, from Python: list, read, abort, stop, mark failed, retry.

    A thin caller of the control service, acting as the local operator (the
    store's own permissions decide what this user may do). Control requests
    return once the live runner has applied them (normally within 100 ms), or
    at once when the target has already ended or its runner is gone; they do
    not wait for the run to end. On a `memory://` store object, a live run of
    this process is controlled directly on its loop.

    Args:
        store: A store URL, a path (a string or an `os.PathLike`) or a store
            object; default `$FLOWSDK_STORE`, else `sqlite:///.flowsdk/flowsdk.db`.
        actor: Who asks (recorded as `requested_by`); default the local
            operator, `user@host pid N`. Its role may be given by its value
            (`Actor(name="ci", role="viewer")`); an unknown one is refused
            where the `Actor` is made (`ValueError`).

    Raises:
        TypeError: `store` is not a URL or path string, an `os.PathLike` or a
            store object; `actor` is not an `Actor`.
        ValueError: the store URL is malformed.
    """

    def __init__(
        self, store: str | os.PathLike[str] | Store | None = None, *, actor: Actor | None = None
    ) -> None:
        # Both checked before the store is opened: a refused client leaves nothing open.
        location = store_location(store)
        asker = _checked_actor(actor) if actor is not None else Actor.local()
        self.store = open_store(location)
        # A store object passed in is the caller's: closing the client leaves it open.
        self._owns_store = self.store is not store
        self._service: ControlService | None = ControlService(self.store, asker)

    def __repr__(self) -> str:
        closed = ", closed" if self._service is None else ""
        return f"Client({masked_url(self.store.url)!r}{closed})"

    @property
    def service(self) -> ControlService:
        """The control service every operation goes through.

        Raises:
            RuntimeError: the client was closed.
        """
        service = self._service
        if service is None:
            raise RuntimeError(
                f"this flowsdk.Client of {masked_url(self.store.url)} was closed; create a new "
                "flowsdk.Client to read or control runs again"
            )
        return service

    def __enter__(self) -> Client:
        self.service  # noqa: B018  # refuses a closed client
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the store's connections; the client cannot be used afterwards.

        A store given as an object is left open (it is the caller's to close).
        Closing twice is fine.
        """
        self._service = None
        if self._owns_store:
            self.store.close()

    # -- reading ---------------------------------------------------------------------

    def runs(
        self, *, phase: RunPhase | str | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Return the execution history (latest attempt of each run), newest first.

        Args:
            phase: Only runs whose latest attempt is in this phase (a `RunPhase`,
                or its name in any case: `"failed"`).
            limit: At most this many runs; None (the default) lists them all,
                and 0 none (unlike the CLI's `--limit 0`, which means all).

        Raises:
            ValueError: an unknown phase (the message lists them), or a negative `limit`.
            TypeError: `limit` is not an int.
        """
        return self.service.runs(phase=_run_phase(phase), limit=limit)

    def get_run(self, name: str, *, attempt: int | None = None) -> Run[Any]:
        """Return a run (its latest attempt, or `attempt`) with its actions and events.

        Raises:
            RunNotFoundError: no such run; the message suggests close names.
            TypeError: `name` is not a string.
        """
        return self.service.get_run(_text("name", name), attempt=attempt)

    def get_record(self, run: str, *, attempt: int | None = None) -> RunRecord:
        """Return a run's record (its latest attempt, or `attempt`) alone, without its actions.

        Raises:
            RunNotFoundError: no such run (or attempt).
            TypeError: `run` is not a string.
        """
        return self.service.get_record(_text("run", run), attempt=attempt)

    def get_action(self, run: str, action: str, *, attempt: int | None = None) -> StoredAction:
        """Return one action of a run in full: its record, recorded values and events.

        What `get_run(run).action(action)`, `.payloads()` and `.events` hold for
        it, read by keyed lookups: on a run of a million actions, as fast as on
        a run of ten.

        Raises:
            RunNotFoundError: no such run (or attempt).
            ActionNotFoundError: the run has no such action.
            TypeError: `run` or `action` is not a string.
        """
        return self.service.get_action(_text("run", run), _text("action", action), attempt=attempt)

    def queued_requests(self, run: str) -> list[QueuedRequest]:
        """Return the control requests to a live run that its runner has not answered yet.

        Oldest first: each abort, stop or mark-failed answered `queued` (exit 7)
        because the runner did not answer in time (a body blocks its event loop,
        or its process is paused), with who asked, when, why, and whether the
        runner has taken it from the store yet. Each is applied when the loop
        runs again, and then no longer listed. A run that has ended, or whose
        runner is gone, has none. Keyed lookups: as fast on a run of a million
        actions as on a run of ten.

        Raises:
            RunNotFoundError: no such run; the message suggests close names.
            TypeError: `run` is not a string.
        """
        return self.service.queued_requests(_text("run", run))

    def progress(
        self, run: str, attempt: int | None = None, action: str | None = None
    ) -> list[Progress]:
        """Return the progress reports of one attempt (default: the latest), oldest first.

        Of one action, if `action` names it.

        Raises:
            RunNotFoundError: no such run (or attempt).
            ActionNotFoundError: the attempt has no such action.
        """
        return self.service.progress(run, attempt, action)

    def latest_progress(self, run: str, attempt: int | None = None) -> dict[str, Progress]:
        """Return each action's latest progress report in one attempt (default: the latest).

        Raises:
            RunNotFoundError: no such run (or attempt).
        """
        return self.service.latest_progress(run, attempt)

    def logs(
        self, run: str, attempt: int | None = None, action: str | None = None, cursor: int = -1
    ) -> list[LogEntry]:
        """Return the kept log records of one attempt (default: the latest) with `seq > cursor`.

        Of one action, if `action` names it.

        Raises:
            RunNotFoundError: no such run (or attempt).
            ActionNotFoundError: the attempt has no such action.
        """
        return self.service.logs(run, attempt, action, cursor)

    def prune(
        self,
        *,
        older_than: timedelta | None = None,
        keep: int | None = None,
        phase: RunPhase | str | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Delete ended runs, every attempt of each, and give the space back (SPEC §6).

        In scope: the runs whose latest attempt is in `phase` (default: all);
        of those, all but the `keep` newest, that ended more than `older_than`
        ago. A live (running or stopping) run is never deleted, even if it
        matched: the report lists it in `live`. A SQLite file shrinks
        (`freed_bytes`); PostgreSQL reuses the space itself. With `dry_run`,
        nothing is deleted: the report says what would be (`.dry_run` is True),
        and reading the store is enough.

        Raises:
            ValueError: no criterion given, a negative one, or an unknown phase.
            TypeError: `older_than` is not a `datetime.timedelta`, or `keep` not an int.
            PermissionDeniedError: the store (or the actor's role) forbids deleting.
        """
        return self.service.prune(
            older_than=older_than, keep=keep, phase=_run_phase(phase), dry_run=dry_run
        )

    def retry(self, run: str, *, max_actions: int | None = None) -> Run[Any]:
        """Run the next attempt of a FAILED, ABORTED, STOPPED or CRASHED run, in the foreground.

        Calls that match a recorded action that succeeded (same key, task and
        inputs) are not executed: their recorded output is returned and the
        action shows `replayed`. Everything else runs again (at least once).
        `max_actions` limits the new attempt as `flowsdk.run`'s does (replayed
        actions count); an earlier attempt's limit is not carried over.

        Raises:
            RunNotFoundError: no such run.
            InvalidStateError: the run succeeded or is still live, or its task
                cannot be imported.
            NondeterminismError: (from inside the run) a call differs from the history.
            RuntimeError: called from a running event loop (the retry runs on a
                loop of its own); nothing is recorded.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            on_a_loop = False
        else:
            on_a_loop = True
        if not on_a_loop:
            # Outside the `except`: the retried run's own exceptions would chain to it.
            return self.service.retry(run, max_actions)
        self.service.authorize(Permission.EXECUTE)
        phase = self.service.get_record(run).phase
        if not phase.terminal or phase is RunPhase.SUCCEEDED:
            # The run's own refusal (live, or succeeded) says more than where it was asked from.
            return self.service.retry(run, max_actions)
        raise RuntimeError(
            "flowsdk.Client.retry() cannot be called from a running event loop: it runs the "
            "next attempt to its end on a loop of its own. Run it in a thread, "
            f"'await asyncio.to_thread(client.retry, {run!r})', or use the CLI: flowsdk retry"
        )

    # -- control ---------------------------------------------------------------------

    def abort(
        self,
        run: str,
        action: str | None = None,
        *,
        group: str | None = None,
        reason: str | None = None,
    ) -> ControlResult:
        """Abort a run, one action's subtree, or a group's actions. Idempotent.

        Raises:
            RunNotFoundError: no such run.
            ActionNotFoundError: the run has no such action or group.
            ValueError: both `action` and `group` are given; nothing is recorded.
            TypeError: `reason` is not a string (or None); nothing is recorded.
        """
        return self.service.abort(run, action, group=group, reason=reason)

    def stop(self, run: str, *, abandon: bool = False, reason: str | None = None) -> ControlResult:
        """Stop a run: let its in-progress actions finish, or (`abandon=True`) abandon them.

        A second stop-and-wait on a stopping run is answered `refused` (a value,
        not an exception); `abandon=True` escalates it.

        Raises:
            TypeError: `reason` is not a string (or None); nothing is recorded.
        """
        return self.service.stop(run, abandon=abandon, reason=reason)

    def mark_failed(self, run: str, action: str, *, reason: str | None = None) -> ControlResult:
        """Mark an action as failed: its body is cancelled, its parent gets `RuntimeUserError`.

        Raises:
            TypeError: `action` is None (name the action; to end the whole run,
                abort or stop it), or `reason` is not a string; nothing is recorded.
        """
        return self.service.mark_failed(run, action, reason=reason)

    def control(self, request: ControlRequest) -> ControlResult:
        """Deliver any control request (its `requested_by` is this client's actor)."""
        return self.service.send(request)


def _run_phase(phase: RunPhase | str | None) -> RunPhase | None:
    """Return `phase` as a `RunPhase`, its name taken in any case (`"failed"`), as the CLI does.

    Raises:
        ValueError: not a run phase; the message lists them.
    """
    if phase is None or isinstance(phase, RunPhase):
        return phase
    found = RunPhase._value2member_map_.get(phase.upper()) if isinstance(phase, str) else None
    if not isinstance(found, RunPhase):
        choices = ", ".join(p.value for p in RunPhase)
        raise ValueError(f"unknown run phase {phase!r}; choose from {choices}")
    return found


def _text(what: str, value: str) -> str:
    """Return `value`, a name the caller gave, or raise `TypeError` naming the parameter."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string (a name), not {type(value).__name__}")
    return value


def _checked_actor(actor: Actor) -> Actor:
    """Return `actor`, an `Actor` (whose role it checked when it was made).

    Raises:
        TypeError: `actor` is not an `Actor`.
    """
    if not isinstance(actor, Actor):
        raise TypeError(
            f"actor must be a flowsdk.Actor (such as Actor(name='ci', role='viewer')), not "
            f"{type(actor).__name__}"
        )
    return actor
