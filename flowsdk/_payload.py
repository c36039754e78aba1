"""Recording action inputs and outputs with msgspec (MessagePack).

Inputs are encoded by the call `task(...)` itself, which both records them and
snapshots them: the child's body receives values decoded from the recording,
so a caller that mutates a list after the call changes nothing. Immutable
scalars are passed through as they are (their snapshot is themselves).
Recorded bytes keep the caller's dictionary order; `canonical()` re-encodes
with sorted keys, so equal inputs compare equal whatever their order: that is
how a retry or the cache recognises a call it has seen before.
"""

from __future__ import annotations

import datetime
import inspect
import typing
from typing import TYPE_CHECKING, Any

import msgspec

from flowsdk.errors import SerializationError

if TYPE_CHECKING:
    from flowsdk._options import TaskSpec

__all__ = [
    "IMMUTABLE",
    "decode_inputs",
    "decode_output",
    "encode_inputs",
    "encode_output",
    "inputs_digest",
    "task_version",
]

_encoder = msgspec.msgpack.Encoder()
_encode = _encoder.encode
# The inputs of every call without arguments: the same three bytes, encoded once.
_NO_INPUTS = _encode(((), {}))
_canonical_encoder = msgspec.msgpack.Encoder(order="deterministic")
_IMMUTABLE = frozenset(
    {
        int,
        float,
        str,
        bool,
        bytes,
        type(None),
        datetime.datetime,
        datetime.date,
    }
)
# Immutable too, recognised by name so that `import flowsdk` does not import their modules.
_IMMUTABLE_BY_NAME = frozenset({("uuid", "UUID"), ("decimal", "Decimal")})
IMMUTABLE = _IMMUTABLE
"""Types whose values need no snapshot (the per-call path checks these, in C)."""


class _Unfit(TypeError):
    """A task called with arguments that do not fit its function (raised as a TypeError)."""


