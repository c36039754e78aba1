"""Validation of user-chosen names (environments, tasks, groups, runs)."""

from __future__ import annotations

import os
import re
import unicodedata

__all__ = ["MAX_NAME_LENGTH", "check_name", "new_run_name"]

MAX_NAME_LENGTH = 200
# Letters, digits and a few separators; never a path separator, never "..".
_ALLOWED = re.compile(r"[A-Za-z0-9_.:\- ]+")


def check_name(kind: str, name: object) -> str:
    """Return `name` if it is a usable name, else raise `ValueError` showing its `repr`.

    A usable name is 1-200 characters of ASCII letters, digits, space, `_`, `-`, `.`
    and `:`; it is not `.`/`..` and has no control or bidirectional characters, so it
    is safe in a terminal, a URL and a file name.
    """
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a string, not {type(name).__name__}: {name!r}")
    if not name or not name.strip():
        raise ValueError(f"{kind} name must not be empty: {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"{kind} name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}: "
            f"{name[:40]!r}..."
        )
    if name in {".", ".."} or not _ALLOWED.fullmatch(name) or name != name.strip():
        bad = sorted({c for c in name if not _ALLOWED.fullmatch(c)})
        shown = ", ".join(f"{c!r} ({unicodedata.name(c, f'U+{ord(c):04X}')})" for c in bad)
        raise ValueError(
            f"{kind} name {name!r} is not allowed"
            + (f": it contains {shown}" if shown else "")
            + "; use ASCII letters (A-Z, a-z), digits, space, '_', '-', '.' and ':'"
        )
    return name


def new_run_name(function: str) -> str:
    """Return a fresh run name from a task function's name: `train-1a2b3c4d`."""
    chars = (c if c.isascii() and c.isalnum() else "-" for c in function.lower())
    stem = "".join(chars).strip("-")[:40] or "run"
    return f"{stem}-{os.urandom(4).hex()}"
