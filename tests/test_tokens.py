"""Console tokens in the store (SPEC §8): hashes only, token mode for good, revocation.

The same behaviour on the memory, SQLite and PostgreSQL stores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flowsdk._records import Role
from flowsdk._tokens import TOKEN_PREFIX, Tokens, digest, token_actor
from flowsdk.errors import InvalidStateError
from flowsdk.store import MemoryStore, SQLiteStore, Store, open_store


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(f"sqlite:///{tmp_path}/s.db")
    else:
        made = open_store(request.getfixturevalue("pg_url"))
    yield made
    made.close()


def test_a_new_store_is_not_in_token_mode_and_lists_no_tokens(store: Store) -> None:
    assert not store.token_mode()
    assert Tokens(store).list() == []
    assert Tokens(store).authenticate(TOKEN_PREFIX + "x" * 43) is None


def test_a_secret_is_shown_once_and_only_its_hash_is_kept(store: Store) -> None:
    tokens = Tokens(store)
    secret = tokens.create("ci", Role.EXECUTOR)
    assert secret.startswith(TOKEN_PREFIX)
    assert len(secret) >= len(TOKEN_PREFIX) + 43
    (kept,) = tokens.list()
    assert (kept.name, kept.role, kept.digest) == ("ci", Role.EXECUTOR, digest(secret))
    assert secret not in repr(kept)
    found = tokens.authenticate(secret)
    assert found is not None
    assert found.name == "ci"
    assert token_actor(found).name == "token:ci"
    assert tokens.list()[0].last_used_at is not None
    assert tokens.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert tokens.create("other", Role.VIEWER) != secret


def test_revoking_refuses_the_token_and_the_store_stays_in_token_mode(store: Store) -> None:
    tokens = Tokens(store)
    secret = tokens.create("ops", Role.OPERATOR)
    tokens.revoke("ops")
    assert tokens.authenticate(secret) is None
    assert store.token_mode()
    assert tokens.list()[0].revoked_at is not None
    with pytest.raises(InvalidStateError, match="revoked already"):
        tokens.revoke("ops")
    with pytest.raises(InvalidStateError, match="no token named 'nope'"):
        tokens.revoke("nope")
    # A revoked name can be given to a new token; the old secret stays refused.
    fresh = tokens.create("ops", Role.VIEWER)
    assert tokens.authenticate(secret) is None
    found = tokens.authenticate(fresh)
    assert found is not None
    assert found.role is Role.VIEWER


def test_names_are_checked_and_a_live_name_is_not_taken_twice(store: Store) -> None:
    tokens = Tokens(store)
    tokens.create("a", Role.VIEWER)
    with pytest.raises(InvalidStateError, match="exists already"):
        tokens.create("a", Role.OPERATOR)
    with pytest.raises(ValueError, match="not allowed"):
        tokens.create("bad\x1b[2Jname", Role.VIEWER)
