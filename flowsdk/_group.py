"""`flowsdk.group()`: a label for the actions started inside it (pipeline stages)."""

from __future__ import annotations

import contextvars
from types import TracebackType

from flowsdk._names import check_name

__all__ = ["current_group", "group", "group_label"]

group_label: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flowsdk.group", default=None
)
"""The innermost group name of the calling context (read on the per-call path)."""


def current_group() -> str | None:
    """Return the innermost group name of the calling context, or `None`."""
    return group_label.get()


class group:
    """Label every action started inside the block with `name`.

    Usable as `with flowsdk.group("build"):` and `async with flowsdk.group("build"):`.
    Groups nest (the innermost name wins) and follow the context into tasks
    created inside them, so a stage's child actions carry its name too. An
    operator can abort a group by name; `show` groups actions by it.

    Args:
        name: The group's name (letters, digits, space, `_`, `-`, `.`, `:`).
    """

    __slots__ = ("_tokens", "name")

    def __init__(self, name: str) -> None:
        self.name = check_name("group", name)
        self._tokens: list[contextvars.Token[str | None]] = []

    def __enter__(self) -> group:
        self._tokens.append(group_label.set(self.name))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group_label.reset(self._tokens.pop())

    async def __aenter__(self) -> group:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
