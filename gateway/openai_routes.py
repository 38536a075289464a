"""The OpenAI-compatible text endpoints (chat, completions, embeddings) and the model list.

Every inference endpoint follows the same steps through an :class:`~gateway.exchange.Exchange`:
accept (parse, check, resolve), dispatch, wait for the first reply, format, record. Media
endpoints (gateway/media_routes.py) share ``resolve`` and ``final_reply`` from here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from broker.mirrors import NodeDirectory, RegisteredModels
from events import codec, name_error, subjects
from events.capabilities import CAPABILITIES
from events.messages import (
    Accepted,
    Choice,
    EmbeddingResult,
    Failure,
    LoadedModel,
    ModelRecord,
    ModelSource,
    TextDelta,
    TextDone,
    Usage,
)
from events.openai import ChatCompletionBody, CompletionBody, EmbeddingBody, has_image_parts, model_features

from . import formatting
from .dispatch import Dispatcher, DispatchError
from .errors import ApiError, api_error, model_not_found
from .exchange import Exchange, failure_error
from .history import HistoryWriter
from .http import json_response
from .providers import Clouds, Provider
from .providers import serve as serve_from_cloud

log = structlog.get_logger("gateway")


def unavailable_message(record: ModelRecord) -> str:
    """Why a registered model cannot be served right now, with download progress when known."""
    name = record.name
    if record.state == "downloading":
        progress = formatting.progress_text(record.download)
        return f"Model '{name}' is downloading{f' ({progress})' if progress else ''}. Retry shortly."
    if record.state == "error":
        return f"Model '{name}' failed to load or download: {record.error}. Fix it and retry."
    return f"Model '{name}' is registered but no live node serves it yet (its files may still be downloading). Retry shortly."


def _chat_capability(body: ChatCompletionBody) -> str:
    """Chats with image parts go to the vision capability: only nodes with a vision model subscribe there.
    Those run through llama.cpp's LLaVA handler, which has no tools, grammars, logprobs or n."""
    if not has_image_parts(body):
        return subjects.CHAT
    field = body.shaping_field
    if field is not None:
        raise ApiError(
            400,
            f"'{field}' is not supported in chats with images (docs/openai.md lists what each engine offers).",
            param=field,
            code="unsupported_parameter",
        )
    return subjects.VISION


