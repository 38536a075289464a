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
    key_id: str | None = None  # the API key that made it (never the key itself)
    first_byte_ms: float | None = None
    usage: Usage | None = None
    error: str | None = None
    request: msgspec.Raw = msgspec.Raw(b"null")
    response: Any = None
    masking: str = "none"  # what the gateway's --history-masking left of the bodies: none, partial, full
    schema: int = SCHEMA_VERSION
