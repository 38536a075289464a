"""API keys as the ``keys`` KV bucket stores them: never the secret, only its digest."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct, field

from .base import SCHEMA_VERSION

Scope = Literal["inference", "read", "admin"]  # admin implies the others
PerMinute = Annotated[int, Meta(ge=1, le=1_000_000_000)]


class ApiKey(Struct, kw_only=True, omit_defaults=True):
    """One key. ``id`` is public (listings, history, audit); the secret is shown once at creation."""

    id: str
    name: str
    digest: str  # SHA-256 of the secret, hex
    scopes: list[Scope]
    models: list[str] = field(default_factory=list)  # empty: every model
    created_at: float
    expires_at: float | None = None  # None: never (flagged in listings)
    # Rate limits, enforced by each gateway on its own (gateway/rate_limits.py); None: unlimited.
    # Absent from records without them (omit_defaults), and ignored by components that predate them.
    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None  # prompt + completion tokens of the answers
    schema: int = SCHEMA_VERSION


class CreateKey(Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v0/keys``: what the new key may do; ``expires_in_days`` one of 3, 7, 21, 70, 90 or null;
    optional limits per minute on requests and on tokens."""

    name: str
    scopes: list[Scope]
    models: list[str] = field(default_factory=list)
    expires_in_days: Literal[3, 7, 21, 70, 90] | None = None
    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None
