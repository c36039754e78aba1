"""Where a store is: store URLs checked as users write them, and SQLite paths checked on disk.

A store location comes from a user (`store=`, `--store`, `$FLOWSDK_STORE`),
so every refusal here is one line that names what was wrong and says what
to write instead. A location of the wrong type raises `TypeError` and a
malformed URL `ValueError`, before anything is opened (the CLI's exit 2); a
path that exists but cannot be a store, or cannot be created, raises
`StoreError` (exit 5) and is left as it was.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit

from flowsdk.errors import StoreCorruptedError, StoreError

if TYPE_CHECKING:
    from flowsdk.store._base import Store

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "USERINFO_PASSWORD",
    "busy_timeout",
    "cannot_create",
    "check_store_file",
    "masked_url",
    "query_pieces",
    "sqlite_location",
    "store_location",
]

DEFAULT_BUSY_TIMEOUT = 5.0  # seconds, for SQLite and PostgreSQL stores alike

_SQLITE_FORMS = "write sqlite:///relative/path.db or sqlite:////absolute/path.db"

# The parameters a SQLite store URL may carry, with what each means.
_SQLITE_PARAMETERS = {
    "busy_timeout": "busy_timeout=SECONDS (how long a write waits for another writer's lock)"
}

# Both SQLite and PostgreSQL take the timeout as a C int of milliseconds.
_MAX_BUSY_TIMEOUT = (2**31 - 1) // 1000

_ANOTHER_FILE = "point --store (or FLOWSDK_STORE) at a file such as runs.db"

_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
}

# File systems whose files the kernel makes up as they are read: nothing can be stored there.
_PSEUDO_FILE_SYSTEMS = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "efivarfs",
        "fusectl",
        "mqueue",
        "nsfs",
        "proc",
        "pstore",
        "rpc_pipefs",
        "securityfs",
        "sysfs",
        "tracefs",
    }
)

_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo writes a space in a mount point as \040

_REASONS = {
    errno.EACCES: "permission denied for this user",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "a read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "a file name too long",
}


# What every store object has; a `Store` is a protocol, so this is how one is recognised.
_STORE_METHODS = ("open_run", "load_run", "request", "close")


# -- URLs ------------------------------------------------------------------------------------

# The password of `scheme://user:password@host`, for a URL urlsplit cannot read.
USERINFO_PASSWORD = re.compile(r"(//[^/?#@:]*:)[^/?#]*@")


def masked_url(url: str) -> str:
    """Return a store URL as messages show it: any password (`user:pw@`, `?password=`) `***`.

    Every message, `repr` and announce that names a store by its URL goes
    through here (SPEC §9: a password is never printed).
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed "[" (urlsplit reads an IPv6 host): mask by pattern
        return USERINFO_PASSWORD.sub(r"\1***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hostport}"
    query = "&".join(
        f"{k}=***" if k.lower() == "password" else f"{k}={v}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    # Not urlunsplit: it drops the "//" of an empty host, and `postgresql:///db` would
    # show as `postgresql:/db`.
    slashes = "//" if url[len(parts.scheme) + 1 :].startswith("//") else ""
    return f"{url[: len(parts.scheme)]}:{slashes}{netloc}{parts.path}" + (
        f"?{query}" if query else ""
    )


def store_location(store: str | os.PathLike[str] | Store | None) -> str | Store | None:
    """Return a `store=` argument as `open_store` takes it: a path object as a SQLite URL.

    Every entry point that takes a store location passes it through here
    first (`flowsdk.run`, `run_async`, `start`, `Client`), so a
    `pathlib.Path` works wherever a path string does. A path object is a file,
    never a URL: its characters are quoted, so a `#` or `?` in a file name is
    part of the name.

    Raises:
        TypeError: `store` is not a URL or path string, an `os.PathLike`, a
            store object, or None.
    """
    if store is None or isinstance(store, str):
        return store
    if isinstance(store, os.PathLike):
        return "sqlite:///" + quote(os.fsdecode(store))
    if all(hasattr(store, method) for method in _STORE_METHODS):
        return store
    raise TypeError(
        "store must be a URL or path string, an os.PathLike or a store object, not "
        f"{type(store).__name__}; for example store='sqlite:///runs.db' or "
        "store=pathlib.Path('runs.db')"
    )


def query_pieces(query: str) -> list[tuple[str, str, str | None]]:
    """Split a URL's query into `(raw piece, name, value)`, decoded; `None`: no `=` at all."""
    pieces = []
    for piece in query.split("&"):
        if piece:
            name, eq, value = piece.partition("=")
            pieces.append((piece, unquote_plus(name), unquote_plus(value) if eq else None))
    return pieces


def busy_timeout(
    values: list[str | None], shown: str, default: float = DEFAULT_BUSY_TIMEOUT
) -> float:
    """Return the `busy_timeout` a URL gives (`default` if none), in seconds.

    Raises:
        ValueError: given twice, or not a finite number from 0 to 2147483.
    """
    if not values:
        return default
    if len(values) > 1:
        raise ValueError(f"busy_timeout is given {len(values)} times in {shown!r}; give it once")
    text = values[0]
    try:
        seconds = float(text) if text is not None else math.nan
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= _MAX_BUSY_TIMEOUT:  # NaN included
        got = repr(text) if text is not None else "no value"
        raise ValueError(
            f"busy_timeout in {shown!r} must be a number of seconds from 0 to "
            f"{_MAX_BUSY_TIMEOUT} (got {got}), such as busy_timeout=5"
        )
    return seconds


def sqlite_location(url: str) -> tuple[str, float]:
    """Return the file path and the busy timeout of a `sqlite://` store URL.

    Raises:
        ValueError: the URL is malformed, names no file, or carries a parameter
            that is unknown or has a bad value.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed "[": urlsplit reads an IPv6 host
        raise ValueError(f"malformed SQLite store URL {url!r} ({exc}); {_SQLITE_FORMS}") from None
    # `sqlite:/x.db` would otherwise be the relative x.db, silently: refuse what is not `sqlite://`.
    if parts.scheme != "sqlite" or not url[len("sqlite:") :].startswith("//") or parts.netloc:
        raise ValueError(f"not a SQLite store URL: {url!r}; {_SQLITE_FORMS}")
    if "#" in url:
        raise ValueError(
            f"the SQLite store URL {url!r} has a '#': write a '#' of a file name as %23"
        )
    path = unquote(parts.path)
    path = path[1:] if path.startswith("/") else path
    if not path:
        raise ValueError(f"the SQLite store URL {url!r} names no file; {_SQLITE_FORMS}")
    timeouts: list[str | None] = []
    for _, name, value in query_pieces(parts.query):
        if name not in _SQLITE_PARAMETERS:
            known = "; ".join(_SQLITE_PARAMETERS.values())
            raise ValueError(
                f"unknown parameter {name!r} in the SQLite store URL {url!r}; "
                f"the only parameter known is {known}"
            )
        timeouts.append(value)
    return path, busy_timeout(timeouts, url)


# -- files -----------------------------------------------------------------------------------


def check_store_file(path: str) -> None:
    """Refuse an existing path that cannot be a store; it is left as it was.

    Raises:
        StoreError: a directory, or not a regular file (a device, a pipe, a
            socket, a file of /proc or /sys).
        StoreCorruptedError: an empty (0-byte) regular file.
    """
    try:
        found = os.stat(path)
    except OSError as exc:
        raise StoreError(f"the store {path} cannot be used: {_reason(exc, path)}") from None
    if stat.S_ISDIR(found.st_mode):
        raise StoreError(
            f"the store {path} is a directory, not a file; name a file, such as "
            f"{os.path.join(path, 'flowsdk.db')}"
        )
    if not stat.S_ISREG(found.st_mode):
        kind = _KINDS.get(stat.S_IFMT(found.st_mode), "not a file")
        raise StoreError(
            f"the store {path} is not a regular file ({kind}); a store needs a file path: "
            + _ANOTHER_FILE
        )
    system = _file_system(path)
    if system in _PSEUDO_FILE_SYSTEMS:
        raise StoreError(
            f"the store {path} is not a regular file (it is on {system}, a file system whose "
            f"files the kernel makes up); a store needs a file path: {_ANOTHER_FILE}"
        )
    if found.st_size == 0:
        # A store is never an empty file (new ones are created whole), so this one
        # was made by something else: refuse it rather than initialise it.
        raise StoreCorruptedError(
            f"the store {os.path.abspath(path)} is an empty file (0 bytes), not a "
            "flowsdk store; it was left untouched. Remove it to start a new store there, "
            "or point --store (or FLOWSDK_STORE) at another file"
        )


def cannot_create(path: str, exc: OSError) -> StoreError:
    """Say why the store `path` (as the user wrote it) cannot be created, in words.

    Names the part of the path in the way (a file where a directory must be)
    or the directory that refused, never a file flowsdk made up on the way.
    """
    folder = os.path.dirname(path) or os.curdir
    existing = folder
    while not os.path.lexists(existing):
        parent = os.path.dirname(existing) or os.curdir
        if parent == existing:
            break
        existing = parent
    if os.path.lexists(existing) and not os.path.isdir(existing):
        if not os.path.exists(existing):
            what = "a symbolic link to nothing, not a directory"
        elif os.path.isfile(existing):
            what = "a file, not a directory"
        else:
            what = "not a directory"
        return StoreError(f"cannot create the store {path}: {existing} is {what}")
    reason = _reason(exc, existing)
    if existing == folder:
        return StoreError(
            f"cannot create the store {path}: its directory {folder} does not accept new "
            f"files ({reason})"
        )
    return StoreError(
        f"cannot create the store {path}: its directory {folder} cannot be created in "
        f"{existing} ({reason})"
    )


def _reason(exc: OSError, where: str) -> str:
    system = _file_system(where)
    if system in _PSEUDO_FILE_SYSTEMS:
        return f"it is on {system}, a file system whose files the kernel makes up"
    if exc.errno in _REASONS:
        return _REASONS[exc.errno]
    return (exc.strerror or type(exc).__name__).lower()


def _file_system(path: str) -> str | None:
    """The type of the file system `path` is on, from Linux's mount table (None elsewhere)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as table:
            mounts = table.read().splitlines()
    except OSError:
        return None
    where = os.path.realpath(path)
    best, found = "", None
    for line in mounts:
        # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw": the mount
        # point is the fifth field, the type the one after "-".
        fields = line.split(" ")
        try:
            point, kind = fields[4], fields[fields.index("-", 6) + 1]
        except (ValueError, IndexError):
            continue
        point = _OCTAL.sub(lambda m: chr(int(m[1], 8)), point)
        inside = point == "/" or where == point or where.startswith(point.rstrip("/") + "/")
        # A later line mounted over an earlier one at the same point: the later is seen.
        if inside and len(point) >= len(best):
            best, found = point, kind
    return found
