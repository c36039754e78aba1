"""Who asks for an operation (`Actor`), what they may do (`Role`), and a stored token."""

from __future__ import annotations

import enum
import os
import socket
from datetime import datetime
from typing import Annotated

import msgspec

__all__ = ["Actor", "Role", "TokenRecord", "UTCDateTime"]

UTCDateTime = Annotated[datetime, msgspec.Meta(tz=True)]
"""How records carry a time: an aware datetime (UTC), a `date-time` in JSON Schema."""


class Role(enum.StrEnum):
    """What an actor may do: `viewer` reads, `executor` also starts runs, `operator` controls."""

    VIEWER = "viewer"
    EXECUTOR = "executor"
    OPERATOR = "operator"


class Actor(msgspec.Struct, frozen=True, kw_only=True):
    """Who asks for an operation: recorded as `requested_by`; `role` decides what is allowed."""

    name: str
    role: Role = Role.OPERATOR

    def __post_init__(self) -> None:
        # A role may be given by its value (`role="viewer"`); anything else is refused
        # here, where it is written, not at the first request that needs it.
        role = Role._value2member_map_.get(self.role) if isinstance(self.role, str) else None
        if not isinstance(role, Role):
            raise ValueError(
                f"unknown role {self.role!r} of actor {self.name!r}; the roles are "
                + ", ".join(r.value for r in Role)
            )
        if role is not self.role:
            msgspec.structs.force_setattr(self, "role", role)

    @classmethod
    def local(cls) -> Actor:
        """Return the operator of this machine: `user@host pid N`, role `operator`."""
        try:
            import getpass  # only when an actor is named: not on import

            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
        return cls(name=f"{user}@{socket.gethostname()} pid {os.getpid()}", role=Role.OPERATOR)


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A console and API token as a store keeps it: never the secret, only its hash.

    Attributes:
        name: What the token is called (recorded as `requested_by` `token:NAME`).
        role: What its holder may do.
        digest: The SHA-256 hex digest of the secret.
        created_at: When it was created.
        last_used_at: When a request last presented it (updated at most once a minute).
        revoked_at: When it was revoked; a revoked token is refused.
    """

    name: str
    role: Role
    digest: str
    created_at: UTCDateTime
    last_used_at: UTCDateTime | None = None
    revoked_at: UTCDateTime | None = None
