"""Privacy masking of the bodies a history record keeps (``--history-masking``), per deployment.

- ``none``: the request and the answer as they were.
- ``partial``: their shape and settings stay (model, roles, types, temperature, token usage), and
  every text in them is cut to a hint of its start and its length (``"Wri… [532 chars]"``);
  arrays of numbers (embeddings) keep only their length. Enough to see what kind of request it
  was and debug its parameters, not to read what anyone wrote.
- ``full``: no bodies at all; the metadata (model, node, key id, status, times, tokens) stays.

Applied by the history writer's background task before a record is stored, so what is masked
is never written anywhere; the record says which mode it was stored under (``masking``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from events.messages import HistoryRecord

MODES = ("none", "partial", "full")
# Keys whose string values are settings or structure, not someone's text: kept in partial mode.
STRUCTURE_KEYS = frozenset(
    {
        "model",
        "role",
        "type",
        "object",
        "id",
        "finish_reason",
        "encoding_format",
        "response_format",
        "tool_choice",
        "size",
        "quality",
        "style",
        "voice",
        "language",
        "detail",
        "service_tier",
        "system_fingerprint",
    }
)
HINT_CHARS = 3  # characters of a text kept in partial mode (none of a text shorter than 4 times this)
NUMBERS_KEPT = 8  # a list of more numbers than this (an embedding) becomes its length


def _text(value: str) -> str:
    hint = value[:HINT_CHARS] + "…" if len(value) >= 4 * HINT_CHARS else ""
    return f"{hint}[{len(value)} chars]"


def partial(value: Any, key: str | None = None) -> Any:
    """``value`` (decoded JSON) with its texts cut and its long number arrays counted."""
    if isinstance(value, str):
        return value if key in STRUCTURE_KEYS else _text(value)
    if isinstance(value, dict):
        return {name: partial(item, name) for name, item in value.items()}
    if isinstance(value, list):
        if len(value) > NUMBERS_KEPT and all(isinstance(item, int | float) for item in value):
            return f"[{len(value)} numbers]"
        return [partial(item, key) for item in value]
    return value


def mask(record: HistoryRecord, mode: str) -> HistoryRecord:
    """The record as ``mode`` stores it (the same object for ``none``)."""
    if mode == "none":
        return record
    if mode == "full":
        return msgspec.structs.replace(record, request=msgspec.Raw(b"null"), response=None, masking="full")
    try:
        request = msgspec.json.decode(record.request)
    except msgspec.DecodeError:
        request = None  # not JSON (recorded as null already): nothing to keep
    return msgspec.structs.replace(
        record,
        request=msgspec.Raw(msgspec.json.encode(partial(request))),
        response=partial(msgspec.json.decode(msgspec.json.encode(record.response))),  # Structs and Raw alike
        masking="partial",
    )
