"""HTTP helpers every route module shares: JSON responses and JSON bodies parsed into Structs."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from events import codec
from events.openai import Unsupported, validation_param

from .errors import ApiError


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(codec.encode(payload), status, headers, media_type="application/json")


async def read_body(request: Request) -> bytes:
    """The request body from the ASGI messages themselves: ``Request.body()`` reads them through
    an async generator, a few µs per request on the hot routes. ``request.body()`` still works
    afterwards (it returns what this read)."""
    chunks: list[bytes] = []
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = body  # noqa: SLF001 - Starlette's cache of the body, read by request.body()
    return body


def parse_body(raw: bytes, kind: type) -> Any:
    """``raw`` decoded into ``kind``, or a 400 naming the offending field."""
    if not raw.strip():
        raise ApiError(400, "The request body is empty; expected a JSON object.")
    try:
        return codec.decode(raw, kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"Invalid request: {exc}", param=validation_param(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from None
    except Unsupported as exc:  # a known field the router cannot honour: never dropped silently
        raise ApiError(400, str(exc), param=exc.param, code=exc.code) from None


def parsed_json(raw: bytes) -> Any:
    """The body as JSON, or None when it is not JSON (for recording refused requests)."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
