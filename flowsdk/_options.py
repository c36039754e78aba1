"""Task options and the shape of a task as the runtime and the recorder see it."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from flowsdk.executors import get_executor

__all__ = ["DEFAULT_MAX_PAYLOAD", "TaskOptions", "TaskSpec"]

DEFAULT_MAX_PAYLOAD = 10 * 1024 * 1024
"""Bytes of a task's recorded inputs or output, at most, unless `max_payload=` says otherwise."""


class TaskSpec(Protocol):
    """What the runtime and the recorder use of a task (`flowsdk.Task` is one).

    A protocol, so that the runtime does not depend on the decorator module
    that depends on it.
    """

    name: str
    fn: Callable[..., Any]
    body: Callable[..., Coroutine[Any, Any, Any]]
    """What runs one attempt: `fn`, or for a plain `def` a coroutine running it in a thread."""
    options: TaskOptions
    signature: inspect.Signature
    __dict__: dict[str, Any]

    _handle: Callable[..., Coroutine[Any, Any, Any]] | None
    """The coroutine function a call returns in a run, once made (`_make_handle`)."""

    _shape: Any
    """What the payload encoder learnt of the signature, once it has (None before)."""

    def _make_handle(self) -> Callable[..., Coroutine[Any, Any, Any]]: ...


class TaskOptions:
    """The resolved options of one task (environment defaults plus overrides)."""

    __slots__ = (
        "backoff",
        "cache",
        "cache_override",
        "cache_version",
        "deadline",
        "driver_timeout",
        "executor",
        "grace_period",
        "log_level",
        "max_payload",
        "ray_options",
        "retries",
        "runner",
        "timed",
        "timeout",
    )

    def __init__(
        self,
        *,
        retries: int,
        timeout: float | None,
        grace_period: float,
        backoff: float,
        cache: bool | str,
        cache_version: str | None,
        executor: str | None,
        max_payload: int,
        deadline: float | None = None,
        ray_options: Mapping[str, Any] | None = None,
        log_level: int | str = "INFO",
    ) -> None:
        if not isinstance(max_payload, int) or isinstance(max_payload, bool) or max_payload <= 0:
            raise ValueError(f"max_payload must be a number of bytes > 0, not {max_payload!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, not {retries!r}")
        if timeout is not None and not _positive(timeout):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, not {timeout!r}")
        if deadline is not None and not _positive(deadline):
            raise ValueError(f"deadline must be a number of seconds > 0 or None, not {deadline!r}")
        if not _positive(grace_period, allow_zero=True):
            raise ValueError(f"grace_period must be a number of seconds >= 0, not {grace_period!r}")
        if not _positive(backoff, allow_zero=True):
            raise ValueError(f"backoff must be a number of seconds >= 0, not {backoff!r}")
        # The lowest level of the `logging` records kept with the action (a number).
        self.log_level = level_number(log_level)
        self.runner = runner = get_executor(executor)  # ValueError for an unknown or missing one
        self.ray_options = runner.check_options(ray_options)
        self.retries = retries
        self.timeout = None if timeout is None else float(timeout)
        self.grace_period = float(grace_period)
        self.backoff = float(backoff)
        if cache not in _CACHE_MODES or not isinstance(cache, bool | str):
            raise ValueError(
                f"cache must be True, False, 'auto', 'disable' or 'override', not {cache!r}"
            )
        self.cache = _CACHE_MODES[cache] is not False
        # "override": run the body even when a cached value exists, then replace it.
        self.cache_override = _CACHE_MODES[cache] is None
        self.deadline = None if deadline is None else float(deadline)
        # The timeout the runtime's own timer counts (an executor may count it where
        # the body runs: Ray counts from the body's start on its worker).
        self.driver_timeout = None if runner.times_attempts else self.timeout
        self.timed = self.driver_timeout is not None or deadline is not None  # one test per attempt
        self.cache_version = cache_version
        self.executor = executor
        self.max_payload = max_payload

    def replace(self, **overrides: Any) -> TaskOptions:
        """Return a copy with `overrides` applied (unset values keep this copy's)."""
        values = {name: getattr(self, name) for name in self.__slots__ if name not in _DERIVED}
        values["cache"] = "override" if self.cache_override else self.cache
        values.update(overrides)
        return TaskOptions(**values)


# Flyte's cache values too: "auto" caches, "disable" does not, "override" runs
# again and replaces the cached value (None here).
_CACHE_MODES: dict[object, bool | None] = {
    True: True,
    False: False,
    "auto": True,
    "disable": False,
    "override": None,
}
_DERIVED = frozenset({"runner", "cache_override", "timed", "driver_timeout"})


def _positive(value: object, *, allow_zero: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return False
    return value >= 0 if allow_zero else value > 0


def level_number(level: int | str) -> int:
    """Return the number of a logging level given as a name or a number.

    Raises:
        ValueError: not a level.
    """
    if isinstance(level, str) and isinstance(logging.getLevelName(level.upper()), int):
        number: int = logging.getLevelName(level.upper())
        return number
    if isinstance(level, int) and not isinstance(level, bool) and level >= 0:
        return level
    raise ValueError(
        f"log_level must be a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL or a "
        f"number >= 0), not {level!r}"
    )
