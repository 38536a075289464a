"""History: one record per request as the gateway saw it (the HISTORY stream)."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct

from .base import SCHEMA_VERSION, Usage


class HistoryRecord(Struct, kw_only=True):
    """One request as the gateway saw it, appended to the HISTORY stream."""

    id: str
    capability: str
    endpoint: str  # the HTTP path, e.g. /v1/chat/completions
    model: str
    status_code: int
    started_at: float
    duration_ms: float
    stream: bool = False
    node_id: str | None = None
    # Where it ran when not on a node: the cloud provider (``openai``, ``anthropic``, ``google``).
    provider: str | None = None
    key_id: str | None = None  # the API key that made it (never the key itself)
    first_byte_ms: float | None = None
    # A stream's first token (the first byte may be the node's "accepted"); None when not streamed.
    first_token_ms: float | None = None
    queue_ms: float | None = None  # waited for a free slot in the gateway's queue (node calls only)
    usage: Usage | None = None
    cost_usd: float | None = None  # from the price table (gateway/providers/prices.py), when usage is known
    error: str | None = None
    request: msgspec.Raw = msgspec.Raw(b"null")
    response: Any = None
    masking: str = "none"  # what the gateway's --history-masking left of the bodies: none, partial, full
    schema: int = SCHEMA_VERSION


class UsageDay(Struct, kw_only=True):
    """Value of the ``usage`` bucket: one UTC day's successful requests of one model at one
    provider by one API key, with their tokens and cost (gateway/usage.py adds to it)."""

    day: str  # YYYY-MM-DD, UTC
    provider: str  # "local" for models served by nodes (upstream nodes included)
    model: str
    key_id: str | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0  # requests whose model the price table does not know (no cost counted)
    schema: int = SCHEMA_VERSION
