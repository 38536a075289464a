"""Stored Responses API answers, in the ``responses`` KV bucket (30 days, bounded values).

A stored response holds the response object (what ``GET /v1/responses/{id}`` returns) and the
conversation that led to it, so that ``previous_response_id`` continues a conversation in one
read, whatever the length of the chain behind it. Each response belongs to the key (or
dashboard user) that made it: another caller gets the same 404 as for an id that never existed,
unless it has the admin scope. With keys off there are no owners.
"""

from __future__ import annotations

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from starlette.types import Scope

from events import codec, storage
from events.responses import RESPONSE_ID, StoredResponse

from .auth import key_of
from .errors import ApiError

log = structlog.get_logger("gateway.responses")


def owner_of(scope: Scope) -> str | None:
    key = key_of(scope)
    return key.id if key is not None else None


def _may_read(stored: StoredResponse, scope: Scope) -> bool:
    key = key_of(scope)
    return key is None or stored.owner is None or stored.owner == key.id or "admin" in key.scopes


def _unavailable(exc: Exception) -> ApiError:
    return ApiError(
        503,
        f"The response store (NATS) did not answer: {type(exc).__name__}. Retry shortly.",
        code="broker_unavailable",
        headers={"Retry-After": "2"},
    )


class ResponseStore:
    def __init__(self) -> None:
        self.kv = None

    async def start(self, js: JetStreamContext) -> None:
        self.kv = await js.key_value(storage.KV_RESPONSES)

    async def get(self, response_id: str, scope: Scope, *, param: str | None = None) -> StoredResponse:
        """The stored response, or a 404 (``param``: the field that named it, if any)."""
        missing = ApiError(
            404,
            f"No stored response has the id '{response_id}' (it was made with store: false, deleted, expired "
            "after 30 days, or never existed).",
            param=param,
            code="previous_response_not_found" if param else "response_not_found",
        )
        if not RESPONSE_ID.fullmatch(response_id):
            raise missing
        try:
            entry = await self.kv.get(storage.response_key(response_id))
        except KeyNotFoundError:
            raise missing from None
        except nats.errors.Error as exc:
            raise _unavailable(exc) from None
        stored = codec.decode(entry.value, StoredResponse)
        if not _may_read(stored, scope):
            raise missing
        return stored

    async def put(self, response_id: str, stored: StoredResponse) -> bool:
        """Store a response; False (and a warning in the log) when it is too large or the bucket
        refused it (full, or NATS away): the answer then says ``store: false``."""
        value = codec.encode(stored)
        if len(value) > storage.RESPONSE_MAX_BYTES:
            log.warning("response too large to store", id=response_id, bytes=len(value))
            return False
        try:
            await self.kv.put(storage.response_key(response_id), value)
        except nats.errors.Error as exc:
            log.error("response not stored", id=response_id, error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    async def delete(self, response_id: str, scope: Scope) -> None:
        await self.get(response_id, scope)  # 404 unless it is there and the caller's
        try:
            await self.kv.purge(storage.response_key(response_id))  # every revision: the bytes go now
        except nats.errors.Error as exc:
            raise _unavailable(exc) from None
