"""The Ray executor: bodies run as methods of async Ray actors (SPEC §9).

The action stays in the driver (the run's process): its record, phases,
retries, timeout and grace period are the runtime's, as for a local body.
Only the body crosses: `call` sends the action's recorded inputs (the
MessagePack bytes flowsdk already recorded) to one actor of the
environment's pool, which runs the body alone and answers in turns
(`_ray_worker`); the output comes back as recorded bytes.

Cancellation: the first `cancel` sends the request to the actor, which
cancels the body's task there with the request's message (its `except` and
`finally` run on the worker, and the driver keeps waiting for the outcome,
as for a local body in cleanup). A cancel that arrives before the body has
started is noted by the actor, and that body never starts. The second
`cancel` (the grace period is over) kills the actor's worker process: the
action ends cancelled, `cleanup_incomplete=true`, and the pool replaces the
actor. A direct cancellation of the action's task (the run's final drain) is
forwarded the same way; a driver that stops waiting altogether kills the
actor, so that no body runs on unrecorded.

A plain `def` body runs in a thread on its worker, which no cancel can
interrupt: as locally, a cancel ends the action at once (recorded
`cleanup_incomplete`), and the function may run on, on an actor that gets
no other body, until it ends or its grace period is over; then the actor
exits (`BodyActor.retire`).

Ray is imported on first use, never by `import flowsdk`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import os
import pickle
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from flowsdk._action import ActionState, current
from flowsdk._payload import decode_output
from flowsdk._records import EventKind
from flowsdk.executors._ray_body import body_bytes
from flowsdk.executors._ray_worker import BodyActor, Reply
from flowsdk.executors._remote import deliver_remote_report

if TYPE_CHECKING:
    from flowsdk._options import TaskSpec

if importlib.util.find_spec("ray") is None:  # get_executor turns this into "install flowsdk[ray]"
    raise ImportError("No module named 'ray'", name="ray")

__all__ = ["RAY", "RayExecutor"]

logger = logging.getLogger("flowsdk")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode

RETRY_OPTIONS = ("max_retries", "retry_exceptions", "max_restarts", "max_task_retries")
MANAGED_OPTIONS = (
    "max_concurrency",
    "concurrency_groups",
    "name",
    "namespace",
    "lifetime",
    "get_if_exists",
    "num_returns",
)


class _Actor:
    """One actor of a pool: its handle, and the bodies it has been sent."""

    __slots__ = ("handle", "id", "known", "pid")

    def __init__(self, handle: Any, pid: int, actor_id: str) -> None:
        self.handle = handle
        self.pid = pid
        self.id = actor_id
        self.known: set[str] = set()


class _Pool:
    """The actors of one environment (and one set of `ray_options`) that no body holds.

    An actor still starting stays in the pool (with its first call) until a
    body waits for it to the end: a body cancelled while its actor starts
    leaves that actor to the next body instead of making another.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.idle: list[_Actor] = []
        self.starting: list[tuple[Any, Any]] = []

    async def acquire(self, actor_class: Any) -> _Actor:
        """Take an idle actor, else one that is starting, else start one; wait until it answers."""
        if self.idle:
            return self.idle.pop()
        if self.starting:
            handle, ping = self.starting.pop()
        else:
            handle = actor_class.options(**self.options).remote()
            ping = handle.ping.remote()
        try:
            pid, actor_id = await asyncio.shield(asyncio.wrap_future(ping.future()))
        except asyncio.CancelledError:
            self.starting.append((handle, ping))
            raise
        return _Actor(handle, pid, actor_id)


class _Remote:
    """The state of one attempt on Ray, as `cancel` needs it."""

    __slots__ = ("action", "actor", "call_id", "ended", "killed", "retired", "sent", "sent_at")

    def __init__(self, action: ActionState) -> None:
        self.action = action
        self.actor: _Actor | None = None
        self.call_id: int | None = None
        self.sent = False  # the cancel request has been sent to the actor
        self.sent_at = 0.0  # when (`time.monotonic()`): the grace period counts from there
        self.killed = False  # the actor was killed by the second cancel
        self.retired = False  # the actor still runs a cancelled `def` body: not reused
        self.ended = False  # the body's outcome came back


