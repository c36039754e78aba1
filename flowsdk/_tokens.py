"""Console and API tokens (SPEC §8): create, list, revoke, and recognise a presented secret.

A secret is `flowsdk_` followed by 256 random bits (URL-safe base64). A store
keeps only its SHA-256 digest: a fast hash is enough because the secret is
random, not a password someone could guess. A presented secret is compared
with every unrevoked token's digest in constant time (`hmac.compare_digest`),
so the time of an answer says nothing about how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta

from flowsdk._names import check_name
from flowsdk._records import Actor, Role, TokenRecord
from flowsdk.errors import InvalidStateError
from flowsdk.store import TokenStore

__all__ = ["TOKEN_PREFIX", "Tokens", "digest", "token_actor"]

TOKEN_PREFIX = "flowsdk_"
_SECRET_BYTES = 32  # 256 bits
# How often `last_used_at` is written for one token: a console answering many
# requests a second must not turn every read into a write to the store.
_USE_RESOLUTION = timedelta(seconds=60)
_MAX_SECRET = 200  # anything longer is not a token of ours: not even hashed


def digest(secret: str) -> str:
    """Return the SHA-256 hex digest of a secret (what a store keeps)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def token_actor(token: TokenRecord) -> Actor:
    """Return the actor a request presenting `token` acts as: `token:NAME` with its role."""
    return Actor(name=f"token:{token.name}", role=token.role)


class Tokens:
    """The tokens of one store.

    Args:
        store: Where the tokens are kept (the same store as the runs).
    """

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def create(self, name: str, role: Role) -> str:
        """Create a token and return its secret (shown once; only its hash is stored).

        Raises:
            ValueError: the name is not usable.
            InvalidStateError: an unrevoked token of that name exists.
        """
        check_name("token", name)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        self.store.create_token(
            TokenRecord(name=name, role=role, digest=digest(secret), created_at=datetime.now(UTC))
        )
        return secret

    def list(self) -> list[TokenRecord]:
        """Return every token ever created, revoked ones included, by name."""
        return self.store.list_tokens()

    def revoke(self, name: str) -> None:
        """Revoke a token: it is refused from the next request on.

        Raises:
            InvalidStateError: no unrevoked token has that name.
        """
        if not self.store.revoke_token(name, datetime.now(UTC)):
            known = {t.name: t for t in self.store.list_tokens()}
            if name in known:
                raise InvalidStateError(f"the token {name!r} is revoked already")
            names = ", ".join(repr(n) for n in known) or "none"
            raise InvalidStateError(f"no token named {name!r} (tokens: {names})")

    def authenticate(self, secret: str) -> TokenRecord | None:
        """Return the unrevoked token whose secret this is, or None.

        Every unrevoked token's digest is compared, each in constant time.
        """
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > _MAX_SECRET:
            return None
        presented = digest(secret)
        found = None
        for token in self.store.list_tokens():
            if hmac.compare_digest(presented, token.digest) and token.revoked_at is None:
                found = token
        if found is not None:
            now = datetime.now(UTC)
            if found.last_used_at is None or now - found.last_used_at > _USE_RESOLUTION:
                self.store.token_used(found.name, now)
        return found
