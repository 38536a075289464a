"""The OpenAI Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A Responses request becomes the chat request it is in other words (events.responses.chat_body)
and takes the chat path through an :class:`~gateway.exchange.Exchange`: the key's model list,
``resolve``, dispatch on the chat capability (vision when the input has images), the history
record once. The answer is formatted as a response object or its typed events
(gateway.responses_output) and, unless ``store`` is false, stored with its conversation
(gateway.responses_store) for ``GET`` and ``previous_response_id``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from events import codec, storage, subjects
from events.messages import TextDelta, TextDone, Usage
from events.openai import ChatCompletionBody, Unsupported, has_image_parts
from events.responses import InputItem, ResponsesBody, StoredResponse, chat_body, output_items

from .errors import ApiError
from .exchange import Exchange
from .http import json_response
from .openai_routes import CallStream, OpenAIRoutes
from .responses_output import Envelope, EventWriter, new_id
from .responses_store import ResponseStore, owner_of

ENDPOINT = "/v1/responses"
# The Responses field behind each chat field that shapes an answer (ChatCompletionBody.shaping_field).
SHAPING_FIELDS = {"response_format": "text", "logprobs": "include"}


class ResponsesRoutes:
    def __init__(self, api: OpenAIRoutes, store: ResponseStore) -> None:
        """``api``: the chat routes, whose resolve, dispatcher and history this shares."""
        self.api = api
        self.store = store

    # ------------------------------------------------------------ POST /v1/responses

    async def create(self, request: Request) -> Response:
        exchange = Exchange(request, self.api.history, subjects.CHAT, ENDPOINT)
        body: ResponsesBody = await exchange.accept(ResponsesBody, self.api.resolve)
        try:
            self._check_local(body.model)
            conversation = await self._conversation(request, body)
            try:
                chat = chat_body(body, conversation)
            except Unsupported as exc:
                raise ApiError(400, str(exc), param=exc.param, code=exc.code) from None
            if has_image_parts(chat):
                self._check_vision(body.model, chat)
                exchange.capability = subjects.VISION
                await self.api.resolve(body.model, subjects.VISION)
        except ApiError as exc:
            exchange.record(exc.status, error=exc.message)
            raise
        envelope = Envelope(new_id("resp"), body)
        owner = owner_of(request.scope)
        if body.stream:
            return await self._streamed(exchange, chat, envelope, conversation, owner)
        return await self._whole(exchange, chat, envelope, conversation, owner)

    def _check_local(self, model: str) -> None:
        """501 for a cloud provider's model: Responses are made from this router's own engines
        (the providers are reached through their chat completions)."""
        if self.api.cloud_of(model) is not None:
            raise ApiError(
                501,
                f"The Responses API is served by this router's own models; '{model}' is a cloud provider's model: "
                "use /v1/chat/completions for it.",
                type="invalid_request_error",
                param="model",
                code="responses_not_supported",
            )

    async def _conversation(self, request: Request, body: ResponsesBody) -> list[InputItem]:
        """Every item of the conversation: the previous response's (its input, then its output)
        and this request's input."""
        earlier: list[InputItem] = []
        if body.previous_response_id is not None:
            previous = await self.store.get(body.previous_response_id, request.scope, param="previous_response_id")
            earlier = [*previous.input, *output_items(previous.response)]
        conversation = [*earlier, *body.items]
        if body.store:
            size = len(codec.encode(conversation))
            if size > storage.RESPONSE_MAX_BYTES:
                raise ApiError(
                    400,
                    f"The conversation is {size} bytes, more than a stored response may hold "
                    f"({storage.RESPONSE_MAX_BYTES}): send 'store': false, or start a shorter conversation.",
                    param="store",
                    code="conversation_too_large",
                )
        return conversation

    def _check_vision(self, model: str, chat: ChatCompletionBody) -> None:
        """Input with images goes to the vision capability (llama.cpp's LLaVA handler: no tools,
        grammars or logprobs), on a model that has it."""
        field = chat.shaping_field
        if field is not None:
            name = SHAPING_FIELDS.get(field, field)
            raise ApiError(
                400,
                f"'{name}' is not supported with image input (docs/openai.md lists what each engine offers).",
                param=name,
                code="unsupported_parameter",
            )
        record = self.api.catalog.get(model)
        if record is not None and subjects.VISION not in record.capabilities:
            raise ApiError(
                400,
                f"Model '{model}' does not accept images: the input has input_image parts, which need a model "
                f"with the vision capability (it supports: {', '.join(record.capabilities)}).",
                param="input",
                code="unsupported_capability",
            )

    async def _store(
        self, envelope: Envelope, conversation: list[InputItem], owner: str | None, response: dict
    ) -> tuple[bool, bytes]:
        """Store ``response`` (shielded: a client that leaves must not leave it half done); its
        encoding as answered, ``store`` false when it could not be kept."""
        encoded = codec.encode(response)
        with anyio.CancelScope(shield=True):
            stored = await self.store.put(
                envelope.id, StoredResponse(owner=owner, input=conversation, response=msgspec.Raw(encoded))
            )
        if not stored:
            response["store"] = False
            encoded = codec.encode(response)
        return stored, encoded

    async def _whole(
        self, exchange: Exchange, chat: Any, envelope: Envelope, conversation: list[InputItem], owner: str | None
    ) -> Response:
        reply = await self.api.final_reply(exchange, chat, TextDone)
        response = envelope.whole(reply.text, reply.finish_reason, reply.usage, reply.choices)
        if envelope.body.store:
            _, encoded = await self._store(envelope, conversation, owner, response)
        else:
            encoded = codec.encode(response)
        exchange.record(200, usage=reply.usage, response=msgspec.Raw(encoded))
        return Response(encoded, 200, exchange.headers(), media_type="application/json")

    async def _streamed(
        self, exchange: Exchange, chat: Any, envelope: Envelope, conversation: list[InputItem], owner: str | None
    ) -> Response:
        exchange.dispatch(self.api.dispatcher, chat, stream=True)
        try:
            first = await exchange.first_reply()
        except BaseException:
            await exchange.close()
            raise
        first_byte_ms = (time.perf_counter() - exchange.t0) * 1000
        events = self._events(exchange, first, EventWriter(envelope), conversation, owner, first_byte_ms)
        return CallStream.sse(exchange, events)

    async def _events(
        self,
        exchange: Exchange,
        first: Any,
        writer: EventWriter,
        conversation: list[InputItem],
        owner: str | None,
        first_byte_ms: float,
    ) -> AsyncIterator[bytes]:
        """The typed events from the first reply on; the final response is stored before the
        event that ends the stream, so a client that reads it can continue from it at once."""
        call = exchange.call
        assert call is not None
        status, error, usage = 200, None, None
        final: dict | None = None
        try:
            yield writer.opening()
            async for reply in self.api.stream_replies(exchange, first):
                if isinstance(reply, TextDelta):
                    yield writer.delta(reply)
                elif isinstance(reply, TextDone):
                    usage = reply.usage
                    out, final = writer.closing(reply.finish_reason, reply.usage)
                    if writer.envelope.body.store:
                        await self._store(writer.envelope, conversation, owner, final)
                    yield out + writer.final(final)
                else:  # the node failed, or died mid-stream: say so, never end silently
                    status, error = reply.status, reply.message
                    out, final = writer.failed(reply)
                    yield out
        finally:
            if not call.finished and error is None:
                status, error = 499, "client disconnected"
            await exchange.close()
            exchange.record(
                status,
                usage=usage or Usage(),
                response=final or writer.partial(),
                stream=True,
                error=error,
                first_byte_ms=first_byte_ms,
            )

    # ------------------------------------------------------------ GET, DELETE /v1/responses/{id}

    async def get(self, request: Request) -> Response:
        if request.query_params.get("stream", "false").lower() not in ("false", "0", ""):
            raise ApiError(
                400,
                "Replaying a stored response as a stream is not supported (it is for background responses).",
                param="stream",
                code="unsupported_parameter",
            )
        stored = await self.store.get(request.path_params["response_id"], request.scope)
        return Response(bytes(stored.response), 200, media_type="application/json")

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        await self.store.delete(response_id, request.scope)
        return json_response({"id": response_id, "object": "response", "deleted": True})
