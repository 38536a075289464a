"""OpenAI request bodies as msgspec Structs: the gateway validates HTTP input with them and
forwards the same objects to nodes inside :class:`events.messages.InferenceRequest`.

Unknown fields are accepted and ignored (clients send many optional ones); known fields are
type- and range-checked so that bad input fails at the gateway with the offending ``param``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .messages import Attachment

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
ModelName = Annotated[str, Meta(min_length=1)]
NonEmpty = Annotated[str, Meta(min_length=1)]
# Token ids (decimal strings, as JSON keys must be) to a bias; OpenAI's range.
LogitBias = dict[Annotated[str, Meta(pattern=r"^[0-9]+$")], Annotated[float, Meta(ge=-100.0, le=100.0)]]


class StreamOptions(Struct, omit_defaults=True):
    include_usage: bool = False


class ChatMessage(Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # A string, or a list of content parts ({"type": "text", "text": ...}, image_url, ...).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class SamplingParams(Struct, omit_defaults=True, kw_only=True):
    """Fields shared by chat and text completions."""

    model: ModelName
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    user: str | None = None


class ChatCompletionBody(SamplingParams, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(SamplingParams, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]  # one prompt: no batches
    echo: bool = False
    suffix: str | None = None

    @property
    def token_limit(self) -> int:
        # OpenAI's legacy completions default to 16 tokens.
        return self.max_tokens or 16


class EmbeddingBody(Struct, omit_defaults=True, kw_only=True):
    model: ModelName
    input: NonEmpty | Annotated[list[NonEmpty], Meta(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ---------------------------------------------------------------- images, audio
#
# Image and audio bodies follow the OpenAI API reference. Multipart endpoints (image edits and
# variations, transcriptions) are converted by the gateway from form fields into these Structs,
# with each uploaded file as an Attachment (claim check), so nodes see one shape per operation.

NonBlank = Annotated[str, Meta(pattern=r"\S")]
ImageCount = Annotated[int, Meta(ge=1, le=10)]
ImageSize = Annotated[str, Meta(pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$")]
ImageFormat = Literal["b64_json", "url"]


class _ImageOptions(Struct, omit_defaults=True, kw_only=True):
    model: ModelName
    n: ImageCount = 1
    size: ImageSize | None = None  # "WIDTHxHEIGHT"; None or "auto": the model's (or source image's) size
    response_format: ImageFormat = "url"
    seed: int | None = None  # extension: reproducible images
    steps: PositiveInt | None = None  # extension: denoising steps
    user: str | None = None

    @property
    def dimensions(self) -> tuple[int, int] | None:
        if self.size is None or self.size == "auto":
            return None
        width, height = self.size.split("x")
        return int(width), int(height)


class ImageGenerationBody(_ImageOptions, kw_only=True, tag_field="operation", tag="generate"):
    """``POST /v1/images/generations`` (JSON)."""

    prompt: NonBlank
    negative_prompt: str | None = None  # extension


class ImageEditBody(_ImageOptions, kw_only=True, tag_field="operation", tag="edit"):
    """``POST /v1/images/edits`` (multipart: image, optional mask, prompt)."""

    prompt: NonBlank
    image: Attachment
    mask: Attachment | None = None


class ImageVariationBody(_ImageOptions, kw_only=True, tag_field="operation", tag="variation"):
    """``POST /v1/images/variations`` (multipart: image)."""

    image: Attachment


ImageBody = ImageGenerationBody | ImageEditBody | ImageVariationBody

TranscriptFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
TRANSCRIPT_CONTENT_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "text/plain; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


class TranscriptionBody(Struct, omit_defaults=True, kw_only=True):
    """``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` (multipart: file).

    The capability (transcription or translation) says which task; translations ignore
    ``language`` (the output is English).
    """

    model: ModelName
    file: Attachment
    language: str | None = None
    prompt: str | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    response_format: TranscriptFormat = "json"
    timestamp_granularities: list[Literal["word", "segment"]] = msgspec.field(default_factory=lambda: ["segment"])


SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
SPEECH_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


class SpeechBody(Struct, omit_defaults=True, kw_only=True):
    """``POST /v1/audio/speech`` (JSON); the answer is the audio file itself."""

    model: ModelName
    input: Annotated[str, Meta(pattern=r"\S", max_length=4096)]
    voice: str | None = None  # a speaker of a multi-speaker voice; otherwise the model is the voice
    response_format: SpeechFormat = "mp3"
    speed: Annotated[float, Meta(ge=0.25, le=4.0)] = 1.0
    instructions: str | None = None  # accepted for compatibility; Piper voices have no style control


def has_image_parts(body: ChatCompletionBody) -> bool:
    """Whether any chat message carries an ``image_url`` content part (a vision request)."""
    return any(
        isinstance(message.content, list)
        and any(isinstance(part, dict) and part.get("type") in ("image_url", "input_image") for part in message.content)
        for message in body.messages
    )


def validation_param(error: msgspec.ValidationError) -> str | None:
    """The top-level field a msgspec validation error points at (``$.messages[0].role`` -> ``messages``;
    a dict key's error reads "at `key` in `$.logit_bias`")."""
    text = str(error)
    path = re.search(r"`\$\.([^`.\[]+)", text)
    if path:
        return path.group(1)
    missing = re.search(r"missing required field `([^`]+)`", text)
    return missing.group(1) if missing else None
