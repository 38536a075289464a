"""Encoders and decoders, built once per type and reused (msgspec's performance advice)."""

from __future__ import annotations

from typing import Any

import msgspec

from . import messages as m
from .capabilities import CAPABILITIES

encoder = msgspec.json.Encoder()
encode = encoder.encode

_decoders: dict[Any, msgspec.json.Decoder] = {}


def decoder(kind: Any) -> msgspec.json.Decoder:
    """The shared decoder for ``kind`` (a Struct type or a Union)."""
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.json.Decoder(kind)
    return dec


def decode(data: bytes, kind: Any) -> Any:
    return decoder(kind).decode(data)


def decode_published(msg: Any, kind: Any, log: Any, what: str, level: str = "warning") -> Any | None:
    """A published message's body as ``kind``; None for one that does not decode, logged as
    ``undecodable <what>`` with its subject on the subscriber's logger (so, its component's)."""
    try:
        return decode(msg.data, kind)
    except msgspec.DecodeError:
        getattr(log, level)(f"undecodable {what}", subject=msg.subject)
        return None


# Request type of each capability, as a node decodes it (from the capability table).
REQUEST_TYPES: dict[str, Any] = {name: c.request for name, c in CAPABILITIES.items()}


_decode_reply = msgspec.json.Decoder(m.Reply).decode  # hot: every reply a gateway receives


def decode_reply(data: bytes) -> m.Reply:
    return _decode_reply(data)
