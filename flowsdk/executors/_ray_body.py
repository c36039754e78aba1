"""How a task's function travels to Ray workers, and what is said when it cannot.

The driver pickles the function as declared (`Task.fn`, `async def` or plain
`def`) with cloudpickle, once per task; the worker makes what runs it
(`_ray_worker.RemoteTask`: a thread for a plain `def`). So nothing of the
driver's own machinery is pickled with it. Flowsdk tasks the function refers
to travel as their names and refuse to be called on the worker (SPEC §9: no
nested actions in v1).

When pickling fails, cloudpickle says which type failed but not where it
was met. `body_bytes` then looks for it among what the function refers to
(its globals, closure variables and defaults, and those of the functions
pickled with it) and names it; when the path to it runs through flowsdk's
own code, the message says so instead of blaming the user's function.
"""

from __future__ import annotations

import functools
import inspect
import io
import pickle
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flowsdk.errors import SerializationError
from flowsdk.executors._ray_worker import refused_task

if TYPE_CHECKING:
    from flowsdk._options import TaskSpec

__all__ = ["body_bytes"]

DEPTH = 4
"""How many functions deep the search for what cannot be pickled follows references."""


def body_bytes(task: TaskSpec) -> bytes:
    """Return `task`'s function pickled for a Ray worker (made once per task, then kept).

    Raises:
        SerializationError: it cannot be pickled; the message names what it
            refers to that cannot, when that is found.
    """
    cached: bytes | None = task.__dict__.get("_ray_body")
    if cached is None:
        try:
            cached = _dumps(task.fn)
        except Exception as exc:
            raise SerializationError(_unsendable(task, exc)) from exc
        task.__dict__["_ray_body"] = cached
    return cached


@functools.cache
def _pickler() -> Any:
    """The cloudpickle pickler that sends flowsdk tasks as stand-ins (made on first use)."""
    from ray import cloudpickle

    base: Any = cloudpickle.CloudPickler

    class Pickler(base):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            kind = type(obj)
            if kind.__name__ == "Task" and kind.__module__ == "flowsdk._task":
                return (refused_task, (obj.name,))
            return super().reducer_override(obj)

    return Pickler


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _pickler()(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _unsendable(task: TaskSpec, exc: Exception) -> str:
    """Say why `task`'s function cannot be sent, naming the culprit when it is found."""
    head = f"task {task.name!r} cannot be sent to Ray: "
    fn = task.fn
    found = _culprit(fn, DEPTH)
    if found is None:
        return head + (
            f"its function, or something it refers to, cannot be pickled ({_text(exc)}); keep "
            "what it uses picklable, or create it inside the function"
        )
    path, value, error = found
    kind = type(value)
    what = f"{path[-1][0]} (a {kind.__module__}.{kind.__qualname__})"
    functions = [fn, *(v for _, v in path[:-1])]
    ours = next((f for f in functions if _is_flowsdk(f)), None)
    if ours is not None:
        # flowsdk's own code is on the way: the user's function is not to blame.
        return head + (
            f"flowsdk's own {'.'.join(_where(ours))} cannot be pickled, because of {what} "
            f"({_text(error)}). This is a flowsdk bug, not a problem with your function: "
            "please report it"
        )
    # "refers, through the global 'helper', to the global 'lock'": the way there, if any.
    through = "".join(f", through {label}" for label, _ in path[:-1]) + ("," if path[1:] else "")
    if _is_flowsdk(value):
        return head + (
            f"its function refers{through} to {what}, a flowsdk object that cannot be sent "
            f"to a worker ({_text(error)}); create it inside the function, or pass plain "
            "values as arguments"
        )
    return head + (
        f"its function refers{through} to {what}, which cannot be pickled ({_text(error)}); "
        "create it inside the function, pass plain values as arguments, or make it picklable"
    )


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _culprit(fn: Any, depth: int) -> tuple[list[tuple[str, Any]], Any, Exception] | None:
    """Find what `fn` refers to that cannot be pickled: the path to it, it, and the error.

    The path is (label, value) pairs from `fn` on. A function that fails is
    searched in turn, `depth` functions deep (cloudpickle pickles a function
    that cannot be imported by value, with what it refers to).
    """
    for label, value in _references(fn):
        try:
            _dumps(value)
        except Exception as exc:
            if depth > 1 and inspect.isfunction(value):
                deeper = _culprit(value, depth - 1)
                if deeper is not None:
                    path, culprit, error = deeper
                    return [(label, value), *path], culprit, error
            return [(label, value)], value, exc
    return None


def _references(fn: Any) -> Iterator[tuple[str, Any]]:
    """Yield what cloudpickle pickles with `fn`: the globals it names, its closure, its defaults."""
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return
    names: set[str] = set()
    codes = [code]
    while codes:  # nested functions, lambdas and comprehensions have code of their own
        current = codes.pop()
        names.update(current.co_names)
        codes.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    scope: dict[str, Any] = getattr(fn, "__globals__", {})
    for name in sorted(names & scope.keys()):
        yield f"the global {name!r}", scope[name]
    for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not yet assigned holds nothing to pickle
            continue
        yield f"the variable {name!r}", value
    for name, parameter in inspect.signature(fn, follow_wrapped=False).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            yield f"the default of {name!r}", parameter.default


def _where(value: Any) -> tuple[str, str]:
    """Return the module and qualified name where `value` (or, for an object, its class) is defined.

    For a function, where its code is: `functools.wraps` gives a wrapper the
    `__module__` and `__qualname__` of the function it wraps.
    """
    if inspect.isfunction(value):
        return value.__globals__.get("__name__", "?"), value.__code__.co_qualname
    owner = value if isinstance(value, type) else type(value)
    return owner.__module__, owner.__qualname__


def _is_flowsdk(value: Any) -> bool:
    """Say whether `value` (a function, a class, or an object of a class) is flowsdk's."""
    module = _where(value)[0]
    return module == "flowsdk" or module.startswith("flowsdk.")
