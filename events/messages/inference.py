"""Inference: the gateway's request to a node, the node's tagged replies, and cancellation.

Replies form a tagged union on the ``kind`` field; new kinds are added as new tagged Structs
without changing the existing ones.
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from msgspec import Struct

from .base import SCHEMA_VERSION, NodeReply, Usage

P = TypeVar("P")


class InferenceRequest(Struct, Generic[P], kw_only=True):
    """Gateway -> node. ``params`` is the validated OpenAI body for the capability."""

    request_id: str
    model: str
    capability: str
    params: P
    stream: bool = False
    deadline: float | None = None  # unix time after which the node may drop it
    # "reject": answer a 429 ``node_busy`` Failure at once when every slot is taken, so the
    # gateway can queue or go elsewhere; "queue": wait on the node for a slot.
    when_busy: Literal["queue", "reject"] = "queue"
    schema: int = SCHEMA_VERSION


class Accepted(NodeReply, tag="accepted", kw_only=True):
    """A node took a streamed request and is starting it, so the gateway can open the stream."""

    waited_ms: float = 0.0  # time spent waiting for a free slot on the node


class TopLogprob(Struct, array_like=True):
    """One alternative at a token position: its text, log-probability and raw bytes."""

    token: str
    logprob: float
    utf8: bytes  # a token may hold part of a UTF-8 character: its text alone can't say


class TokenLogprob(Struct, array_like=True):
    """The log-probability of a generated token and the ``top`` most likely tokens there."""

    token: str
    logprob: float
    utf8: bytes
    top: list[TopLogprob] = []


class ToolCall(Struct, kw_only=True):
    """A function call the model made; ``arguments`` is JSON text, as OpenAI returns it."""

    id: str
    name: str
    arguments: str


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    """A streamed fragment of tool call ``index``: its first has ``id`` and ``name``, the
    following ones pieces of ``arguments``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Choice(Struct, kw_only=True, omit_defaults=True):
    """One choice of an answer that is more than one plain text (n > 1, tools, logprobs)."""

    index: int = 0
    text: str = ""
    finish_reason: str = "stop"  # stop, length, tool_calls, cancelled
    tool_calls: list[ToolCall] | None = None
    logprobs: list[TokenLogprob] | None = None


class TextDelta(NodeReply, tag="delta", kw_only=True):
    """A piece of generated text of a streamed answer (of choice ``index``), with the
    logprobs of its tokens and tool call fragments when the request asked for them."""

    text: str
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCallDelta] | None = None


class TextDone(NodeReply, tag="done", kw_only=True):
    """Ends a text answer. Carries the whole text only when the request was not streamed.

    ``choices``: set when the answer is more than one plain text; then it has every choice's
    finish reason (and, unstreamed, its text, tool calls and logprobs), and ``usage`` sums them.
    """

    finish_reason: str
    usage: Usage
    text: str = ""
    index: int = 0
    choices: list[Choice] | None = None


class EmbeddingResult(NodeReply, tag="embeddings", kw_only=True):
    vectors: list[list[float]]
    usage: Usage


class Attachment(Struct, kw_only=True, omit_defaults=True):
    """Binary payload of a request or reply (claim check): the bytes themselves when small,
    else the name of an object in the temporary ``payloads`` object store.

    NATS messages are limited (1 MB by default) while an audio upload may be 25 MB, so large
    bytes travel through the object store and only this small reference in the message.
    """

    size: int
    content_type: str = "application/octet-stream"
    filename: str = ""
    data: bytes | None = None  # inline bytes (base64 in JSON)
    object: str | None = None  # name in events.storage.OBJ_PAYLOADS

    @property
    def inline(self) -> bool:
        return self.object is None


class ImageResult(NodeReply, tag="images", kw_only=True):
    """Generated or edited images, PNG each, in request order."""

    images: list[Attachment]


class TranscriptionResult(NodeReply, tag="transcription", kw_only=True):
    """A transcript (or translation) already rendered in the requested response_format."""

    body: Attachment  # JSON for json/verbose_json, text for text/srt/vtt; content_type says which
    text: str = ""  # the plain transcript, for the history record (truncated)
    language: str = ""
    duration_s: float = 0.0


class SpeechResult(NodeReply, tag="speech", kw_only=True):
    """Synthesised speech, encoded in the requested response_format."""

    audio: Attachment
    sample_rate: int
    duration_s: float = 0.0


class Failure(NodeReply, tag="error", kw_only=True):
    """Ends an answer with an error; ``status`` is the HTTP status the gateway should use."""

    status: int
    message: str
    type: str = "server_error"
    code: str | None = None
    param: str | None = None


Reply = Accepted | TextDelta | TextDone | EmbeddingResult | ImageResult | TranscriptionResult | SpeechResult | Failure
FINAL_REPLIES = (TextDone, EmbeddingResult, ImageResult, TranscriptionResult, SpeechResult, Failure)


class CancelRequest(Struct, kw_only=True):
    request_id: str
    reason: str = "client disconnected"
    schema: int = SCHEMA_VERSION