class OpenAIRoutes:
    def __init__(
        self,
        catalog: RegisteredModels,
        directory: NodeDirectory,
        dispatcher: Dispatcher,
        history: HistoryWriter,
        on_demand: Any = None,
        clouds: Clouds | None = None,
    ) -> None:
        """``on_demand`` (gateway.downloads.OnDemand): asks for a download of a model no node has.
        ``clouds``: the cloud providers behind ``openai:``-style prefixes (none: local models only)."""
        self.catalog = catalog
        self.directory = directory
        self.dispatcher = dispatcher
        self.history = history
        self.on_demand = on_demand
        self.clouds = clouds

    # ------------------------------------------------------------ models

    def _model_entry(self, name: str) -> dict | None:
        record = self.catalog.get(name)
        if record is None:
            return self._announced_entry(name)
        nodes = self.directory.serving(name)
        usable = bool(nodes) or bool(self.directory.loadable(name))  # loaded, or loaded on the first request
        return {
            "id": record.name,
            "object": "model",
            "created": int(record.created_at),
            "owned_by": record.labels.get("owner", "llm-router"),
            "capabilities": list(record.capabilities),
            "features": model_features(record.capabilities),
            "ready": usable,
            "lifecycle_status": "ready" if usable else record.state,
            "download_progress": msgspec.to_builtins(record.download) if record.download and not usable else None,
            "nodes": len(nodes),
        }

    async def list_models(self, request: Request) -> Response:
        entries = [self._model_entry(name) for name in sorted(self.catalog.records.keys() | self.directory.announced())]
        entries += self.clouds.catalog.entries() if self.clouds is not None else []
        return json_response({"object": "list", "data": [e for e in entries if e and e["ready"]]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        entry = self._model_entry(name) or (self.clouds.catalog.get(name) if self.clouds is not None else None)
        if entry is None:
            raise model_not_found(name)
        return json_response(entry)

    # ------------------------------------------------------------ inference

    async def resolve(self, model: str, capability: str) -> None:
        """Refuse, before anything is published, a model that is unknown, cannot do
        ``capability`` (400 naming it), or has no live node serving it."""
        invalid = name_error(model)
        if invalid:  # never let it near a subject: the server would drop our connection
            raise ApiError(400, f"Invalid 'model': {invalid}.", param="model", code="invalid_model")
        if (cloud := self.cloud_of(model)) is not None:
            Clouds.check(cloud[0], capability, model)
            return
        record = self.catalog.get(model) or self._announced_record(model)
        if record is None:
            raise model_not_found(model)
        if capability == subjects.VISION and capability not in record.capabilities:
            raise ApiError(
                400,
                f"Model '{model}' does not accept images: the messages have image_url content parts, which need "
                f"a model with the vision capability (it supports: {', '.join(record.capabilities)}).",
                param="messages",
                code="unsupported_capability",
            )
        if capability not in record.capabilities:
            raise ApiError(
                400,
                f"Model '{model}' does not support {CAPABILITIES[capability].label} (it supports: {', '.join(record.capabilities)}).",
                param="model",
                code="unsupported_capability",
            )
        if record.state == "pending_conversion":
            raise ApiError(
                503,
                f"Model '{model}' is awaiting conversion to a format the nodes can run; it cannot be served yet.",
                code="model_pending_conversion",
            )
        if not self.directory.serving(model, capability) and not self.directory.loadable(model, capability):
            error = ApiError(503, unavailable_message(record), code="model_unavailable", headers={"Retry-After": "5"})
            if self.on_demand is not None and not self.directory.serving(model):
                error = await self.on_demand.error_for(record, error)
            raise error

    def exchange(self, request: Request, capability: str, endpoint: str | None = None) -> Exchange:
        return Exchange(request, self.history, capability, endpoint)

    async def chat_completions(self, request: Request) -> Response:
        exchange = self.exchange(request, subjects.CHAT)
        body = await exchange.accept(ChatCompletionBody, self.resolve, capability_of=_chat_capability)
        if (cloud := self.cloud_of(body.model)) is not None:
            return await serve_from_cloud(exchange, body, *cloud)
        return await self._text(exchange, body, chat=True)

    async def completions(self, request: Request) -> Response:
        exchange = self.exchange(request, subjects.COMPLETION)
        body = await exchange.accept(CompletionBody, self.resolve)
        if (cloud := self.cloud_of(body.model)) is not None:
            return await serve_from_cloud(exchange, body, *cloud)
        return await self._text(exchange, body, chat=False)

    async def embeddings(self, request: Request) -> Response:
        exchange = self.exchange(request, subjects.EMBEDDING)
        body = await exchange.accept(EmbeddingBody, self.resolve)  # empty inputs: refused by the type
        if (cloud := self.cloud_of(body.model)) is not None:
            return await serve_from_cloud(exchange, body, *cloud)
        reply = await self.final_reply(exchange, body, EmbeddingResult)
        payload = formatting.embedding_list(body.model, reply.vectors, reply.usage, body.encoding_format)
        summary = {
            "object": "list",
            "model": body.model,
            "count": len(reply.vectors),
            "dimensions": len(reply.vectors[0]) if reply.vectors else 0,
        }
        exchange.record(200, usage=reply.usage, response=summary)
        return json_response(payload, headers=exchange.headers())

    async def final_reply(
        self, exchange: Exchange, body: Any, expected: type, *, cleanup: Callable[[], Awaitable[None]] | None = None
    ) -> Any:
        """Dispatch a non-streamed request and wait for its one reply, of type ``expected``.

        A failure is recorded and raised as the node's error; a client that leaves meanwhile
        takes its request out of the queue or off the node (recorded as 499). ``cleanup`` runs
        whatever happens (shielded: a client that went away must not leave it half done)."""
        exchange.dispatch(self.dispatcher, body, stream=False)
        try:
            reply = await exchange.first_reply()
        finally:
            await exchange.close()
            if cleanup is not None:
                await _shielded(cleanup)
        if not isinstance(reply, expected):
            raise ApiError(500, f"unexpected reply from node: {type(reply).__name__}")
        return reply

    async def _text(self, exchange: Exchange, body: ChatCompletionBody | CompletionBody, *, chat: bool) -> Response:
        call = exchange.dispatch(self.dispatcher, body, stream=body.stream)
        cid = ("chatcmpl-" if chat else "cmpl-") + call.request_id
        created = int(exchange.started)
        make = formatting.chat_completion if chat else formatting.text_completion
        try:
            first = await exchange.first_reply()
        except BaseException:
            await exchange.close()
            raise
        if not body.stream:
            await exchange.close()
            if not isinstance(first, TextDone):
                raise ApiError(500, f"unexpected reply from node: {type(first).__name__}")
            encoded = codec.encode(
                make(cid, created, body.model, first.text, first.finish_reason, first.usage, first.choices)
            )
            exchange.record(200, usage=first.usage, response=msgspec.Raw(encoded))  # encoded once, for both
            return Response(encoded, 200, exchange.headers(), media_type="application/json")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = formatting.ChunkWriter(chat, cid, created, body.model, include_usage, body.n)
        first_byte_ms = (time.perf_counter() - exchange.t0) * 1000

        def summary(text: str, finish: str, usage: Usage, choices: list[Choice] | None) -> dict:
            return make(cid, created, body.model, text, finish, usage, choices)

        collected = formatting.Choices() if body.shapes_output else None
        return CallStream.sse(exchange, self._stream(exchange, first, writer, summary, first_byte_ms, collected))

    @staticmethod
    async def stream_replies(exchange: Exchange, reply: Any) -> AsyncIterator[TextDelta | TextDone | ApiError]:
        """A streamed call's replies from ``reply`` (its first) on, Accepted skipped, up to the one
        that ends it: a TextDone, or the ApiError of a node that failed or died mid-stream (for
        the stream to say, never truncating silently). The Responses API streams through it too."""
        call = exchange.call
        assert call is not None
        while True:
            if isinstance(reply, TextDelta):
                yield reply
            elif isinstance(reply, TextDone):
                yield reply
                return
            elif isinstance(reply, Failure):
                yield failure_error(reply)
                return
            elif not isinstance(reply, Accepted):
                raise ApiError(500, f"unexpected reply from node: {type(reply).__name__}")
            try:
                reply = await call.next()
            except DispatchError as exc:
                yield api_error(exc)
                return

    async def _stream(
        self,
        exchange: Exchange,
        first: Any,
        writer: formatting.ChunkWriter,
        summary: Callable[[str, str, Usage, list[Choice] | None], dict],
        first_byte_ms: float,
        collected: formatting.Choices | None = None,
    ) -> AsyncIterator[bytes]:
        """SSE chunks from the first reply on; ``summary`` is the answer as the history records it
        (``collected`` gathers every choice of an answer that has more than one plain text)."""
        call = exchange.call
        assert call is not None
        parts: list[str] = []
        status, error, usage, finish = 200, None, Usage(), "stop"
        finals: list[Choice] | None = None
        first_token_ms = None
        try:
            yield writer.opening()
            async for reply in self.stream_replies(exchange, first):
                if first_token_ms is None and not isinstance(reply, ApiError):
                    first_token_ms = (time.perf_counter() - exchange.t0) * 1000
                if isinstance(reply, TextDelta):
                    if collected is not None:
                        collected.add(reply)
                    if reply.index == 0 and reply.logprobs is None and reply.tool_calls is None:
                        parts.append(reply.text)
                        yield writer.delta(reply.text)
                    else:
                        yield writer.rich(reply)
                elif isinstance(reply, TextDone):
                    usage, finish, finals = reply.usage, reply.finish_reason, reply.choices
                    yield writer.closing(finish, usage, finals)
                else:  # the node failed, or died mid-stream: say so, never truncate silently
                    status, error = reply.status, reply.message
                    yield formatting.sse(reply.body()) + formatting.SSE_DONE
        finally:
            if not call.finished and error is None:
                status, error = 499, "client disconnected"
            # Starlette cancels this generator when the client leaves; the close is shielded.
            await exchange.close()
            choices = collected.result(finals) if collected is not None and finals else None
            exchange.record(
                status,
                usage=usage,
                response=summary("".join(parts), finish, usage, choices),
                stream=True,
                error=error,
                first_byte_ms=first_byte_ms,
                first_token_ms=first_token_ms,
            )

    # ------------------------------------------------------------ models without a registry record

    def cloud_of(self, model: str) -> tuple[Provider, str] | None:
        """(provider, its model) for a cloud-prefixed model (400/401 for a bad prefix or no key)."""
        if self.clouds is None or ":" not in model:
            return None
        return self.clouds.target(
            model, lambda name: name in self.catalog.records or name in self.directory.announced()
        )

    def _announced_record(self, name: str) -> ModelRecord | None:
        """A record for a model live nodes announce without registration (an upstream server's)."""
        model = self.directory.announced().get(name)
        if model is None:
            return None
        source = ModelSource(kind="upstream")
        return ModelRecord(
            name=name,
            format="upstream",
            runtime=model.runtime,
            capabilities=model.capabilities,
            source=source,
            state="ready",
        )

    def _announced_entry(self, name: str) -> dict | None:
        model: LoadedModel | None = self.directory.announced().get(name)
        if model is None:
            return None
        nodes = self.directory.serving(name)
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "upstream",
            "capabilities": list(model.capabilities),
            "ready": bool(nodes),
            "lifecycle_status": "ready" if nodes else "registered",
            "download_progress": None,
            "nodes": len(nodes),
        }


class CallStream(StreamingResponse):
    """A streamed answer that frees its call however the response ends. Its generator's own
    clean-up runs only if the generator started: a client that leaves before the first chunk
    is written (Starlette cancels the sending at once) would otherwise keep the slot, the inbox
    and the node's work forever."""

    def __init__(self, exchange: Exchange, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.exchange = exchange

    @classmethod
    def sse(cls, exchange: Exchange, events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> CallStream:
        """``events`` as a server-sent event stream, never cached, with ``headers`` (by default
        the exchange's): how every streamed answer goes out."""
        headers = exchange.headers() if headers is None else headers
        return cls(exchange, events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.exchange.close()
            self.exchange.record(499, stream=True, error="client disconnected")  # a no-op once recorded


async def _shielded(action: Callable[[], Awaitable[None]]) -> None:
    with anyio.CancelScope(shield=True):
        await action()
