"""The capability table: everything the gateway and the nodes need to know about a capability.

One entry per capability: the request body type (what the HTTP endpoint accepts and what a
node decodes), the HTTP endpoint, the label used in errors, the node-side runner that calls the
engine, and the engine method it calls. The subject family is ``infer.<name>.<model>``
(:func:`events.subjects.infer`). Adding a capability is one entry here plus its engine method
(and a runner only when its answer has a new shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .messages import InferenceRequest
from .openai import ChatCompletionBody, CompletionBody, EmbeddingBody, ImageBody, SpeechBody, TranscriptionBody
from .subjects import CHAT, COMPLETION, EMBEDDING, IMAGE, SPEECH, TRANSCRIPTION, TRANSLATION, VISION


@dataclass(frozen=True)
class Capability:
    name: str  # the subject token: infer.<name>.<model>
    body: Any  # the request body (InferenceRequest.params): a Struct or a tagged union
    endpoint: str  # the HTTP endpoint that sends it (history records, errors)
    label: str  # "does not support <label>"
    runner: str  # the node's runner (nodes/runners.py): text, embedding, image, transcription, speech
    method: str  # the engine method the runner calls ("" when the body chooses, e.g. image operations)
    request: Any = field(init=False)  # InferenceRequest[body], decoded by the nodes

    def __post_init__(self) -> None:
        object.__setattr__(self, "request", InferenceRequest[self.body])


CAPABILITIES: dict[str, Capability] = {
    c.name: c
    for c in (
        Capability(CHAT, ChatCompletionBody, "/v1/chat/completions", "chat completions", "text", "chat"),
        Capability(COMPLETION, CompletionBody, "/v1/completions", "text completions", "text", "complete"),
        Capability(EMBEDDING, EmbeddingBody, "/v1/embeddings", "embeddings", "embedding", "embed"),
        # A chat with image parts, sent only to nodes with a vision model.
        Capability(VISION, ChatCompletionBody, "/v1/chat/completions", "images in chat (vision)", "text", "chat"),
        # One body per operation (tagged on "operation"): generate, edit, variation.
        Capability(IMAGE, ImageBody, "/v1/images/generations", "image generation (images)", "image", ""),
        Capability(
            TRANSCRIPTION,
            TranscriptionBody,
            "/v1/audio/transcriptions",
            "speech to text (transcription)",
            "transcription",
            "transcribe",
        ),
        Capability(
            TRANSLATION,
            TranscriptionBody,
            "/v1/audio/translations",
            "speech translation (translation)",
            "transcription",
            "transcribe",
        ),
        Capability(SPEECH, SpeechBody, "/v1/audio/speech", "text to speech (speech)", "speech", "speak"),
    )
}