class RayExecutor:
    """Runs bodies on Ray, each alone on an async actor of its environment's pool."""

    name = "ray"
    times_attempts = True
    """The attempt's `timeout` is counted on the worker, from the body's start."""

    def __init__(self) -> None:
        self._calls: dict[asyncio.Task[Any], _Remote] = {}
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._actor_class: Any = None
        self.started_cluster = False
        """Whether flowsdk started the local cluster this process uses (shut down at exit)."""

    def __reduce__(self) -> tuple[Callable[[], RayExecutor], tuple[()]]:
        # A body shipped to a worker may reach an environment: it gets that
        # process's executor, never a copy of this one's actors.
        return (_executor, ())

    def check_options(self, options: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Validate `ray_options`: placement options for the actors (SPEC §9).

        Raises:
            ValueError: an option that would turn on Ray's own retries or
                restarts, or one that flowsdk manages itself.
        """
        if options is None:
            return None
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise ValueError(f"ray_options must be a dict of Ray actor options, not {options!r}")
        retries = sorted(k for k in options if k in RETRY_OPTIONS)
        if retries:
            raise ValueError(
                f"ray_options may not set {', '.join(retries)}: Ray's own retries and restarts "
                "stay off, flowsdk's retries= is the one retry mechanism"
            )
        managed = sorted(k for k in options if k in MANAGED_OPTIONS)
        if managed:
            raise ValueError(
                f"ray_options may not set {', '.join(managed)}: flowsdk manages its actors "
                "(one body at a time each); pass placement options such as num_cpus, num_gpus, "
                "resources, memory or runtime_env"
            )
        return dict(options)

    def call(
        self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[Any]:
        """Return the coroutine that runs one attempt of the current action's body on Ray.

        `fn`, `args` and `kwargs` are what a local body would get; the remote
        body gets the action's recorded inputs instead (the same values).
        """
        action = current.get()
        assert action is not None, "the Ray executor is called from an action's task"
        return self._attempt(action)

    def cancel(self, task: asyncio.Task[Any], message: str) -> bool:
        """First call: cancel the remote body with `message`; second: kill its actor."""
        remote = self._calls.get(task)
        if remote is None or remote.call_id is None:
            # Not on Ray at this moment (starting, or between attempts): a local cancel.
            return task.cancel(message)
        if remote.ended:
            return False
        if not remote.sent:
            self._send_cancel(remote, message)
            return True
        self._kill(remote)
        return True

    # -- one attempt ---------------------------------------------------------------

    async def _attempt(self, action: ActionState) -> Any:
        atask = action.atask
        assert atask is not None
        remote = self._calls[atask] = _Remote(action)
        try:
            return await self._run(action, remote)
        finally:
            del self._calls[atask]
            actor = remote.actor
            if actor is not None and not remote.killed and not remote.retired:
                if remote.ended:
                    self._pool(action.task).idle.append(actor)
                else:
                    # The driver stops waiting while the body may still run: stop it.
                    self._kill(remote)

    async def _run(self, action: ActionState, remote: _Remote) -> Any:
        actor_class = self._actor_class
        if actor_class is None:
            actor_class = await self._connect()
        task = action.task
        options = task.options
        pickled = body_bytes(task)  # SerializationError before an actor is taken
        remote.actor = actor = await self._pool(task).acquire(actor_class)
        remote.call_id = call_id = next(self._ids)
        body = None if task.name in actor.known else pickled
        info = (
            action.run,
            action.name,
            task.name,
            action.attempt,
            action.group,
            action.key,
            options.timeout,
        )
        limits = (options.max_payload, options.log_level)
        packed = _encode((task.name, action.inputs, info, limits, body))
        ref = actor.handle.run.remote(call_id, packed)
        actor.known.add(task.name)
        action.runtime.event(
            EventKind.ACTION,
            action.name,
            phase="RUNNING",
            message=(
                f"running on Ray: actor {actor.id} (pid {actor.pid}), task {ref.task_id().hex()}"
            ),
        )
        reply: Reply
        while True:
            try:
                reply = await _settled(ref)
            except asyncio.CancelledError as exc:
                # The action's task itself was cancelled (the run's final drain):
                # the body is cancelled where it runs, and waited for.
                if remote.killed:
                    raise
                if not remote.sent:
                    self._send_cancel(remote, _message(exc))
                continue
            except Exception as exc:
                if remote.sent and not remote.killed:
                    # Ray gave up on the call it was cancelling (its own cancellation
                    # overtook flowsdk's): make sure that body cannot run on.
                    self._kill(remote)
                if remote.killed:
                    raise asyncio.CancelledError(
                        "flowsdk: the body ignored its cancellation past its grace period; "
                        "its Ray actor was killed"
                    ) from None
                # The worker or its node died: the action fails (and is retried).
                remote.killed = True  # not returned to the pool
                raise exc from None
            if reply[0] == "done":
                break
            acks = await self._handle(action, remote, reply[1])
            ref = actor.handle.resume.remote(call_id, acks)
        remote.ended = True
        status, data = reply[1]
        if status == "ok":
            return decode_output(task, data)
        if status == "cancelled":
            raise asyncio.CancelledError(data or "flowsdk: cancelled on Ray")
        if status == "cancelled_running":
            self._retire(remote)
            raise asyncio.CancelledError(data or "flowsdk: cancelled on Ray")
        raise _rebuild(data)

    async def _handle(
        self, action: ActionState, remote: _Remote, messages: list[tuple[Any, ...]]
    ) -> list[tuple[int, str | None]]:
        """Act on what a remote body said: log records, reports, its timeout."""
        acks: list[tuple[int, str | None]] = []
        for message in messages:
            kind = message[0]
            if kind == "log":
                record = logging.makeLogRecord(message[1])
                logging.getLogger(record.name).handle(record)
            elif kind == "report":
                _, seq, value, step, name = message
                try:
                    await deliver_remote_report(action, value, step, name)
                except Exception as exc:
                    acks.append((seq, f"{type(exc).__name__}: {exc}"))
                else:
                    if remote.sent:
                        # Cancelled meanwhile (an observer pruned it at this report): no
                        # ack, so the body waits at this report until the cancel reaches
                        # it. An async actor may run the ack's call before the cancel's
                        # (Ray keeps no order between them), and the body would go on.
                        continue
                    acks.append((seq, None))
            elif kind == "timeout":
                action.runtime.on_timeout(action)
        return acks

    def _retire(self, remote: _Remote) -> None:
        """A cancelled plain `def` body's function still runs: let it, within its grace period.

        A thread cannot be interrupted. As locally, the action ends now and is
        recorded `cleanup_incomplete`; the actor gets no other body, and ends
        once the function ends or the grace period (counted from the cancel)
        is over. Dropping the handle here does not end it sooner: Ray lets the
        pending `retire` call finish first.
        """
        remote.retired = True
        action = remote.action
        action.cleanup_incomplete = True
        actor = remote.actor
        assert actor is not None
        left = action.task.options.grace_period - (time.monotonic() - remote.sent_at)
        actor.handle.retire.remote(remote.call_id, max(0.0, left))

    def _send_cancel(self, remote: _Remote, message: str) -> None:
        remote.sent = True
        remote.sent_at = time.monotonic()
        actor = remote.actor
        assert actor is not None
        req = remote.action.req
        request = (
            (req.cause.value, req.reason, req.by, req.at)
            if req is not None
            else ("cancelled", None, None, 0.0)
        )
        actor.handle.cancel.remote(remote.call_id, message, request)

    def _kill(self, remote: _Remote) -> None:
        remote.killed = True
        actor = remote.actor
        if actor is not None:
            import ray

            ray.kill(actor.handle, no_restart=True)

    # -- pools and the cluster -------------------------------------------------------

    def _pool(self, task: TaskSpec) -> _Pool:
        env = task.name.rpartition(".")[0]
        options = task.options.ray_options or {}
        key = (env, repr(sorted(options.items())))
        pool = self._pools.get(key)
        if pool is None:
            # An idle actor holds no CPU unless the options ask for one (Ray's default
            # would keep a CPU per actor for placement, and a pool would starve).
            pool = self._pools[key] = _Pool(
                {"num_cpus": 0, **options, "max_restarts": 0, "max_task_retries": 0}
            )
        return pool

    async def _connect(self) -> Any:
        """Connect to Ray (SPEC §9: this process's cluster, `$RAY_ADDRESS`, or a local one)."""
        ray = sys.modules.get("ray")
        initialized = getattr(ray, "is_initialized", None)  # None while Ray is being imported
        if not self._lock.locked() and initialized is not None and initialized():
            return self.connect()
        # Starting or joining a cluster takes seconds: not on the run's loop.
        return await asyncio.to_thread(self.connect)

    def connect(self) -> Any:
        """Connect to Ray now (the first Ray body does it otherwise); return the actor class."""
        with self._lock:
            if self._actor_class is not None:
                return self._actor_class
            address = os.environ.get("RAY_ADDRESS")
            local = "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
            local = local and not address
            if local:
                _loopback_only()
            import ray

            if not ray.is_initialized():
                if address:
                    ray.init(address=address, configure_logging=False)
                else:
                    # A cluster of this process's own: loopback only, no dashboard,
                    # no usage report; Ray shuts it down when the process exits.
                    ray.init(
                        address="local",
                        include_dashboard=False,
                        _node_ip_address="127.0.0.1",
                        configure_logging=False,
                    )
                    self.started_cluster = True
            self._actor_class = ray.remote(BodyActor)
            return self._actor_class


def _loopback_only() -> None:
    """Make a local cluster started by this process listen on loopback only."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray binds every interface unless it takes this machine for a laptop;
    # the setting is read by Ray's processes and, once, when Ray is imported.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


async def _settled(ref: Any) -> Reply:
    """Await a Ray reference; a cancellation of the awaiter does not reach the reference.

    (Cancelling the future of an awaited reference makes Ray cancel the actor
    task; flowsdk cancels the body with its own request instead.)
    """
    reply: Reply = _decode(await asyncio.shield(asyncio.wrap_future(ref.future())))
    return reply


def _message(exc: BaseException) -> str:
    if exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return "flowsdk: cancelled"


def _rebuild(data: tuple[bytes | None, str, str, str, str]) -> BaseException:
    """Rebuild a remote exception: the original type and message, the remote traceback as a note."""
    pickled, module, qualname, message, text = data
    exc: BaseException | None = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = _by_name(module, qualname, message)
    exc.add_note(f"Raised on a Ray worker:\n{text.rstrip()}")
    return exc


def _by_name(module: str, qualname: str, message: str) -> BaseException:
    """An exception of the named type with `message`, or of a same-named stand-in type."""
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, BaseException):
        try:
            rebuilt: BaseException = found(message)
        except Exception:
            pass
        else:
            return rebuilt
    stand_in = type(qualname.rpartition(".")[2], (Exception,), {"__module__": module})
    made: BaseException = stand_in(message)
    return made


RAY = RayExecutor()


def _executor() -> RayExecutor:
    return RAY