class _Shape:
    """What the codec needs to know of a task's function, computed once per task."""

    __slots__ = (
        "_defaults",
        "_keyword_names",
        "_names",
        "fits",
        "hints",
        "positional",
        "return_type",
        "star_args",
        "star_kwargs",
        "task",
    )

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        # The calls with keywords seen to fit the signature, as the count of positional
        # values and the keywords' names (whether a call binds depends on nothing
        # else): each is checked once per task. A call without keywords is checked
        # when its count first gets its names (`names`).
        self.fits: set[tuple[int, frozenset[str]]] = set()
        try:
            hints = typing.get_type_hints(task.fn)
        except Exception:  # unresolvable forward references: decode as builtins
            hints = {}
        params = task.signature.parameters.values()
        self.positional = [
            p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self.star_args = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
        self.star_kwargs = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
        self.return_type = hints.pop("return", Any)
        self.hints = hints
        self._names: dict[int, list[str]] = {}
        self._keyword_names: dict[int, list[str]] = {}
        self._defaults: dict[str, Any] | None = None

    def names(self, args: tuple[Any, ...]) -> list[str]:
        """The names of a call's positional values, the call having no keywords.

        Cached per count, once a call of that count has been checked to fit.
        """
        count = len(args)
        names: list[str] | None = self._names.get(count)
        if names is None:
            self.fit(args, {})
            names = self._names[count] = [self.param(i) for i in range(count)]
        return names

    def keyword_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
        """Check a call with keywords (once per way of calling); name its positional values."""
        count = len(args)
        key = (count, frozenset(kwargs))
        if key not in self.fits:
            self.fit(args, kwargs)
            self.fits.add(key)
        names: list[str] | None = self._keyword_names.get(count)
        if names is None:
            names = self._keyword_names[count] = [self.param(i) for i in range(count)]
        return names

    def fit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Check that a call binds to the function, as calling it would.

        Raises:
            TypeError: the arguments do not fit (missing, extra, unknown, twice), in
                the words `inspect` uses, naming the task and its signature.
        """
        signature = self.task.signature
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            bare = signature.replace(  # the parameters' names and defaults, as a caller needs
                parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                return_annotation=signature.empty,
            )
            raise _Unfit(
                f"task {self.task.name!r} called with arguments that do not fit "
                f"{self.task.fn.__name__}{bare}: {exc}"
            ) from None

    def raw_defaults(self) -> dict[str, Any]:
        """The function's default values as recordings hold them, by parameter (once a task).

        A default that cannot be recorded stands as a marker naming it: a call
        that leaves it out equals another that does, and no recorded value
        equals it.
        """
        found: dict[str, Any] | None = self._defaults
        if found is None:
            found = {}
            for param in self.task.signature.parameters.values():
                if param.default is param.empty:
                    continue
                try:
                    found[param.name] = msgspec.msgpack.decode(_encode(param.default))
                except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
                    found[param.name] = {"flowsdk-default-of": param.name}
            self._defaults = found
        return found

    def param(self, index: int) -> str:
        if index < len(self.positional):
            return self.positional[index]
        return (
            f"*{self.star_args}[{index - len(self.positional)}]" if self.star_args else f"#{index}"
        )


def _shape(task: TaskSpec) -> _Shape:
    shape: _Shape | None = task._shape
    if shape is None:
        task._shape = shape = _Shape(task)
    return shape


def _limit(task: TaskSpec) -> int:
    return task.options.max_payload


def encode_inputs(task: TaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Record a call's arguments.

    Raises:
        SerializationError: an argument cannot be recorded (naming the task and
            the parameter), or the inputs exceed the task's `max_payload`.
    """
    # Arguments that do not fit the function raise TypeError here (`_Unfit` inside), from
    # the call, as calling the function would in plain asyncio: no action, nothing
    # recorded, no retry. Each way of calling a task is checked once (`_Shape`).
    try:
        if not args and not kwargs:
            shape = task._shape
            if shape is None or 0 not in shape._names:
                _shape(task).names(args)
            data = _NO_INPUTS
        elif args:
            # The positional values' parameter names travel with them, so a reader
            # (`flowsdk show`, the console) names every input without importing the
            # workflow. Comparisons and digests ignore them (`canonical`).
            shape = task._shape or _shape(task)
            if kwargs:
                names = shape.keyword_call(args, kwargs)
            else:
                names = shape._names.get(len(args)) or shape.names(args)
            data = _encode((args, kwargs, names))
        else:
            (task._shape or _shape(task)).keyword_call(args, kwargs)
            data = _encode((args, kwargs))
    except _Unfit as exc:
        raise TypeError(*exc.args) from None  # a plain TypeError, as Python's own
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
        raise _input_error(task, args, kwargs, exc) from exc
    if len(data) > task.options.max_payload:
        raise SerializationError(
            f"the inputs of task {task.name!r} are {len(data):,} bytes, over the limit of "
            f"{_limit(task):,} bytes; pass a reference (a path, a URL, a key) instead, or raise "
            "max_payload= on the task"
        )
    return data


def _input_error(
    task: TaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any], exc: BaseException
) -> SerializationError:
    shape = _shape(task)
    named = [(shape.param(i), value) for i, value in enumerate(args)] + list(kwargs.items())
    for name, value in named:
        try:
            _encoder.encode(value)
        except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as inner:
            return SerializationError(
                f"task {task.name!r}: parameter {name!r} cannot be recorded "
                f"({type(value).__name__}: {inner}); pass data (numbers, strings, lists, dicts, "
                "dataclasses, msgspec Structs, datetime, UUID, Enum, bytes) instead"
            )
    return SerializationError(f"task {task.name!r}: its inputs cannot be recorded: {exc}")


def _immutable_type(kind: type) -> bool:
    return kind in _IMMUTABLE or (kind.__module__, kind.__qualname__) in _IMMUTABLE_BY_NAME


def _immutable(value: Any) -> bool:
    kind = type(value)
    if kind is tuple:
        return all(_immutable_type(type(v)) for v in value)
    return _immutable_type(kind)


