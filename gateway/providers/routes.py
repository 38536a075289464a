"""Serving one request from a cloud provider, through the same Exchange as a local request.

The Exchange has already read the body, checked the key (its model limits included) and
resolved the model; here the provider is called instead of dispatching to a node, and the
Exchange records the request in history exactly once, whatever ends it, with the provider's
name and tokens (the usage meter adds the cost). A :class:`CloudCall` stands where a node call
would: no slot, no queue, no failover (SPEC-4b6e9f2a: no fallback to another provider or to a
local model).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec
from starlette.responses import Response

from events import subjects

from ..disconnect import abandon_on_disconnect
from ..dispatch import ClientDisconnected, new_request_id
from ..errors import ApiError
from ..exchange import Exchange
from .answers import Stream
from .base import Provider

ID_PREFIXES = {subjects.CHAT: "chatcmpl-", subjects.COMPLETION: "cmpl-", subjects.EMBEDDING: ""}


class CloudCall:
    """The Exchange's call for a request a provider answers; ``provider`` goes into history."""

    node_id = None
    waited_ms = 0.0

    def __init__(self, provider: str, model: str) -> None:
        self.request_id = new_request_id()
        self.provider = provider
        self.model = model
        self.closed = False
        self.finished = False
        self.abandoned = False
        self.on_close: Any = None  # ends the provider's response (a stream)
        self._task = asyncio.current_task()

    def abandon(self) -> None:
        """The client left while waiting for a whole answer: stop waiting for the provider."""
        self.abandoned = True
        if self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        if self.release_all():
            await self.cancel_on_node()

    def release_all(self) -> bool:
        """As ``Call.release_all``: closed (once); True when a provider response is still open."""
        if self.closed:
            return False
        self.closed = True
        return self.on_close is not None

    async def cancel_on_node(self) -> None:
        """End the provider's response (a stream): what a node's cancel is to a local call."""
        await self.on_close()


class Meta(msgspec.Struct):
    """What a provider needs to build an answer in OpenAI's shape itself (Anthropic)."""

    cid: str
    created: int
    model: str  # as the client named it, prefix included


async def serve(exchange: Exchange, body: Any, provider: Provider, model: str) -> Response:
    """Answer ``body`` (already accepted) from ``provider``'s ``model``."""
    from ..openai_routes import CallStream  # the stream that frees its call however it ends

    call = CloudCall(provider.name, body.model)
    exchange.call = call  # type: ignore[assignment]  # a call without node: see CloudCall
    payload = msgspec.json.decode(exchange.raw)  # every field the client sent, ours to pass on
    payload["model"] = model
    capability = subjects.CHAT if exchange.capability == subjects.VISION else exchange.capability
    meta = Meta(ID_PREFIXES[capability] + call.request_id, int(exchange.started), body.model)
    headers = {**exchange.headers(), "x-provider": provider.name}
    stream = bool(getattr(body, "stream", False))
    try:
        if not stream:
            with abandon_on_disconnect(exchange.request, call):  # type: ignore[arg-type]
                answer = await provider.complete(capability, payload, meta)
        else:
            wants_usage = bool(body.stream_options and body.stream_options.include_usage)
            opened = await provider.stream(capability, payload, meta, client_wants_usage=wants_usage)
    except ApiError as exc:
        exchange.record(exc.status, error=exc.message)
        raise
    except asyncio.CancelledError:
        if not call.abandoned:
            raise
        asyncio.current_task().uncancel()
        exchange.record(499, error="client disconnected")
        raise ClientDisconnected() from None
    if not stream:
        call.finished = True
        exchange.record(200, usage=answer.usage, response=answer.record)
        return Response(answer.body, 200, headers, media_type="application/json")
    call.on_close = opened.close
    first_byte_ms = (time.perf_counter() - exchange.t0) * 1000
    return CallStream.sse(exchange, _relay(exchange, opened, body.model, first_byte_ms), headers)


async def _relay(exchange: Exchange, stream: Stream, model: str, first_byte_ms: float):
    """The provider's chunks as they come; the record once the stream ended, however it ended."""
    t = stream.transcript
    first_token_ms = None
    try:
        async with contextlib.aclosing(stream.chunks) as chunks:
            async for piece in chunks:
                if first_token_ms is None:  # the provider's first chunk
                    first_token_ms = (time.perf_counter() - exchange.t0) * 1000
                yield piece
    finally:
        exchange.call.finished = t.done  # type: ignore[union-attr]
        await exchange.close()  # shielded; ends the provider's response when the client left
        status, error = 200, None
        if t.error is not None:
            status, error = t.error
        elif not t.done:
            status, error = 499, "client disconnected"
        exchange.record(
            status,
            usage=t.usage,
            response=t.summary(model),
            stream=True,
            error=error,
            first_byte_ms=first_byte_ms,
            first_token_ms=first_token_ms,
        )
