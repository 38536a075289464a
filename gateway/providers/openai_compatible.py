"""Providers that speak OpenAI's own API: OpenAI, and Google through its OpenAI-compatible endpoint.

The client's body goes to the provider as the client wrote it (tools, ``response_format`` and
every other field we do not model included), with only ``model`` changed to the provider's
name, and the answer comes back byte for byte. A stream is relayed event by event as each
arrives, never buffered; each event is also read (one msgspec decode into a few fields) for
the history record and the token counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from msgspec import Struct

from events import codec, subjects
from events.messages import Usage
from outbound.http import HttpError, Response
from outbound.sse import sse_batches

from ..errors import ApiError
from ..formatting import SSE_DONE
from .answers import Answer, Stream, Transcript
from .base import MODELS_TIMEOUT_S, CloudModel, Provider, sse

JSON = {"content-type": "application/json"}
PATHS = {subjects.CHAT: "/chat/completions", subjects.COMPLETION: "/completions", subjects.EMBEDDING: "/embeddings"}


class _ToolFunction(Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolDelta(Struct):
    index: int = 0
    id: str | None = None
    function: _ToolFunction | None = None


class _Delta(Struct):
    content: str | None = None
    tool_calls: list[_ToolDelta] | None = None


class _Choice(Struct):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None  # legacy completions
    finish_reason: str | None = None


class _Chunk(Struct):
    choices: list[_Choice] = []
    usage: Usage | None = None
    error: Any = None


class _Answer(Struct):
    """The few fields of a completion or embedding answer we read (the rest is skipped)."""

    usage: Usage | None = None
    data: list[msgspec.Raw] | None = None  # embeddings: counted, not decoded


class _ModelList(Struct):
    data: list[dict[str, Any]] = []


_chunk = msgspec.json.Decoder(_Chunk).decode
_answer = msgspec.json.Decoder(_Answer).decode


def complete_usage(usage: Usage | None) -> Usage | None:
    """Total tokens filled in where a server leaves it out."""
    if usage is not None and not usage.total_tokens:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return usage


def guess_capabilities(model_id: str) -> list[str]:
    """What a listed model likely does, from its name (providers' lists do not say)."""
    return [subjects.EMBEDDING] if "embed" in model_id.lower() else [subjects.CHAT]


class OpenAICompatible(Provider):
    capabilities = frozenset({subjects.CHAT, subjects.COMPLETION, subjects.EMBEDDING})
    # Ask for the usage chunk of a stream (``stream_options.include_usage``), and drop it again
    # when the client did not ask: the tokens are counted either way.
    ask_stream_usage = True

    def model_id(self, listed: str) -> str:
        """The name a listed model is requested by (and listed under, after the prefix)."""
        return listed

    async def models(self) -> list[CloudModel]:
        response = await self.send("GET", "/models", timeout=MODELS_TIMEOUT_S)
        listed = msgspec.json.decode(response.content, type=_ModelList).data
        models = []
        for entry in listed:
            raw_id = entry.get("id")
            if isinstance(raw_id, str) and raw_id:
                model_id = self.model_id(raw_id)
                created = entry.get("created")
                models.append(
                    CloudModel(model_id, created if isinstance(created, int) else 0, guess_capabilities(model_id))
                )
        return models

    async def complete(self, capability: str, payload: dict[str, Any], meta: Any) -> Answer:
        """One JSON answer, passed through as the provider wrote it."""
        response = await self.send("POST", PATHS[capability], codec.encode(payload), headers=JSON)
        content = response.content
        try:
            read = _answer(content)
        except msgspec.DecodeError:
            raise ApiError(
                502, f"{self.name} sent an answer that is not JSON.", type="server_error", code="provider_error"
            ) from None
        if capability == subjects.EMBEDDING:  # history keeps a summary, not the vectors (as for local models)
            record: Any = {"object": "list", "model": meta.model, "count": len(read.data or ())}
        else:
            record = msgspec.Raw(content)
        return Answer(content, complete_usage(read.usage), record)

    async def stream(self, capability: str, payload: dict[str, Any], meta: Any, *, client_wants_usage: bool) -> Stream:
        """The provider's stream, opened (its HTTP error raised as ours before anything is sent)."""
        if self.ask_stream_usage:
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        response = await self.send("POST", PATHS[capability], codec.encode(payload), headers=JSON, stream=True)
        transcript = Transcript()
        return Stream(self._relay(response, transcript, client_wants_usage), transcript, response.aclose)

    async def _relay(self, response: Response, t: Transcript, wants_usage: bool) -> AsyncIterator[bytes]:
        """Each network read's events passed on in one write, as soon as they arrive."""
        try:
            async for batch in sse_batches(response.iter_bytes()):
                out = []
                for _, data in batch:
                    if data == b"[DONE]":
                        t.done = True
                        out.append(SSE_DONE)
                        break
                    if self._read(data, t, wants_usage):
                        out.append(b"data: " + data.replace(b"\n", b"\ndata: ") + b"\n\n")
                if out:
                    yield b"".join(out)
                if t.done:
                    return
            if t.finish_reason is not None:  # ended without [DONE], but complete
                t.done = True
                yield SSE_DONE
                return
            t.error = (502, f"{self.name} ended the stream before the answer was complete")
            yield _stream_error(502, t.error[1]) + SSE_DONE
        except HttpError as exc:  # the provider went away mid-stream: say so, never truncate silently
            error = self.unreachable(exc)
            t.error = (error.status, error.message)
            yield sse(error.body()) + SSE_DONE

    def _read(self, data: bytes, t: Transcript, wants_usage: bool) -> bool:
        """Note one event in the transcript; False for the usage chunk the client did not ask for."""
        try:
            chunk = _chunk(data)
        except msgspec.DecodeError:  # not ours to judge: pass it on as it came
            return True
        if chunk.error is not None:
            t.error = (502, self.scrub(str(chunk.error)))
        if chunk.usage is not None:
            t.usage = complete_usage(chunk.usage)
            if not chunk.choices and not wants_usage:
                return False  # the usage chunk we asked for; the client did not
        _note(t, chunk)
        return True


def _note(t: Transcript, chunk: _Chunk) -> None:
    for choice in chunk.choices:
        if choice.index != 0:
            continue
        if choice.finish_reason:
            t.finish_reason = choice.finish_reason
        if choice.text:
            t.text.append(choice.text)
        delta = choice.delta
        if delta is None:
            continue
        if delta.content:
            t.text.append(delta.content)
        for call in delta.tool_calls or ():
            function = call.function or _ToolFunction()
            t.tool_delta(call.index, call.id, function.name, function.arguments)


def _stream_error(status: int, message: str) -> bytes:
    return sse(ApiError(status, message, type="server_error", code="provider_error").body())


class OpenAIProvider(OpenAICompatible):
    """api.openai.com (``OPENAI_BASE_URL``, with its ``/v1``)."""


class GoogleProvider(OpenAICompatible):
    """Gemini through Google's OpenAI-compatible endpoint (``.../v1beta/openai``): chat, tools,
    ``response_format`` and embeddings in OpenAI's shapes, with the same key as the native API."""

    capabilities = frozenset({subjects.CHAT, subjects.EMBEDDING})
    # Its streams carry usage on their own; an unknown stream option risks a 400.
    ask_stream_usage = False

    def model_id(self, listed: str) -> str:
        return listed.removeprefix("models/")  # listed as models/gemini-…, requested as gemini-…
