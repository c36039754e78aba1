"""Showing untrusted text: stored names, reasons, errors and values, made safe to print.

Text that came from a workflow or an operator (run and action names, reasons,
error messages, tracebacks, logs, recorded values) is shown to people on a
terminal. `visible()` is the one rule for it: every control character is
replaced by a visible escape, so stored text can never move the cursor, clear
the screen, retitle the window, ring the bell or fake extra rows. JSON output
is exact and does not use it; an HTML page applies its own escaping to the
result (text nodes, never markup).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

__all__ = ["MAX_REASON", "check_reason", "preview", "visible", "visible_lines"]

MAX_REASON = 10_000
"""The longest reason an abort, stop or mark-failed request may carry, in characters."""

# C0 (with TAB, LF and CR), DEL, C1, the Unicode line and paragraph separators,
# the zero-width and bidirectional controls (they reorder what follows them),
# the byte-order mark and lone surrogates (undecodable bytes).
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: object) -> str:
    r"""Return `text` with every control character replaced by a visible escape (`\x1b`).

    Printable text, including non-ASCII letters, is unchanged; the result is
    always one line. What is not a `str` is shown as its `repr()`: an older
    flowsdk stored a reason given as bytes as they were, and such a store must
    still be readable.
    """
    return _CONTROL.sub(_escape, text if isinstance(text, str) else repr(text))


def visible_lines(text: object) -> list[str]:
    """Split multi-line text (a traceback) into lines, each made `visible()`."""
    if not isinstance(text, str):
        return [visible(text)]
    return [visible(line) for line in text.split("\n")]


def preview(value: Any, limit: int = 60) -> str:
    """Return a short one-line rendering of a decoded value: JSON, cut to `limit` characters."""
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, ValueError, msgspec.EncodeError):
        text = repr(value)
    text = visible(text)
    if len(text) > limit:
        text = text[: max(limit - 1, 1)] + "…"
    return text


def check_reason(reason: str | None) -> str | None:
    """Return `reason` unchanged, or refuse it: not a string, or over `MAX_REASON` characters.

    Raises:
        TypeError: `reason` is neither a `str` nor None (bytes would be stored
            as they are, and every reader would then have to cope with them).
        ValueError: `reason` is over `MAX_REASON` characters.
    """
    if reason is not None and not isinstance(reason, str):
        raise TypeError(f"reason must be a string or None, not {type(reason).__name__}")
    if reason is not None and len(reason) > MAX_REASON:
        raise ValueError(
            f"the reason is {len(reason):,} characters, over the limit of {MAX_REASON:,}; "
            "write a shorter one (put details in a file or a ticket and name it)"
        )
    return reason
