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

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
ModelName = Annotated[str, Meta(min_length=1)]


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
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionBody(SamplingParams, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(SamplingParams, kw_only=True):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @property
    def token_limit(self) -> int:
        # OpenAI's legacy completions default to 16 tokens.
        return self.max_tokens or 16


class EmbeddingBody(Struct, omit_defaults=True, kw_only=True):
    model: ModelName
    input: str | Annotated[list[str], Meta(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def validation_param(error: msgspec.ValidationError) -> str | None:
    """The top-level field a msgspec validation error points at (``$.messages[0].role`` -> ``messages``)."""
    text = str(error)
    marker = "- at `$."
    if marker in text:
        path = text.split(marker, 1)[1].rstrip("`")
        for sep in ("[", "."):
            path = path.split(sep, 1)[0]
        return path or None
    missing = re.search(r"missing required field `([^`]+)`", text)
    return missing.group(1) if missing else None
