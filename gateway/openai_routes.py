"""The OpenAI-compatible ``/v1`` endpoints: validate, resolve the model, dispatch, format."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from broker.mirrors import NodeDirectory, RegisteredModels
from events import codec, name_error, subjects
from events.messages import (
    Accepted,
    EmbeddingResult,
    Failure,
    HistoryRecord,
    ModelRecord,
    TextDelta,
    TextDone,
    Usage,
)
from events.openai import (
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    has_image_parts,
    validation_param,
)

from . import formatting
from .disconnect import abandon_on_disconnect
from .dispatch import Call, ClientDisconnected, Dispatcher
from .errors import ApiError, model_not_found
from .history import HistoryWriter

log = structlog.get_logger("gateway")

CAPABILITY_LABELS = {
    subjects.CHAT: "chat completions",
    subjects.COMPLETION: "text completions",
    subjects.EMBEDDING: "embeddings",
    subjects.VISION: "images in chat (vision)",
    subjects.IMAGE: "image generation (images)",
    subjects.TRANSCRIPTION: "speech to text (transcription)",
    subjects.TRANSLATION: "speech translation (translation)",
    subjects.SPEECH: "text to speech (speech)",
}
ENDPOINTS = {
    subjects.CHAT: "/v1/chat/completions",
    subjects.COMPLETION: "/v1/completions",
    subjects.EMBEDDING: "/v1/embeddings",
    subjects.VISION: "/v1/chat/completions",
    subjects.IMAGE: "/v1/images/generations",
    subjects.TRANSCRIPTION: "/v1/audio/transcriptions",
    subjects.TRANSLATION: "/v1/audio/translations",
    subjects.SPEECH: "/v1/audio/speech",
}


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(codec.encode(payload), status, headers, media_type="application/json")


def parse_body(raw: bytes, kind: type) -> Any:
    if not raw.strip():
        raise ApiError(400, "The request body is empty; expected a JSON object.")
    try:
        return codec.decode(raw, kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"Invalid request: {exc}", param=validation_param(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from None


def _parsed_json(raw: bytes) -> Any:
    """The body as JSON, or None when it is not JSON (for recording refused requests)."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None


def unavailable_message(record: ModelRecord) -> str:
    """Why a registered model cannot be served right now, with download progress when known."""
    name = record.name
    if record.state == "downloading":
        progress = formatting.progress_text(record.download)
        return f"Model '{name}' is downloading{f' ({progress})' if progress else ''}. Retry shortly."
    if record.state == "error":
        return f"Model '{name}' failed to load or download: {record.error}. Fix it and retry."
    return f"Model '{name}' is registered but no live node serves it yet (its files may still be downloading). Retry shortly."


def call_headers(call: Call) -> dict[str, str]:
    """``x-request-id``, plus ``x-queue-wait-ms`` when the request waited for a free node."""
    headers = {"x-request-id": call.request_id}
    if call.node_id:
        headers["x-node-id"] = call.node_id
    if call.waited_ms > 0:
        headers.update({"x-queue-status": "queued", "x-queue-wait-ms": str(round(call.waited_ms))})
    return headers


def failure_error(failure: Failure) -> ApiError:
    return ApiError(failure.status, failure.message, type=failure.type, param=failure.param, code=failure.code)


