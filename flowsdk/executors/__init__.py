"""Executors: the one place a task body is called, and how cancellation reaches it.

`executor=` on a `TaskEnvironment` (or a task) names one. The local executor
(the default) runs bodies as coroutines on the run's own event loop. Names are
resolved when a task is declared, so an unknown executor, or one whose extra is
not installed, is an error at decoration time, never in the middle of a run.
"""

from __future__ import annotations

import importlib

from flowsdk.executors._local import LOCAL, Executor, LocalExecutor

__all__ = ["EXECUTORS", "LOCAL", "Executor", "LocalExecutor", "get_executor"]

EXECUTORS: dict[str, tuple[str, str, str | None]] = {
    "local": ("flowsdk.executors._local", "LOCAL", None),
    "ray": ("flowsdk.executors._ray", "RAY", "ray"),
}
"""Executor name -> (module, attribute, the extra that installs what the module imports).

An executor's module is imported when a task first names it, so an optional
one costs nothing to a program that does not use it.
"""


def get_executor(name: str | None) -> Executor:
    """Return the executor called `name` (`None` is `"local"`).

    Raises:
        ValueError: no executor has that name, or its module needs a package
            that is not installed; the message says which names exist, or
            which extra to install.
    """
    if name is None:
        return LOCAL
    entry = EXECUTORS.get(name)
    if entry is None:
        known = ", ".join(repr(n) for n in sorted(EXECUTORS))
        raise ValueError(f"unknown executor {name!r}; the executors are {known}")
    module, attribute, extra = entry
    try:
        found: Executor = getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        missing = exc.name or str(exc)
        install = f"pip install 'flowsdk[{extra}]'" if extra else f"install {missing}"
        raise ValueError(
            f"executor {name!r} needs the package {missing!r}, which is not installed: {install}"
        ) from None
    return found
