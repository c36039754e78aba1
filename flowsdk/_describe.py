"""How the runtime writes an exception or a stuck task down: for records, warnings and logs."""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

from flowsdk.errors import RuntimeUserError

__all__ = ["describe", "format_stack", "safe_str"]

_MESSAGE_LIMIT = 2_000
_TRACEBACK_LIMIT = 20_000


def format_stack(task: asyncio.Task[Any] | None) -> str:
    """Show where a task's coroutine chain is suspended, innermost last.

    `Task.get_stack()` shows only the task's own frame; following `cr_await`
    reaches the user's body and whatever it is stuck in.
    """
    if task is None:
        return "  (no task)"
    lines: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(lines) < 20:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "\n".join(lines) or "  (no frames)"


def safe_str(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"
    if len(text) > _MESSAGE_LIMIT:
        text = text[:_MESSAGE_LIMIT] + f"... ({len(text) - _MESSAGE_LIMIT} more characters)"
    return text


def describe(exc: BaseException) -> tuple[str, str, str]:
    """Return an exception's recorded form: type name, message, traceback text.

    Never raises, whatever the exception's `__str__` does.
    """
    if isinstance(exc, RuntimeUserError) and exc.error_type:
        # A child's error passing through unwrapped: record the original's type,
        # message and traceback text as the child recorded them. Formatting the
        # ever-growing traceback again at every level would cost depth squared.
        return exc.error_type, exc.error_message, exc.error_traceback
    else:
        cls = type(exc)
        name = (
            cls.__qualname__
            # A script imported by a retry or `flowsdk run` has a synthetic module
            # name (`flowsdk_script_<hash>`): its types are named as in `__main__`.
            if cls.__module__ in ("builtins", "__main__")
            or cls.__module__.startswith("flowsdk_script_")
            else f"{cls.__module__}.{cls.__qualname__}"
        )
        message = safe_str(exc)
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        text = f"{name}: {message}\n(traceback could not be formatted)"
    if len(text) > _TRACEBACK_LIMIT:
        text = text[: _TRACEBACK_LIMIT // 2] + "\n...\n" + text[-_TRACEBACK_LIMIT // 2 :]
    return name, message, text
