"""A PostgreSQL store URL: checked before any connection, shown without its password.

URLs follow libpq (`postgresql://user@host:5432/db?sslmode=require`,
`postgresql:///db` for the local socket, `postgresql://` for libpq's
defaults and `PG*` variables); `busy_timeout=SECONDS` is flowsdk's own and
never reaches libpq, which refuses parameters it does not know. libpq parses
the rest without a server (`conninfo_to_dict`), so a malformed URL is a
`ValueError` (the CLI's exit 2), not a connection that fails (exit 5).
"""

from __future__ import annotations

from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from flowsdk.store._location import (
    DEFAULT_BUSY_TIMEOUT,
    USERINFO_PASSWORD,
    busy_timeout,
    masked_url,
    query_pieces,
)

__all__ = ["PG_FORMS", "PgTarget"]

PG_FORMS = "write postgresql://user@host/dbname (postgresql:///dbname for the local socket)"


class PgTarget:
    """A parsed `postgresql://` URL: what libpq gets, and how messages show it.

    Raises:
        ValueError: the URL is malformed (libpq cannot parse it, a port is not a
            port, a parameter libpq does not know), or its `busy_timeout` is bad.
    """

    def __init__(self, url: str) -> None:
        self.display = masked_url(url)
        scheme, _, rest = url.partition(":")
        if scheme.lower() not in ("postgresql", "postgres") or not rest.startswith("//"):
            raise ValueError(f"not a PostgreSQL store URL: {self.display!r}; {PG_FORMS}")
        # The query is filtered piece by piece, as written: decoding and encoding it
        # again would turn a `%20` into a `+`, which libpq does not read as a space.
        base, _, query = rest.partition("?")
        kept: list[str] = []
        timeouts: list[str | None] = []
        for raw, name, value in query_pieces(query):
            if name == "busy_timeout":
                timeouts.append(value)
            else:
                kept.append(raw)
        self.busy_timeout = busy_timeout(timeouts, self.display, DEFAULT_BUSY_TIMEOUT)
        # Built as a string: urlunsplit drops the "//" of an empty host (`postgresql:///db`
        # would become `postgresql:/db`, which libpq cannot parse).
        self.conninfo = "postgresql:" + base + ("?" + "&".join(kept) if kept else "")
        try:
            params = conninfo_to_dict(self.conninfo)
        except psycopg.Error as exc:
            text = _without_secrets(str(exc).strip().splitlines()[0], url)
            raise ValueError(
                f"malformed PostgreSQL store URL {self.display!r} ({text}); {PG_FORMS}"
            ) from None
        for port in str(params.get("port") or "").split(","):
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(
                    f"the port {port!r} in the PostgreSQL store URL {self.display!r} is not a "
                    f"number from 1 to 65535; {PG_FORMS}"
                )
        self.database = str(params.get("dbname") or "(the user's default database)")


def _without_secrets(text: str, url: str) -> str:
    """`text` (libpq's message about `url`) with any password of the URL replaced by `***`."""
    secrets: set[str] = set()
    found = USERINFO_PASSWORD.search(url)
    if found:
        secrets.add(url[found.end(1) : found.end() - 1])
    _, _, query = url.partition("?")
    for raw, name, value in query_pieces(query):
        if name.lower() == "password":
            secrets.update((raw.partition("=")[2], value or ""))
    for secret in sorted(secrets | {unquote(s) for s in secrets}, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text
