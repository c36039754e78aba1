"""Executors: the one place a task body is called, and how cancellation reaches it.

`executor=` on a `TaskEnvironment` (or a task) names one. The local executor
(the default) runs bodies as coroutines on the run's own event loop. Names are
resolved when a task is declared, so an unknown executor, or one whose extra is
not installed, is an error at decoration time, never in the middle of a run.
"""

from __future__ import annotations

from flowsdk.executors._local import LOCAL, Executor, LocalExecutor

__all__ = ["LOCAL", "Executor", "LocalExecutor", "get_executor"]

# Executors that exist in this version, by name.
_EXECUTORS: dict[str, Executor] = {"local": LOCAL}
# Executors that need an optional extra: name -> (module to probe, extra to install).
_EXTRAS = {"ray": ("ray", "ray")}


def get_executor(name: str | None) -> Executor:
    """Return the executor called `name` (`None` is `"local"`).

    Raises:
        ValueError: no executor has that name, or it needs an extra that is not
            installed; the message says what to install or which names exist.
    """
    if name is None:
        return LOCAL
    found = _EXECUTORS.get(name)
    if found is not None:
        return found
    known = ", ".join(repr(n) for n in sorted(_EXECUTORS))
    if name in _EXTRAS:
        import importlib.util

        module, extra = _EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"executor {name!r} needs the {module} package: pip install 'flowsdk[{extra}]'"
            )
        raise ValueError(
            f"executor {name!r} is not part of this version of flowsdk; the executors are {known}"
        )
    raise ValueError(f"unknown executor {name!r}; the executors are {known}")
