"""Encoders and decoders, built once per type and reused (msgspec's performance advice)."""

from __future__ import annotations

from typing import Any

import msgspec

from . import messages as m
from .openai import ChatCompletionBody, CompletionBody, EmbeddingBody, ImageBody, SpeechBody, TranscriptionBody
from .subjects import CHAT, COMPLETION, EMBEDDING, IMAGE, SPEECH, TRANSCRIPTION, TRANSLATION, VISION

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


# Body type of each capability; a node decodes its requests with REQUEST_TYPES[capability].
BODY_TYPES: dict[str, Any] = {
    CHAT: ChatCompletionBody,
    COMPLETION: CompletionBody,
    EMBEDDING: EmbeddingBody,
    VISION: ChatCompletionBody,  # a chat with image parts, sent only to vision-capable nodes
    IMAGE: ImageBody,  # tagged union on "operation": generate, edit, variation
    TRANSCRIPTION: TranscriptionBody,
    TRANSLATION: TranscriptionBody,
    SPEECH: SpeechBody,
}
REQUEST_TYPES: dict[str, Any] = {cap: m.InferenceRequest[body] for cap, body in BODY_TYPES.items()}


def decode_reply(data: bytes) -> m.Reply:
    return decoder(m.Reply).decode(data)
