"""The control service: the one implementation of the operations on runs (SPEC §6).

`Client`, the CLI, `RunHandle` and the web console call it; none of them
builds a request, checks a permission or interprets an answer on its own.

- Every operation is made by an `Actor` (recorded as `requested_by`) and
  checked against one role -> permission table (`PERMISSIONS`). The CLI and
  `Client` act as the local operator: for them the store's own permissions
  decide (a store file this user cannot write is `PermissionDeniedError`).
- A control request on a run that has ended is answered from cheap keyed
  lookups in the store (never a load of the whole run); everything else goes
  through the control channel to the live runner, which resolves the target
  in its live run and answers.
- A retry runs in the foreground (`retry`), or in a detached runner process
  (`launch_retry`, `launch_run`), which the console needs.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from flowsdk._launch import attempt_recorded, launch
from flowsdk._local import local_channel
from flowsdk._names import check_name, new_run_name
from flowsdk._phases import RunPhase
from flowsdk._records import (
    AbortRequest,
    ActionOutline,
    ActionRecord,
    Actor,
    ControlRequest,
    ControlResult,
    LogEntry,
    MarkFailedRequest,
    Outcome,
    Progress,
    PruneReport,
    RefusedRequest,
    Role,
    RunRecord,
    StopRequest,
    describe_target,
)
from flowsdk._result import Run, run_from_stored
from flowsdk._retry import check_retryable, retry_run
from flowsdk._text import check_reason, preview
from flowsdk.errors import (
    ActionNotFoundError,
    FlowError,
    InvalidStateError,
    PermissionDeniedError,
    RunExistsError,
)
from flowsdk.store import ControlChannel, QueuedRequest, Store, StoredAction
from flowsdk.store._prune import prune_plan

__all__ = [
    "ANSWER_TIMEOUT",
    "PERMISSIONS",
    "ControlService",
    "Permission",
    "check_request",
]

# How long a control request waits for the live runner's answer (normally < 100 ms).
ANSWER_TIMEOUT = 10.0


class Permission(enum.StrEnum):
    """What an operation needs: reading, starting runs, or controlling them."""

    READ = "read"
    EXECUTE = "execute"
    CONTROL = "control"


PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.EXECUTOR: frozenset({Permission.READ, Permission.EXECUTE}),
    # Abort is its own permission, distinct from execute: only an operator controls runs.
    Role.OPERATOR: frozenset({Permission.READ, Permission.EXECUTE, Permission.CONTROL}),
}
"""The one role -> permission table every front end is checked against."""


class ControlService:
    """Reads, controls, retries and starts runs of one store, on behalf of one actor.

    Args:
        store: The store the runs are recorded in.
        actor: Who asks; recorded as `requested_by`, its role checked on every call.
        channel: How requests reach the runner; default the store's control
            channel. `RunHandle` passes its run's in-process channel.
    """

    def __init__(self, store: Store, actor: Actor, channel: ControlChannel | None = None) -> None:
        self.store = store
        self.actor = actor
        self.channel: ControlChannel = channel if channel is not None else store

    def authorize(self, permission: Permission) -> None:
        """Raise `PermissionDeniedError` unless the actor's role has `permission`."""
        if permission not in PERMISSIONS[self.actor.role]:
            raise PermissionDeniedError(
                f"{self.actor.name} has the role {self.actor.role.value}, which lacks the "
                f"{permission.value!r} permission"
            )

    # -- reading -----------------------------------------------------------------------

    def runs(self, *, phase: RunPhase | None = None, limit: int | None = None) -> list[RunRecord]:
        """Return the execution history (latest attempt of each run), newest first.

        At most `limit` runs (None: all of them; 0: none).

        Raises:
            TypeError, ValueError: `limit` is not None or an int of 0 or more.
        """
        if limit is not None:
            _check_int("limit", limit, "an int or None")
            if limit < 0:
                raise ValueError(f"limit must be 0 or more (None: all runs), not {limit}")
        self.authorize(Permission.READ)
        return self.store.list_runs(phase=phase, limit=limit)

    def get_run(self, name: str, *, attempt: int | None = None) -> Run[Any]:
        """Return one attempt of a run (default: the latest) with its actions and events."""
        self.authorize(Permission.READ)
        return run_from_stored(self.store.load_run(name, attempt))

    def get_record(self, name: str, *, attempt: int | None = None) -> RunRecord:
        """Return one attempt's run record (default: the latest) alone, by a keyed lookup."""
        self.authorize(Permission.READ)
        return self.store.load_record(name, attempt)

    def get_outline(
        self, name: str, *, attempt: int | None = None
    ) -> tuple[RunRecord, list[ActionOutline]]:
        """Return one attempt's record and every action in outline (name, parent, phase).

        In start order: what choosing the part of a big tree to draw needs
        (then `get_actions` for those), without reading every whole record.
        """
        self.authorize(Permission.READ)
        # Keyed, and judges the runner of the latest attempt: one that is gone is
        # recorded CRASHED before the record is read, as a whole-run read does.
        self.store.run_state(name)
        record = self.store.load_record(name, attempt)
        return record, self.store.load_tree(name, record.attempt)

    def get_actions(
        self, name: str, attempt: int, actions: list[str]
    ) -> tuple[list[ActionRecord], dict[str, tuple[bytes | None, bytes | None]]]:
        """Return the named actions' records (start order) and recorded values, by keys."""
        self.authorize(Permission.READ)
        return (
            self.store.load_actions(name, attempt, actions),
            self.store.load_payloads(name, attempt, actions),
        )

    def get_action(self, name: str, action: str, *, attempt: int | None = None) -> StoredAction:
        """Return one action of one attempt (default: the latest) in full, by keyed lookups."""
        self.authorize(Permission.READ)
        return self.store.load_action(name, attempt, action)

    def queued_requests(self, name: str) -> list[QueuedRequest]:
        """Return the control requests to a live run its runner has not answered, oldest first.

        Keyed lookups (one when there is none). Empty once the run has ended.

        Raises:
            RunNotFoundError: no such run.
        """
        self.authorize(Permission.READ)
        return self.store.queued_requests(name)

    def progress(
        self, name: str, attempt: int | None = None, action: str | None = None
    ) -> list[Progress]:
        """Return the progress reports of one attempt (default: the latest), oldest first.

        Raises:
            RunNotFoundError: no such run (or attempt).
            ActionNotFoundError: the attempt has no such action.
        """
        self.authorize(Permission.READ)
        if attempt is None:
            attempt = self.store.load_record(name).attempt
        reports = self.store.load_progress(name, attempt, action)
        if not reports:
            self._check_exists(name, attempt, action)
        return reports

    def latest_progress(self, name: str, attempt: int | None = None) -> dict[str, Progress]:
        """Return each action's latest progress report in one attempt (default: the latest).

        Raises:
            RunNotFoundError: no such run (or attempt).
        """
        self.authorize(Permission.READ)
        if attempt is None:
            attempt = self.store.load_record(name).attempt
        latest = self.store.latest_progress(name, attempt)
        if not latest:
            self._check_exists(name, attempt, None)
        return latest

    def logs(
        self,
        name: str,
        attempt: int | None = None,
        action: str | None = None,
        cursor: int = -1,
        limit: int | None = None,
    ) -> list[LogEntry]:
        """Return the kept log records of one attempt (default: the latest) after `cursor`.

        Oldest first, at most `limit` of them (all without one).

        Raises:
            RunNotFoundError: no such run (or attempt).
            ActionNotFoundError: the attempt has no such action.
        """
        self.authorize(Permission.READ)
        if attempt is None:
            attempt = self.store.load_record(name).attempt
        entries = self.store.load_logs(name, attempt, action, cursor, limit)
        if not entries:
            self._check_exists(name, attempt, action)
        return entries

    def _check_exists(self, name: str, attempt: int, action: str | None) -> None:
        """Raise as `get_action` would if the attempt (or its action) does not exist.

        Called only when a read found nothing, so a typo in a name is not taken
        for "nothing yet"; found records need no lookup.
        """
        self.store.load_record(name, attempt)
        if action is None:
            return
        try:
            if self.store.load_actions(name, attempt, [action]):
                return
        except InvalidStateError:
            return  # a live run of a memory store: its actions are its runner's until it ends
        self.store.load_action(name, attempt, action)  # raises ActionNotFoundError

    def prune(
        self,
        *,
        older_than: timedelta | None = None,
        keep: int | None = None,
        phase: RunPhase | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Delete ended runs (never a live one): see `Client.prune`.

        Needs `control`; a dry run, which only reads, needs `read`.
        """
        if older_than is not None and not isinstance(older_than, timedelta):
            raise TypeError(
                "older_than must be a datetime.timedelta (such as timedelta(days=30)), not "
                f"{type(older_than).__name__}"
            )
        if keep is not None:
            _check_int("keep", keep, "an int (how many of the newest runs to keep)")
        self.authorize(Permission.READ if dry_run else Permission.CONTROL)
        if older_than is None and keep is None and phase is None:
            raise ValueError(
                "say which runs to delete: older_than (--older-than DAYS), keep "
                "(--keep N) or phase (--phase P)"
            )
        if keep is not None and keep < 0:
            raise ValueError(f"keep must be 0 or more, not {keep}")
        if older_than is not None and older_than < timedelta(0):
            raise ValueError(f"older_than must not be negative, not {older_than}")
        before = datetime.now(UTC) - older_than if older_than is not None else None
        if dry_run:
            doomed, live = prune_plan(self.store.list_runs(phase=phase), before=before, keep=keep)
            # Attempts are numbered from 1 and a prune takes every one: the latest's number.
            attempts = sum(r.attempt for r in doomed)
            return PruneReport(deleted=doomed, attempts=attempts, live=live, dry_run=True)
        return self.store.prune(before=before, keep=keep, phase=phase)

    # -- control -----------------------------------------------------------------------

    def abort(
        self,
        run: str,
        action: str | None = None,
        *,
        group: str | None = None,
        reason: str | None = None,
    ) -> ControlResult:
        """Abort a run, one action's subtree, or a group's actions (not both). Idempotent."""
        return self.send(AbortRequest(run=run, action=action, group=group, reason=reason))

    def stop(self, run: str, *, abandon: bool = False, reason: str | None = None) -> ControlResult:
        """Stop a run (wait, or abandon); a second stop-and-wait is a `refused` result."""
        return self.send(StopRequest(run=run, abandon=abandon, reason=reason))

    def mark_failed(self, run: str, action: str, *, reason: str | None = None) -> ControlResult:
        """Mark an action as failed."""
        return self.send(MarkFailedRequest(run=run, action=action, reason=reason))

    def send(self, request: ControlRequest) -> ControlResult:
        """Deliver a control request as this actor and return the result.

        Raises:
            PermissionDeniedError: the actor may not control runs.
            RunNotFoundError: no such run.
            ActionNotFoundError: the run has no such action or group.
            TypeError: a name or the reason is not a string, or a mark-failed
                names no action (nothing is recorded).
            ValueError: an abort names both an action and a group, or the
                reason is over 10,000 characters (nothing is recorded).
        """
        reason = check_request(request)
        try:
            self.authorize(Permission.CONTROL)
        except PermissionDeniedError as exc:
            self._record_refused(request, exc)
            raise
        if reason == "":  # no reason given: recorded and shown as none, never as ""
            request = msgspec.structs.replace(request, reason=None)
        # Who asked, and when: the runner records that time, however long its loop
        # keeps the request waiting (`queued`).
        request = msgspec.structs.replace(
            request, requested_by=self.actor.name, requested_at=datetime.now(UTC)
        )
        channel = self.channel
        if not channel.in_process:
            # A run live on this very thread's loop answers here: waiting for its answer
            # through the store would block the loop that has to give it (`_local`).
            local = local_channel(self.store, request.run)
            if local is not None:
                channel = local
            else:
                ended = self._ended(request)
                if ended is not None:
                    return ended
        return channel.request(request, timeout=ANSWER_TIMEOUT).unwrap()

    def _record_refused(self, request: ControlRequest, exc: PermissionDeniedError) -> None:
        """Write a refused request to its run's event log (best effort, SPEC §8).

        A live run's runner writes it (through the control channel); an ended
        run's log gets it from the store directly.
        """
        what = (
            "abort"
            if isinstance(request, AbortRequest)
            else "stop"
            if isinstance(request, StopRequest)
            else "mark failed"
        )
        action = getattr(request, "action", None)
        note = RefusedRequest(
            run=request.run,
            action=action,
            message=f"{what} refused: {exc}",
            requested_by=self.actor.name,
        )
        try:
            if self.store.run_state(request.run).phase.terminal:
                self.store.note_request(request.run, action, note.message, self.actor.name)
                return
            self.channel.request(note, timeout=ANSWER_TIMEOUT)
        except (FlowError, LookupError):
            pass  # no such run or action, or the store is busy: the refusal still stands

    def _ended(self, request: ControlRequest) -> ControlResult | None:
        """Answer a request on a run that has ended from keyed lookups; None if it is live."""
        state = self.store.run_state(request.run)
        if not state.phase.terminal:
            return None
        action = getattr(request, "action", None)
        group = getattr(request, "group", None)
        phase = state.phase.value
        if action is not None:
            target = self.store.run_state(request.run, action).target_phase
            assert target is not None
            phase = target.value
        elif group is not None and not self.store.group_phases(request.run, state.attempt, group):
            groups = self.store.groups(request.run, state.attempt)
            raise ActionNotFoundError.for_group(request.run, group, groups)
        what = describe_target(request.run, action, group)
        return ControlResult(
            outcome=Outcome.ALREADY_ENDED, phase=phase, message=f"{what} already finished: {phase}"
        )

    # -- retry and start ---------------------------------------------------------------

    def retry(self, run: str, max_actions: int | None = None) -> Run[Any]:
        """Run the next attempt of a FAILED, ABORTED, STOPPED or CRASHED run, in the foreground.

        Raises:
            InvalidStateError: the run succeeded or is still live, or its task
                cannot be imported.
        """
        self.authorize(Permission.EXECUTE)
        return retry_run(self.store, run, max_actions)

    def launch_retry(self, run: str) -> tuple[str, int]:
        """Start the next attempt of a run in a detached runner process; return (run, attempt).

        The runner is `flowsdk retry RUN` with the same store and interpreter,
        in the working directory the run was first started in when it still
        exists; it outlives this process. Returns once the new attempt is
        recorded.

        Raises:
            InvalidStateError: the run cannot be retried, or the runner failed
                before recording its attempt (its output is in the message).
        """
        self.authorize(Permission.EXECUTE)
        state = self.store.run_state(run)
        check_retryable(run, state.phase)
        first = self.store.load_run(run, 1).record
        attempt = state.attempt + 1
        launch(
            self.store,
            ["retry", "--quiet"],
            [run],
            first.workdir,
            lambda: attempt_recorded(self.store, run, attempt),
            f"attempt {attempt} of run {run!r}",
        )
        return run, attempt

    def launch_run(
        self,
        task: str,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> str:
        """Start a new run of a recorded root task in a detached runner process; return its name.

        Only a task already recorded as the root task of a run in this store
        may be started (so a request can never make the runner import a module
        nobody ran before). Arguments are JSON values, converted strictly to
        the parameters' annotations (passed with `flowsdk run --json-args`, so
        a string arrives as the string it is).

        Raises:
            InvalidStateError: the task was never recorded as a root task here,
                or the runner failed before recording its run.
            RunExistsError: a run of that name exists; nothing was started.
            ValueError: a keyword is not a parameter name (an ASCII identifier), or
                the run name is unusable; nothing was started.
        """
        self.authorize(Permission.EXECUTE)
        for key in kwargs or {}:
            # The runner's command line reads `key=value` only for such a key: any
            # other would arrive as another argument, or as the wrong one (`x=y`).
            if not (key.isascii() and key.isidentifier()):
                raise ValueError(
                    f"keyword argument {preview(key)} is not a parameter name (letters, digits "
                    "and _, not starting with a digit); nothing was started"
                )
        workdir = self.store.root_task_workdir(task)
        if workdir is None:
            raise InvalidStateError(
                f"task {task!r} was never the root task of a run in this store; only recorded "
                "tasks can be started here (start it once with flowsdk run)"
            )
        run = check_name("run", name) if name is not None else new_run_name(task.rpartition(".")[2])
        if attempt_recorded(self.store, run, 1):
            raise RunExistsError(
                f"a run named {run!r} already exists in this store; choose another name "
                "(nothing was started)"
            )
        import json  # here: importing flowsdk stays cheap (only launches need it)

        values = [json.dumps(v) for v in args or []]
        values += [f"{k}={json.dumps(v)}" for k, v in (kwargs or {}).items()]
        launch(
            self.store,
            ["run", "--name", run, "--quiet", "--json-args"],
            [task, *values],
            workdir,
            lambda: attempt_recorded(self.store, run, 1),
            f"run {run!r}",
        )
        return run


def check_request(request: ControlRequest) -> str | None:
    """Return a control request's reason, or refuse the request as `send` says.

    Checked before anything is recorded: a wrong call leaves no trace.
    """
    if not isinstance(request, AbortRequest | StopRequest | MarkFailedRequest):
        raise TypeError(
            "request must be an AbortRequest, a StopRequest or a MarkFailedRequest, not "
            f"{type(request).__name__}"
        )
    if isinstance(request, MarkFailedRequest) and request.action is None:
        raise TypeError(
            "mark_failed needs an action name (such as 'a3'), not None; to end the whole "
            "run, abort or stop it"
        )
    names = {"run": request.run, "action": getattr(request, "action", None)}
    names["group"] = getattr(request, "group", None)
    for what, name in names.items():
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{what} must be a string, not {type(name).__name__}")
    if names["action"] is not None and names["group"] is not None:
        raise ValueError("name an action or a group, not both")
    return check_reason(request.reason)


def _check_int(what: str, value: object, expected: str) -> None:
    # bool is an int to Python, never a count to a person.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be {expected}, not {type(value).__name__}")
