"""API keys as the ``keys`` KV bucket stores them: never the secret, only its digest."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct, field

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
