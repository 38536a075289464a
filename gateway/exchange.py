"""One HTTP request on an inference endpoint, from its body to its history record.

Every endpoint goes through the same steps: read and check the body, resolve the model,
dispatch, wait for the answer while watching for the client leaving, format, record. The
Exchange holds what those steps share (the body, when it started, the capability, the call)
and records the request in history exactly once, whatever ends it: a refusal, an answer, a
failure, or a client that left (499).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from starlette.requests import Request

from events import name_error
from events.capabilities import CAPABILITIES
from events.messages import Failure, HistoryRecord, Reply, Usage

from .auth import check_model, key_of
from .disconnect import abandon_on_disconnect
from .dispatch import Call, ClientDisconnected, Dispatcher, DispatchError
from .errors import ApiError, api_error
from .history import HistoryWriter
from .http import parse_body, parsed_json, read_body
from .rate_limits import charge


def failure_error(failure: Failure) -> ApiError:
    return ApiError(failure.status, failure.message, type=failure.type, param=failure.param, code=failure.code)


class Exchange:
    __slots__ = ("request", "history", "capability", "endpoint", "started", "t0", "raw", "call", "recorded")

    def __init__(self, request: Request, history: HistoryWriter, capability: str, endpoint: str | None = None) -> None:
        self.request = request
        self.history = history
        self.capability = capability
        self.endpoint = endpoint or CAPABILITIES[capability].endpoint
        self.started = time.time()
        self.t0 = time.perf_counter()
        self.raw = b"null"  # the JSON body; a multipart request sets a JSON summary of its fields
        self.call: Call | None = None
        self.recorded = False

    # ------------------------------------------------------------ before dispatch

    async def accept(
        self,
        kind: type,
        resolve: Callable[[Any, str], Awaitable[None]],
        *,
        capability_of: Callable[[Any], str] | None = None,
    ) -> Any:
        """The JSON body as ``kind``, the key's model list checked, its model resolved for the
        capability (which ``capability_of`` may refine from the body); a refusal is recorded."""
        self.raw = await read_body(self.request)
        try:
            body = parse_body(self.raw, kind)
            if capability_of is not None:
                self.capability = capability_of(body)
            check_model(self.request.scope, body.model)
            await resolve(body.model, self.capability)
        except ApiError as exc:
            self.record(exc.status, error=exc.message)
            raise
        return body

    # ------------------------------------------------------------ dispatch

    def dispatch(self, dispatcher: Dispatcher, body: Any, *, stream: bool) -> Call:
        self.call = dispatcher.call(self.capability, body.model, body, stream=stream)
        return self.call

    async def first_reply(self) -> Reply:
        """The call's first reply, a node failure or dispatch error raised as an ApiError and
        recorded; the client leaving meanwhile abandons the call (recorded as 499)."""
        call = self.call
        assert call is not None
        try:
            with abandon_on_disconnect(self.request, call):
                reply = await call.next()
        except DispatchError as exc:
            error = api_error(exc)
            self.record(
                error.status, error="client disconnected" if isinstance(exc, ClientDisconnected) else error.message
            )
            if isinstance(exc, ClientDisconnected):
                raise
            raise error from None
        if isinstance(reply, Failure):
            self.record(reply.status, error=reply.message)
            raise failure_error(reply)
        return reply

    async def close(self) -> None:
        """Free the call's slot and stop its work on the node if unfinished; shielded, since a
        client that left cancels the task that runs this."""
        # A complete answer needs nothing awaited: no cancel scope on the common path.
        if self.call is not None and self.call.release_all():
            with anyio.CancelScope(shield=True):
                await self.call.cancel_on_node()

    # ------------------------------------------------------------ history

    def record(
        self,
        status: int,
        *,
        usage: Usage | None = None,
        response: Any = None,
        stream: bool = False,
        error: str | None = None,
        first_byte_ms: float | None = None,
    ) -> None:
        """The history record of this request; only the first call records anything."""
        if self.recorded:
            return
        self.recorded = True
        call = self.call
        if call is None:  # refused before any node saw it
            parsed = parsed_json(self.raw)
            model = parsed.get("model") if isinstance(parsed, dict) else None
            request = msgspec.Raw(self.raw if parsed is not None else b"null")
            record_id, node_id = uuid.uuid4().hex, None
            model = model if not name_error(model) else "-"  # absent, or not one a subject can hold
        else:
            request, record_id, node_id, model = msgspec.Raw(self.raw), call.request_id, call.node_id, call.model
        self.history.append(
            HistoryRecord(
                id=record_id,
                capability=self.capability,
                endpoint=self.endpoint,
                model=model,
                status_code=status,
                started_at=self.started,
                duration_ms=(time.perf_counter() - self.t0) * 1000,
                stream=stream,
                node_id=node_id,
                provider=call.provider if call is not None else None,
                key_id=key.id if (key := key_of(self.request.scope)) is not None else None,
                first_byte_ms=first_byte_ms,
                usage=usage,
                error=error,
                request=request,
                response=response,
            )
        )
        if usage is not None:
            charge(self.request.scope, usage)  # a key's token limit counts what it was answered

    def headers(self) -> dict[str, str]:
        """``x-request-id``, ``x-node-id``, and ``x-queue-wait-ms`` when the request waited."""
        call = self.call
        assert call is not None
        headers = {"x-request-id": call.request_id}
        if call.node_id:
            headers["x-node-id"] = call.node_id
        if call.waited_ms > 0:
            headers.update({"x-queue-status": "queued", "x-queue-wait-ms": str(round(call.waited_ms))})
        return headers
