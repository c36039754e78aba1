"""Task options and the shape of a task as the runtime and the recorder see it."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from flowsdk.executors import EXECUTORS, get_executor

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "TaskOptions",
    "TaskSpec",
    "check_cache_version",
    "level_number",
    "lowest_log_level",
]

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

    _waiter: Callable[..., Coroutine[Any, Any, Any]] | None
    """The rest of the handle in a task of its own, once made (`_make_handle`)."""

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
            raise ValueError(_refused("max_payload", "a number of bytes > 0 (an int)", max_payload))
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(_refused("retries", "a whole number >= 0 (an int)", retries))
        if timeout is not None and not _positive(timeout):
            raise ValueError(_refused("timeout", "a number of seconds > 0 or None", timeout))
        if deadline is not None and not _positive(deadline):
            raise ValueError(_refused("deadline", "a number of seconds > 0 or None", deadline))
        # Finite: a cancelled body that never ends its cleanup must not hang the run.
        if not _positive(grace_period, allow_zero=True, finite=True):
            raise ValueError(
                _refused("grace_period", "a finite number of seconds >= 0", grace_period)
            )
        if not _positive(backoff, allow_zero=True):
            raise ValueError(_refused("backoff", "a number of seconds >= 0", backoff))
        if not isinstance(cache, bool | str) or cache not in _CACHE_MODES:
            # A list or a dict is refused here too, before the lookup could say "unhashable".
            raise ValueError(
                _refused("cache", "True, False, 'auto', 'disable' or 'override'", cache)
            )
        check_cache_version(cache_version)
        names = ", ".join(repr(n) for n in sorted(EXECUTORS))
        _need("executor", executor, str, f"an executor's name ({names}) or None")
        _need("ray_options", ray_options, Mapping, "a dict of Ray actor options or None")
        # The lowest level of the `logging` records kept with the action (a number).
        self.log_level = level_number(log_level)
        self.runner = runner = get_executor(executor)  # ValueError for an unknown or missing one
        self.ray_options = runner.check_options(ray_options)
        self.retries = retries
        self.timeout = None if timeout is None else float(timeout)
        self.grace_period = float(grace_period)
        self.backoff = float(backoff)
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
        global _lowest_log_level
        if self.log_level < _lowest_log_level:  # declared and valid: its runs capture that low
            _lowest_log_level = self.log_level

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

# The lowest `log_level` of the tasks declared in this process (INFO at least): the
# level `_logs` lowers the root logger to while runs go on, so that a task's records
# at its level are made at all under Python's default configuration (root: WARNING).
_lowest_log_level = logging.INFO


def lowest_log_level() -> int:
    """Return the lowest `log_level` of the tasks declared so far, or INFO if none is lower."""
    return _lowest_log_level


def check_cache_version(version: object) -> None:
    """Refuse a `cache_version` that the store could not keep (at decoration, not in a run).

    Raises:
        TypeError: neither a string nor None.
        ValueError: a string with a NUL character or one that is not valid
            Unicode (a lone surrogate): no store can write it.
    """
    if version is None:
        return
    if not isinstance(version, str):
        raise TypeError(
            _refused("cache_version", "a string (the task's version for cache=) or None", version)
        )
    try:
        version.encode("utf-8")
    except UnicodeEncodeError:
        bad = True
    else:
        bad = "\x00" in version
    if bad:
        raise ValueError(
            _refused("cache_version", "text without NUL characters or lone surrogates", version)
        )


def _need(option: str, value: object, kind: type, accepted: str) -> None:
    """Raise `TypeError` naming `option` unless `value` is None or a `kind`."""
    if value is not None and not isinstance(value, kind):
        raise TypeError(_refused(option, accepted, value))


_SHOWN = 80  # characters of a refused value's repr, at most


def _refused(option: str, accepted: str, value: object) -> str:
    """Say which option refused which value, of which type, and what it accepts."""
    shown = repr(value)
    if len(shown) > _SHOWN:  # a huge value would bury the message
        shown = shown[: _SHOWN - 3] + "..."
    if value is not None:
        shown = f"{type(value).__name__} {shown}"
    return f"{option} must be {accepted}, not {shown}"


def _positive(value: object, *, allow_zero: bool = False, finite: bool = False) -> bool:
    """Say whether `value` is seconds > 0 (>= 0 with `allow_zero`; not infinite with `finite`)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float: no timer can count it
        return False
    if math.isnan(seconds) or (finite and math.isinf(seconds)):
        return False
    return seconds >= 0 if allow_zero else seconds > 0


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
        _refused(
            "log_level",
            "a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL or an int >= 0)",
            level,
        )
    )
