"""The arguments of `flowsdk run MODULE:TASK [ARGS...]`, converted to the task's parameters.

SPEC §6: a `str` parameter takes the text as it is (`ref=1.10` stays
`"1.10"`); any other annotated type parses the text as JSON and converts it
strictly with msgspec (`n=5` for `int`, `flag=true` for `bool`, a JSON object
for a dataclass). A parameter without an annotation (or `Any`) takes JSON when
the text is JSON, else the text. A missing, unknown or unconvertible argument
is a usage error (exit 2) naming the parameter and its expected type, raised
before anything is recorded.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from flowsdk._text import preview
from flowsdk.cli._output import UsageError

__all__ = ["bind_arguments", "parse_arguments"]

_KEYWORD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)
_json = msgspec.json.Decoder()


def parse_arguments(values: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split command-line task arguments into positional and keyword texts.

    `key=value` (key an identifier) is a keyword argument; positional values
    come first.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for text in values:
        match = _KEYWORD.fullmatch(text)
        if match:
            key, raw = match.groups()
            if key in kwargs:
                raise UsageError(f"argument {key!r} is given twice")
            kwargs[key] = raw
        elif kwargs:
            raise UsageError(f"positional value {preview(text)} after key=value arguments")
        else:
            args.append(text)
    return args, kwargs


def _type_name(hint: Any) -> str:
    if hint is inspect.Parameter.empty or hint is Any:
        return "any JSON value"
    if isinstance(hint, type):
        return hint.__qualname__
    return str(hint).replace("typing.", "")


def _convert(param: str, text: str, hint: Any, *, as_json: bool) -> Any:
    if hint is inspect.Parameter.empty or hint is Any:
        try:
            return _json.decode(text)
        except (msgspec.DecodeError, RecursionError):
            if as_json:
                raise UsageError(f"argument {param!r}: not JSON: {preview(text)}") from None
            return text
    if hint is str and not as_json:
        return text
    try:
        return msgspec.json.decode(text, type=hint, strict=True)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        if not as_json and _accepts_str(hint):
            # `str | None` and the like: text that is not JSON of the type is the text.
            return text
        raise UsageError(
            f"argument {param!r} expects {_type_name(hint)} (written as JSON), "
            f"got {preview(text)}: {exc}"
        ) from None
    except RecursionError:
        raise UsageError(f"argument {param!r}: the value is nested too deeply") from None
    except TypeError as exc:  # an annotation msgspec cannot build
        raise UsageError(
            f"argument {param!r}: its annotation {_type_name(hint)} cannot be converted from "
            f"the command line ({exc})"
        ) from None


def _accepts_str(hint: Any) -> bool:
    return str in typing.get_args(hint)


def bind_arguments(
    fn: Callable[..., Any], texts: list[str], keywords: dict[str, str], *, as_json: bool = False
) -> tuple[list[Any], dict[str, Any]]:
    """Convert command-line texts to the arguments of `fn`, by its signature and annotations.

    With `as_json` every text is JSON (also for `str` parameters): how a
    detached launch passes values so they arrive exactly.

    Raises:
        UsageError: an argument is missing, unknown, given twice, or cannot be
            converted to its parameter's type.
    """
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: take values as JSON
        hints = {}
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    star_args = next((p for p in params if p.kind is p.VAR_POSITIONAL), None)
    star_kwargs = next((p for p in params if p.kind is p.VAR_KEYWORD), None)
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def hint_of(p: inspect.Parameter) -> Any:
        return hints.get(p.name, inspect.Parameter.empty)

    args: list[Any] = []
    for i, text in enumerate(texts):
        if i < len(positional):
            p = positional[i]
            args.append(_convert(p.name, text, hint_of(p), as_json=as_json))
        elif star_args is not None:
            args.append(_convert(f"*{star_args.name}", text, hint_of(star_args), as_json=as_json))
        else:
            raise UsageError(
                f"too many positional arguments: the task takes {len(positional)} "
                f"({', '.join(p.name for p in positional) or 'none'}), got {len(texts)}"
            )
    given = {p.name for p in positional[: len(texts)]}
    kwargs: dict[str, Any] = {}
    for key, text in keywords.items():
        named = signature.parameters.get(key)
        if named is not None and named.kind in (named.POSITIONAL_OR_KEYWORD, named.KEYWORD_ONLY):
            if key in given:
                raise UsageError(f"argument {key!r} is given twice (by position and by name)")
            kwargs[key] = _convert(key, text, hint_of(named), as_json=as_json)
        elif star_kwargs is not None:
            kwargs[key] = _convert(key, text, hint_of(star_kwargs), as_json=as_json)
        else:
            raise UsageError(
                f"unknown argument {key!r}; the task's parameters are: "
                + (", ".join(names) or "none")
            )
    for p in params:
        missing = (
            p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in given
            and p.name not in kwargs
        )
        if missing:
            raise UsageError(
                f"missing argument {p.name!r} ({_type_name(hint_of(p))}); "
                f"give it as a value or {p.name}=VALUE"
            )
    return args, kwargs
