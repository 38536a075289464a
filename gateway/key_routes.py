"""``/v0/keys``: create (the secret is in this one answer), list and revoke API keys. Admin only."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from events.messages import ApiKey, CreateKey

from .audit import note
from .auth import KeyRing, key_of, new_key
from .errors import ApiError
from .http import json_response, parse_body


def view(key: ApiKey) -> dict:
    """A key as listings show it: never the digest, and a key without expiry says so."""
    return {
        "id": key.id,
        "object": "api_key",
        "name": key.name,
        "scopes": key.scopes,
        "models": key.models,
        "created_at": int(key.created_at),
        "expires_at": int(key.expires_at) if key.expires_at else None,
        "never_expires": key.expires_at is None,
        "expired": bool(key.expires_at and key.expires_at <= time.time()),
        "requests_per_minute": key.requests_per_minute,
        "tokens_per_minute": key.tokens_per_minute,
    }


class KeyRoutes:
    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    async def create(self, request: Request) -> Response:
        body: CreateKey = parse_body(await request.body(), CreateKey)
        if not body.name.strip():
            raise ApiError(400, "A key needs a name.", param="name")
        if not body.scopes:
            raise ApiError(400, "A key needs at least one scope: inference, read or admin.", param="scopes")
        secret, key = new_key(
            body.name.strip(),
            list(body.scopes),
            body.models,
            body.expires_in_days,
            requests_per_minute=body.requests_per_minute,
            tokens_per_minute=body.tokens_per_minute,
        )
        await self.ring.add(key)
        note(request.scope, target=key.id, name=key.name, scopes=list(key.scopes))  # for the audit record: no secret
        creator = key_of(request.scope)
        return json_response({**view(key), "key": secret, "created_by": creator.id if creator else None}, 201)

    async def list(self, request: Request) -> Response:
        return json_response({"object": "list", "data": [view(k) for k in self.ring.listing()]})

    async def revoke(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        if not await self.ring.remove(key_id):
            raise ApiError(404, f"No API key {key_id!r}.", code="key_not_found")
        return json_response({"id": key_id, "object": "api_key", "deleted": True})