def decode_inputs(
    task: TaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any], data: bytes
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return the snapshot of a call's arguments that the child's body receives."""
    if _IMMUTABLE.issuperset(map(type, args)) and (
        not kwargs or _IMMUTABLE.issuperset(map(type, kwargs.values()))
    ):
        return args, kwargs  # nothing a caller could mutate (the common case, checked in C)
    if all(_immutable(a) for a in args) and all(_immutable(v) for v in kwargs.values()):
        return args, kwargs  # tuples of immutable values
    raw_args, raw_kwargs = msgspec.msgpack.decode(data)[:2]
    shape = _shape(task)
    new_args = tuple(
        original if _immutable(original) else _convert(raw, shape.hints.get(shape.param(i)))
        for i, (original, raw) in enumerate(zip(args, raw_args, strict=True))
    )
    new_kwargs = {
        key: original if _immutable(original) else _convert(raw_kwargs[key], shape.hints.get(key))
        for key, original in kwargs.items()
    }
    return new_args, new_kwargs


def recorded_call(task: TaskSpec, data: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Decode recorded inputs into arguments for a new call (a retried run's root)."""
    raw_args, raw_kwargs = msgspec.msgpack.decode(data)[:2]
    shape = _shape(task)
    args = tuple(_convert(raw, shape.hints.get(shape.param(i))) for i, raw in enumerate(raw_args))
    return args, {k: _convert(v, shape.hints.get(k)) for k, v in raw_kwargs.items()}


def _convert(raw: Any, hint: Any) -> Any:
    if hint is None or hint is Any:
        return raw
    try:
        return msgspec.convert(raw, hint, strict=False)
    except (TypeError, ValueError, msgspec.ValidationError):
        return raw  # an annotation msgspec cannot build: keep the recorded form


def encode_output(task: TaskSpec, value: Any) -> bytes:
    """Record a body's return value.

    Raises:
        SerializationError: the value cannot be recorded, or exceeds `max_payload`.
    """
    try:
        data = _encode(value)
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
        raise SerializationError(
            f"task {task.name!r} returned a {type(value).__name__} that cannot be recorded: {exc}; "
            "return data (numbers, strings, lists, dicts, dataclasses, msgspec Structs, ...)"
        ) from exc
    if len(data) > task.options.max_payload:
        raise SerializationError(
            f"task {task.name!r} returned {len(data):,} bytes, over the limit of {_limit(task):,} "
            "bytes; return a reference instead, or raise max_payload= on the task"
        )
    return data


def decode_output(task: TaskSpec | None, data: bytes) -> Any:
    """Decode a recorded output, typed by the task's return annotation when known."""
    hint = _shape(task).return_type if task is not None else Any
    raw = msgspec.msgpack.decode(data)
    return _convert(raw, hint)


def canonical(data: bytes, task: TaskSpec | None = None) -> bytes:
    """Re-encode recorded inputs' values with sorted dictionary keys (equal values, equal bytes).

    With the `task`, each value under its parameter's name, bound as calling the
    function binds it, defaults filled in: `f(1)`, `f(x=1)` and, when 1 is the
    default, `f()` are the same call. Inputs that no longer bind (the function
    changed since they were recorded) are compared as given. The parameter
    names recorded with positional values are left out: they are not part of
    the call, and recordings without them compare equal.
    """
    args, kwargs = msgspec.msgpack.decode(data)[:2]
    if task is not None:
        try:
            bound = task.signature.bind(*args, **kwargs).arguments
        except TypeError:
            pass
        else:
            defaults = (task._shape or _shape(task)).raw_defaults()
            return _canonical_encoder.encode({**defaults, **bound})
    return _canonical_encoder.encode([args, kwargs])


def same_inputs(recorded: bytes, called: bytes, task: TaskSpec | None = None) -> bool:
    """Whether two recordings hold equal values (as `task` binds them, when given)."""
    return recorded == called or canonical(recorded, task) == canonical(called, task)


def inputs_digest(data: bytes, task: TaskSpec | None = None) -> str:
    """A stable digest of recorded inputs, independent of dictionary order (the cache key).

    With the `task`, of the values as bound to its parameters (`canonical`).
    """
    import hashlib  # on first use (the cache): `import flowsdk` stays light

    return hashlib.sha256(canonical(data, task)).hexdigest()


def task_version(task: TaskSpec) -> str:
    """The task's version for `cache=True`: `cache_version`, else a hash of its source."""
    if task.options.cache_version is not None:
        return task.options.cache_version
    version: str | None = task.__dict__.get("_version")
    if version is None:
        try:
            source = inspect.getsource(task.fn)
        except (OSError, TypeError):
            source = task.fn.__code__.co_code.hex()
        import hashlib

        version = hashlib.sha256(source.encode()).hexdigest()[:16]
        task.__dict__["_version"] = version
    return version
