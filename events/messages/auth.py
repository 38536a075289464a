"""API keys as the ``keys`` KV bucket stores them: never the secret, only its digest; dashboard
users (``users``: argon2id hashes) and their sessions (``sessions``: ids, never the tokens)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct, field

from ..tokens import MAX_USERNAME_CHARS, USERNAME_PATTERN
from .base import SCHEMA_VERSION

Scope = Literal["inference", "read", "admin"]  # admin implies the others


class ApiKey(Struct, kw_only=True, omit_defaults=True):
    """One key. ``id`` is public (listings, history, audit); the secret is shown once at creation."""

    id: str
    name: str
    digest: str  # SHA-256 of the secret, hex
    scopes: list[Scope]
    models: list[str] = field(default_factory=list)  # empty: every model
    created_at: float
    expires_at: float | None = None  # None: never (flagged in listings)
    schema: int = SCHEMA_VERSION


class CreateKey(Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v0/keys``: what the new key may do; ``expires_in_days`` one of 3, 7, 21, 70, 90 or null."""

    name: str
    scopes: list[Scope]
    models: list[str] = field(default_factory=list)
    expires_in_days: Literal[3, 7, 21, 70, 90] | None = None


# ---------------------------------------------------------------- dashboard users and sessions

Role = Literal["admin", "viewer"]  # admin: the admin scope; viewer: the read scope
# Passwords: at least 8 characters; at most 1024 (and 1024 UTF-8 bytes, checked where they are
# hashed), so nobody makes a gateway hash megabytes.
Password = Annotated[str, Meta(min_length=8, max_length=1024)]
Username = Annotated[str, Meta(min_length=1, max_length=MAX_USERNAME_CHARS, pattern=USERNAME_PATTERN)]


class User(Struct, kw_only=True, omit_defaults=True):
    """One dashboard user, in the ``users`` bucket under its name: the password only as its argon2id hash."""

    name: str
    role: Role
    password_hash: str  # argon2id, PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash)
    created_at: float
    password_changed_at: float
    schema: int = SCHEMA_VERSION


class Session(Struct, kw_only=True, omit_defaults=True):
    """A signed-in user's session, in the ``sessions`` bucket under its id (the token's ``jti``).

    The token itself is never stored: it is signed, so the id in it is enough to revoke it."""

    id: str
    user: str
    created_at: float
    expires_at: float
    schema: int = SCHEMA_VERSION


class SessionSecret(Struct, kw_only=True):
    """The HS256 key every gateway signs and checks session tokens with (``users`` bucket)."""

    secret: str  # hex, 64 random bytes
    created_at: float
    schema: int = SCHEMA_VERSION


class Login(Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v0/auth/login``."""

    username: Annotated[str, Meta(min_length=1, max_length=MAX_USERNAME_CHARS)]
    password: Annotated[str, Meta(min_length=1, max_length=1024)]


class ChangePassword(Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v0/auth/password``: one's own password; the user's other sessions end."""

    old_password: Annotated[str, Meta(min_length=1, max_length=1024)]
    new_password: Password


class CreateUser(Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v0/users`` (admin)."""

    name: Username
    role: Role
    password: Password


class SetPassword(Struct, kw_only=True, forbid_unknown_fields=True):
    """``PUT /v0/users/{name}/password`` (admin): a new password; every session of the user ends."""

    password: Password