class OpenAIRoutes:
    def __init__(
        self, catalog: RegisteredModels, directory: NodeDirectory, dispatcher: Dispatcher, history: HistoryWriter,
        on_demand: Any = None,
    ) -> None:
        """``on_demand`` (gateway.downloads.OnDemand): asks for a download of a model no node has."""
        self.catalog = catalog
        self.directory = directory
        self.dispatcher = dispatcher
        self.history = history
        self.on_demand = on_demand

    # ------------------------------------------------------------ models

    def _model_entry(self, name: str) -> dict | None:
        record = self.catalog.get(name)
        if record is None:
            return None
        nodes = self.directory.serving(name)
        return {
            "id": record.name,
            "object": "model",
            "created": int(record.created_at),
            "owned_by": record.labels.get("owner", "llm-router"),
            "capabilities": list(record.capabilities),
            "ready": bool(nodes),
            "lifecycle_status": "ready" if nodes else record.state,
            "download_progress": msgspec.to_builtins(record.download) if record.download and not nodes else None,
            "nodes": len(nodes),
        }

    async def list_models(self, request: Request) -> Response:
        entries = [self._model_entry(name) for name in sorted(self.catalog.records)]
        return json_response({"object": "list", "data": [e for e in entries if e and e["ready"]]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        entry = self._model_entry(name)
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
        record = self.catalog.get(model)
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
                f"Model '{model}' does not support {CAPABILITY_LABELS[capability]}"
                f" (it supports: {', '.join(record.capabilities)}).",
                param="model",
                code="unsupported_capability",
            )
        if record.state == "pending_conversion":
            raise ApiError(
                503, f"Model '{model}' is awaiting conversion to a format the nodes can run; it cannot be served yet.",
                code="model_pending_conversion",
            )
        if not self.directory.serving(model, capability):
            error = ApiError(503, unavailable_message(record), code="model_unavailable", headers={"Retry-After": "5"})
            if self.on_demand is not None and not self.directory.serving(model):
                error = await self.on_demand.error_for(record, error)
            raise error

    async def chat_completions(self, request: Request) -> Response:
        return await self._text(request, subjects.CHAT, ChatCompletionBody)

    async def completions(self, request: Request) -> Response:
        return await self._text(request, subjects.COMPLETION, CompletionBody)

    async def embeddings(self, request: Request) -> Response:
        def no_empty_input(body: EmbeddingBody) -> None:
            if any(not text for text in body.inputs):
                raise ApiError(400, "input must not contain empty strings", param="input")

        body, raw, started, t0 = await self.accept_json(request, EmbeddingBody, subjects.EMBEDDING, check=no_empty_input)
        call, reply = await self.final_reply(request, subjects.EMBEDDING, body, raw, started, t0, EmbeddingResult)
        payload = formatting.embedding_list(body.model, reply.vectors, reply.usage, body.encoding_format)
        summary = {"object": "list", "model": body.model, "count": len(reply.vectors), "dimensions": len(reply.vectors[0]) if reply.vectors else 0}
        self.record(call, raw, started, t0, 200, usage=reply.usage, response=summary)
        return json_response(payload, headers=call_headers(call))

    async def accept_json(self, request: Request, kind: type, capability: str, *, endpoint: str | None = None,
                          check: Callable[[Any], None] | None = None) -> tuple[Any, bytes, float, float]:
        """Parse a JSON body, check it, resolve its model for ``capability``; a refusal is recorded.

        Returns ``(body, raw, started, t0)``: what the rest of the handler records history with."""
        started, t0 = time.time(), time.perf_counter()
        raw = await request.body()
        try:
            body = parse_body(raw, kind)
            if check is not None:
                check(body)
            await self.resolve(body.model, capability)
        except ApiError as exc:
            self.refused(capability, raw, started, t0, exc, endpoint)
            raise
        return body, raw, started, t0

    async def final_reply(self, request: Request, capability: str, body: Any, raw: bytes, started: float, t0: float,
                          expected: type, *, endpoint: str | None = None,
                          cleanup: Callable[[], Awaitable[None]] | None = None) -> tuple[Call, Any]:
        """Dispatch a non-streamed request and wait for its one reply, of type ``expected``.

        A failure is recorded and raised as the node's error; a client that leaves meanwhile
        takes its request out of the queue or off the node (recorded as 499). ``cleanup`` runs
        whatever happens (shielded: a client that went away must not leave it half done)."""
        call = self.dispatcher.call(capability, body.model, body, stream=False)
        try:
            async with call, abandon_on_disconnect(request, call):
                reply = await call.next()
        except ApiError as exc:
            self.record(call, raw, started, t0, exc.status, error=exc.message, endpoint=endpoint)
            raise
        except ClientDisconnected:
            self.record(call, raw, started, t0, 499, error="client disconnected", endpoint=endpoint)
            raise
        finally:
            if cleanup is not None:
                with anyio.CancelScope(shield=True):
                    await cleanup()
        if isinstance(reply, Failure):
            self.record(call, raw, started, t0, reply.status, error=reply.message, endpoint=endpoint)
            raise failure_error(reply)
        if not isinstance(reply, expected):
            raise ApiError(500, f"unexpected reply from node: {type(reply).__name__}")
        return call, reply

    async def _text(self, request: Request, capability: str, kind: type) -> Response:
        started, t0 = time.time(), time.perf_counter()
        raw = await request.body()
        try:
            body = parse_body(raw, kind)
            if capability == subjects.CHAT and has_image_parts(body):
                capability = subjects.VISION  # only nodes with a vision model subscribe there
            await self.resolve(body.model, capability)
        except ApiError as exc:
            self.refused(capability, raw, started, t0, exc)
            raise
        chat = capability in (subjects.CHAT, subjects.VISION)
        created = int(started)
        call = self.dispatcher.call(capability, body.model, body, stream=body.stream)
        cid = ("chatcmpl-" if chat else "cmpl-") + call.request_id
        make = formatting.chat_completion if chat else formatting.text_completion
        await call.__aenter__()
        try:
            async with abandon_on_disconnect(request, call):
                first = await call.next()
        except ApiError as exc:
            await call.__aexit__(None, None, None)
            self.record(call, raw, started, t0, exc.status, error=exc.message)
            raise
        except ClientDisconnected:
            await call.__aexit__(None, None, None)
            self.record(call, raw, started, t0, 499, error="client disconnected")
            raise
        except BaseException:
            await call.__aexit__(None, None, None)
            raise
        if isinstance(first, Failure):
            await call.__aexit__(None, None, None)
            self.record(call, raw, started, t0, first.status, error=first.message)
            raise failure_error(first)

        if not body.stream:
            await call.__aexit__(None, None, None)
            if not isinstance(first, TextDone):
                raise ApiError(500, f"unexpected reply from node: {type(first).__name__}")
            payload = make(cid, created, body.model, first.text, first.finish_reason, first.usage)
            self.record(call, raw, started, t0, 200, usage=first.usage, response=payload)
            return json_response(payload, headers=call_headers(call))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = formatting.ChunkWriter(chat, cid, created, body.model, include_usage)
        first_byte_ms = (time.perf_counter() - t0) * 1000
        return StreamingResponse(
            self._stream(call, first, writer, make, cid, created, body.model, raw, started, t0, first_byte_ms),
            media_type="text/event-stream",
            headers={**call_headers(call), "cache-control": "no-cache"},
        )

    async def _stream(
        self, call: Call, reply: Any, writer: formatting.ChunkWriter, make: Any, cid: str, created: int,
        model: str, raw: bytes, started: float, t0: float, first_byte_ms: float,
    ) -> AsyncIterator[bytes]:
        parts: list[str] = []
        status, error, usage, finish = 200, None, Usage(), "stop"
        try:
            yield writer.opening()
            while True:
                if isinstance(reply, Accepted):
                    pass
                elif isinstance(reply, TextDelta):
                    parts.append(reply.text)
                    yield writer.delta(reply.text)
                elif isinstance(reply, TextDone):
                    usage, finish = reply.usage, reply.finish_reason
                    yield writer.closing(finish, usage)
                    return
                elif isinstance(reply, Failure):
                    status, error = reply.status, reply.message
                    yield formatting.sse(failure_error(reply).body()) + formatting.SSE_DONE
                    return
                try:
                    reply = await call.next()
                except ApiError as exc:  # the node died mid-stream: say so, never truncate silently
                    status, error = exc.status, exc.message
                    yield formatting.sse(exc.body()) + formatting.SSE_DONE
                    return
        finally:
            if not call.finished and error is None:
                status, error = 499, "client disconnected"
            # Starlette cancels this generator when the client leaves; anyio would cancel every
            # await here too, so shield the clean-up that tells the node to stop.
            with anyio.CancelScope(shield=True):
                await call.__aexit__(None, None, None)
            response = make(cid, created, model, "".join(parts), finish, usage)
            self.record(call, raw, started, t0, status, usage=usage, response=response, stream=True,
                         error=error, first_byte_ms=first_byte_ms)

    def refused(self, capability: str, raw: bytes, started: float, t0: float, exc: ApiError,
                 endpoint: str | None = None) -> None:
        """History of a request refused before any node saw it (bad input, unknown model...).

        ``raw``: the JSON body (a multipart request passes a JSON summary of its fields)."""
        parsed = _parsed_json(raw)
        model = parsed.get("model") if isinstance(parsed, dict) else None
        if name_error(model):  # absent, or not one a history subject can hold
            model = None
        self.history.append(
            HistoryRecord(
                id=uuid.uuid4().hex, capability=capability, endpoint=endpoint or ENDPOINTS[capability],
                model=model if isinstance(model, str) and model else "-", status_code=exc.status,
                started_at=started, duration_ms=(time.perf_counter() - t0) * 1000, error=exc.message,
                request=msgspec.Raw(raw if parsed is not None else b"null"),
            )
        )

    def record(
        self, call: Call, raw: bytes, started: float, t0: float, status: int, *, usage: Usage | None = None,
        response: Any = None, stream: bool = False, error: str | None = None, first_byte_ms: float | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.history.append(
            HistoryRecord(
                id=call.request_id,
                capability=call.capability,
                endpoint=endpoint or ENDPOINTS[call.capability],
                model=call.model,
                status_code=status,
                started_at=started,
                duration_ms=(time.perf_counter() - t0) * 1000,
                stream=stream,
                node_id=call.node_id,
                first_byte_ms=first_byte_ms,
                usage=usage,
                error=error,
                request=msgspec.Raw(raw),
                response=response,
            )
        )
