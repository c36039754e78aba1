"""The PostgreSQL store's token table (SPEC §8): names, roles and hashes of console tokens.

A mixin of `PostgresStore`, as `_sqlite_tokens.py` is of the SQLite store.
Only the SHA-256 digest of a secret is ever written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

import psycopg

from flowsdk._records import TokenRecord
from flowsdk.errors import InvalidStateError
from flowsdk.store._postgres_schema import PgTarget, connect, store_error
from flowsdk.store._rows import TOKEN_COLUMNS, token_record

__all__ = ["PostgresTokens"]

T = TypeVar("T")


class _Sessions(Protocol):
    """What the token methods need of `PostgresStore`."""

    _target: PgTarget

    def _read(self, work: Callable[[psycopg.Connection[Any]], T], empty: Callable[[], T]) -> T: ...


def _write(target: PgTarget, work: Callable[[psycopg.Connection[Any]], T]) -> T:
    """Run `work` in one transaction of a session of its own (creating the schema if needed)."""
    conn = connect(target, create=True)
    assert conn is not None
    try:
        with conn.transaction():
            return work(conn)
    except psycopg.Error as exc:
        raise store_error(exc, target) from None
    finally:
        conn.close()


class PostgresTokens:
    """Token methods of `PostgresStore` (`TokenStore`)."""

    def create_token(self: _Sessions, token: TokenRecord) -> None:
        """Add a token (replacing a revoked one of the same name)."""

        def work(conn: psycopg.Connection[Any]) -> None:
            row = conn.execute(
                "SELECT revoked_at FROM flowsdk.tokens WHERE name = %s FOR UPDATE", (token.name,)
            ).fetchone()
            if row is not None and row[0] is None:
                raise InvalidStateError(
                    f"a token named {token.name!r} exists already; revoke it first "
                    "(flowsdk token revoke) or choose another name"
                )
            conn.execute(
                f"INSERT INTO flowsdk.tokens ({TOKEN_COLUMNS}) VALUES (%s, %s, %s, %s, NULL, NULL) "
                "ON CONFLICT (name) DO UPDATE SET role = EXCLUDED.role, "
                "digest = EXCLUDED.digest, created_at = EXCLUDED.created_at, "
                "last_used_at = NULL, revoked_at = NULL",
                (token.name, token.role.value, token.digest, token.created_at.timestamp()),
            )

        _write(self._target, work)

    def list_tokens(self: _Sessions) -> list[TokenRecord]:
        """Return every token ever created (revoked ones included), by name."""

        def work(conn: psycopg.Connection[Any]) -> list[TokenRecord]:
            rows = conn.execute(
                f"SELECT {TOKEN_COLUMNS} FROM flowsdk.tokens ORDER BY name"
            ).fetchall()
            return [token_record(row) for row in rows]

        return self._read(work, list)

    def revoke_token(self: _Sessions, name: str, at: datetime) -> bool:
        """Revoke a token from the next request on; False when no unrevoked token has that name."""

        def work(conn: psycopg.Connection[Any]) -> bool:
            cur = conn.execute(
                "UPDATE flowsdk.tokens SET revoked_at = %s WHERE name = %s AND revoked_at IS NULL",
                (at.timestamp(), name),
            )
            return cur.rowcount > 0

        return _write(self._target, work)

    def token_mode(self: _Sessions) -> bool:
        """Return whether a token was ever created in this store."""
        return self._read(
            lambda conn: (
                conn.execute("SELECT 1 FROM flowsdk.tokens LIMIT 1").fetchone() is not None
            ),
            lambda: False,
        )

    def token_used(self: _Sessions, name: str, at: datetime) -> None:
        """Record when a token was last presented (best effort: a failure is skipped)."""
        with contextlib.suppress(Exception):
            self._read(
                lambda conn: conn.execute(
                    "UPDATE flowsdk.tokens SET last_used_at = %s WHERE name = %s",
                    (at.timestamp(), name),
                ),
                lambda: None,
            )
