"""`TaskEnvironment` and the `@env.task` decorator."""

from __future__ import annotations

import functools
import inspect
import types
from asyncio import _get_running_loop
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Literal, ParamSpec, Protocol, TypeVar, overload

from flowsdk._action import current
from flowsdk._execute_thread import in_thread
from flowsdk._names import check_name
from flowsdk._options import DEFAULT_MAX_PAYLOAD, TaskOptions

__all__ = ["Task", "TaskEnvironment"]

P = ParamSpec("P")
R = TypeVar("R")

_UNSET: Any = object()
_current_get = current.get  # the calling action, on the per-call path
CacheMode = Literal["auto", "disable", "override"]
_OVERRIDABLE = frozenset(
    {
        "retries",
        "timeout",
        "deadline",
        "grace_period",
        "cache",
        "cache_version",
        "backoff",
        "max_payload",
        "ray_options",
        "log_level",
    }
)


class _Decorator(Protocol):
    """What `@env.task(...)` with options returns: a decorator keeping the signature."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


class TaskEnvironment:
    """Shared defaults for a family of tasks; `@env.task` declares one.

    Args:
        name: The environment's name; task names are `"<env>.<function>"`.
        retries: Extra attempts after a user exception (never after an abort,
            cancel, stop or `BaseException`).
        timeout: Seconds of running time for one attempt, else `None`; an
            attempt that exceeds it is cancelled and fails with `TaskTimeoutError`.
        deadline: Seconds from the action's first start across all its
            attempts, else `None`; when it passes, the running attempt is
            cancelled, no further attempt starts, and the action fails with
            `TaskTimeoutError`.
        grace_period: Seconds a cancelled body may spend in its cleanup before
            the runtime cancels it again.
        cache: Reuse a finished action's output for the same task version and
            inputs: `True` or `"auto"`; `False` or `"disable"` (the default);
            `"override"` runs the body again and replaces the cached value.
        cache_version: The task version for `cache`, a string (default `None`:
            a hash of the source).
        executor: Where bodies run; `None` (or `"local"`) runs them in-process.
        backoff: Seconds before the first retry; each further retry waits twice
            as long, at most 60 s.
        max_payload: The largest recorded input or output, in bytes (default 10 MiB).
        ray_options: With `executor="ray"`: Ray actor options for placement
            (`num_cpus`, `num_gpus`, `resources`, `memory`, `runtime_env`, ...);
            Ray's own retry and restart options are refused (`ValueError`).
        log_level: The lowest level of the `logging` records emitted in a body
            that are kept with its action (`"INFO"` by default; a name or a number).

    Raises:
        TypeError: `name`, `cache_version` or `executor` is not a string, or
            `ray_options` not a dict (nor `None` where allowed); the message
            names the option, the type given and what is accepted.
        ValueError: any other option of the wrong type or value, said the same way.
    """

    def __init__(
        self,
        name: str,
        *,
        retries: int = 0,
        timeout: float | None = None,
        grace_period: float = 10.0,
        cache: bool | CacheMode = False,
        cache_version: str | None = None,
        executor: str | None = None,
        backoff: float = 1.0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        deadline: float | None = None,
        ray_options: dict[str, Any] | None = None,
        log_level: int | str = "INFO",
    ) -> None:
        self.name = check_name("environment", name)
        self.options = TaskOptions(
            retries=retries,
            timeout=timeout,
            grace_period=grace_period,
            backoff=backoff,
            cache=cache,
            cache_version=cache_version,
            executor=executor,
            max_payload=max_payload,
            deadline=deadline,
            ray_options=ray_options,
            log_level=log_level,
        )
        self._tasks: dict[str, Task[Any, Any]] = {}

    def __repr__(self) -> str:
        return f"TaskEnvironment({self.name!r})"

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        retries: int = ...,
        timeout: float | None = ...,
        deadline: float | None = ...,
        grace_period: float = ...,
        cache: bool | CacheMode = ...,
        cache_version: str | None = ...,
        backoff: float = ...,
        max_payload: int = ...,
        ray_options: dict[str, Any] | None = ...,
        log_level: int | str = ...,
    ) -> _Decorator: ...

    def task(self, *fn: Any, **overrides: Any) -> Any:
        """Declare an `async def` (or a plain `def`) function as a task of this environment.

        A plain `def` body runs in a worker thread of its own. Usable bare
        (`@env.task`) or with overrides of the environment's defaults
        (`@env.task(retries=2, timeout=60)`).

        Raises:
            TypeError: `fn` is neither an `async def` nor a plain `def` function,
                an option is unknown, `cache_version` is not a string or `None`,
                or `ray_options` is not a dict or `None`.
            ValueError: an option is of the wrong type or out of range (the
                message names it, the type given and what is accepted), or the
                environment already has a task of that name.
        """
        unknown = set(overrides) - _OVERRIDABLE
        if unknown:
            raise TypeError(
                f"unknown task option(s) {', '.join(sorted(unknown))}; "
                f"the options are {', '.join(sorted(_OVERRIDABLE))}"
            )
        options = self.options.replace(**overrides)

        def decorate(fn: Callable[P, Any]) -> Task[P, Any]:
            task: Task[P, Any] = Task(fn, self, options)
            if task.name in self._tasks:
                raise ValueError(
                    f"environment {self.name!r} already has a task named {task.name!r}; "
                    "give the function another name or use another environment"
                )
            self._tasks[task.name] = task
            return task

        if not fn:
            return decorate
        if len(fn) > 1 or overrides:
            raise TypeError("use @env.task or @env.task(option=value, ...)")
        return decorate(fn[0])


class Task(Generic[P, R]):
    """An `async def` function declared with `@env.task`.

    Outside a run, calling it is calling the plain function (for an `async
    def`, its coroutine; no action, no store), so task bodies are
    unit-testable as they are. Inside a run, calling it returns an awaitable
    that starts a child action of the calling action when it first runs.
    """

    # What the runtime reads on every call lives in slots: on 3.11 an attribute in
    # the instance's dictionary is not reliably specialised by the interpreter.
    # The dictionary stays, for what functools.update_wrapper copies.
    __slots__ = (
        "__dict__", "__weakref__", "_handle", "_shape", "_waiter",
        "body", "env", "fn", "name", "options", "signature",
    )  # fmt: skip

    # Copied from the function by functools.update_wrapper; declared for type checkers.
    __name__: str
    __qualname__: str

    def __init__(self, fn: Callable[P, Any], env: TaskEnvironment, options: TaskOptions) -> None:
        is_async = inspect.iscoroutinefunction(fn)
        if not is_async and not _plain_function(fn):
            shown = getattr(fn, "__qualname__", repr(fn))
            raise TypeError(
                f"@{env.name}.task needs an 'async def' or a plain 'def' function; "
                f"{shown!r} is a {_kind(fn)}."
            )
        functools.update_wrapper(self, fn)
        self.fn = fn
        # A plain `def` runs in a worker thread, so blocking code does not block the loop.
        self.body: Callable[..., Coroutine[Any, Any, Any]] = fn if is_async else in_thread(fn)
        self.env = env
        self.options = options
        self.name = check_name("task", f"{env.name}.{check_name('task', fn.__name__)}")
        self.signature = inspect.signature(fn)
        self._handle: Callable[..., Coroutine[Any, Any, R]] | None = None  # `_make_handle`
        self._waiter: Callable[..., Coroutine[Any, Any, R]] | None = None  # `_make_handle`
        self._shape: Any = None  # what `_payload` learnt of the signature, once it has

    def _make_handle(self) -> Callable[..., Coroutine[Any, Any, R]]:
        """Make the runtime's handle function, copied under the user's function name.

        So that Python's "coroutine ... was never awaited" warning names the
        user's function, not an SDK wrapper. Made on the first call in a run
        (`Runtime.call`) and kept in `_handle`: declaring a task does not load
        the runtime. The handle's course in a task of its own, once the run's
        task factory started the action (`_execute.hosted_wait`), is copied
        the same way (`_waiter`): such a task shows the function's name too.
        """
        from flowsdk._execute import action_handle, hosted_wait  # `import flowsdk` stays light

        fn = self.fn
        handle = types.FunctionType(action_handle.__code__, action_handle.__globals__, fn.__name__)
        handle.__qualname__ = fn.__qualname__
        waiter = types.FunctionType(hosted_wait.__code__, hosted_wait.__globals__, fn.__name__)
        waiter.__qualname__ = fn.__qualname__
        self._waiter = waiter
        self._handle = handle
        return handle

    def __repr__(self) -> str:
        return f"<flowsdk task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        parent = _current_get()
        if parent is None or parent.runtime.loop is not _get_running_loop():
            # Outside a run -- or in a thread that inherited a run's context
            # (asyncio.to_thread) but not its loop: the plain function, no action.
            plain: Coroutine[Any, Any, R] = self.fn(*args, **kwargs)
            return plain
        return parent.runtime.call(self, parent, args, kwargs)


def _plain_function(fn: object) -> bool:
    """Say whether `fn` is a plain (sync, non-generator) function or method."""
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        return False
    return not (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn))


def _kind(fn: object) -> str:
    if inspect.isclass(fn):
        return "class"
    if inspect.isgeneratorfunction(fn):
        return "generator function"
    if inspect.isasyncgenfunction(fn):
        return "async generator function"
    return type(fn).__name__
