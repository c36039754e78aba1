"""The SQLite store's token table (SPEC §8): names, roles and hashes of console tokens.

A mixin of `SQLiteStore`, kept apart so the store's run-keeping code stays
readable. Only the SHA-256 digest of a secret is ever written.
"""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import datetime
from typing import Protocol

from flowsdk._records import TokenRecord
from flowsdk.errors import InvalidStateError
from flowsdk.store._rows import TOKEN_COLUMNS, token_record
from flowsdk.store._sqlite_schema import translate

__all__ = ["SQLiteTokens"]


class _Connections(Protocol):
    """What the token methods need of `SQLiteStore`."""

    path: str

    def connect(self, *, create: bool) -> sqlite3.Connection | None: ...

    def _read(self) -> sqlite3.Connection | None: ...


class SQLiteTokens:
    """Token methods of `SQLiteStore` (`TokenStore`)."""

    def create_token(self: _Connections, token: TokenRecord) -> None:
        """Add a token (replacing a revoked one of the same name)."""
        conn = self.connect(create=True)
        assert conn is not None
        try:
            with translate(self.path):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    row = conn.execute(
                        "SELECT revoked_at FROM tokens WHERE name = ?", (token.name,)
                    ).fetchone()
                    if row is not None and row[0] is None:
                        raise InvalidStateError(
                            f"a token named {token.name!r} exists already; revoke it first "
                            "(flowsdk token revoke) or choose another name"
                        )
                    conn.execute(
                        f"INSERT OR REPLACE INTO tokens ({TOKEN_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, NULL, NULL)",
                        (token.name, token.role.value, token.digest, token.created_at.timestamp()),
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        finally:
            conn.close()

    def list_tokens(self: _Connections) -> list[TokenRecord]:
        """Return every token ever created (revoked ones included), by name."""
        conn = self._read()
        if conn is None:
            return []
        with translate(self.path):
            rows = conn.execute(f"SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY name").fetchall()
        return [token_record(row) for row in rows]

    def revoke_token(self: _Connections, name: str, at: datetime) -> bool:
        """Revoke a token from the next request on; False when no unrevoked token has that name."""
        conn = self.connect(create=True)
        assert conn is not None
        try:
            with translate(self.path):
                cur = conn.execute(
                    "UPDATE tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                    (at.timestamp(), name),
                )
                return cur.rowcount > 0
        finally:
            conn.close()

    def token_mode(self: _Connections) -> bool:
        """Return whether a token was ever created in this store."""
        conn = self._read()
        if conn is None:
            return False
        with translate(self.path):
            return conn.execute("SELECT 1 FROM tokens LIMIT 1").fetchone() is not None

    def token_used(self: _Connections, name: str, at: datetime) -> None:
        """Record when a token was last presented (skipped while the store is locked)."""
        conn = self._read()
        if conn is None:
            return
        # Locked by a runner's write: skipped, the next request records it.
        with contextlib.suppress(sqlite3.OperationalError):
            conn.execute(
                "UPDATE tokens SET last_used_at = ? WHERE name = ?", (at.timestamp(), name)
            )
