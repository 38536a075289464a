"""API keys: who may call the gateway, and for what.

A key is a random secret shown once (``sk-llmr-...``); the ``keys`` KV bucket keeps only its
SHA-256 digest, with a name, scopes (``inference`` for ``/v1``, ``read`` for ``/v0`` reads,
``admin`` for everything), the models it may use and an expiry. Every gateway mirrors the
bucket through a watcher, so checking a key on the request path is one hash and one dict lookup,
never a KV round trip, and a key deleted (revoked) on one gateway is refused on every gateway as
soon as the watcher delivers the deletion (milliseconds). SHA-256 and not a password hash: the
secret carries 256 random bits, there is nothing to guess, and the check runs on every request.

:class:`AuthMiddleware` is plain ASGI (no per-request task or Request object): it finds the
scope a path needs, checks the bearer token and leaves the key in ``scope["state"]["api_key"]``
for the routes (model limits, the key id in history). A bearer token without the key prefix is
a dashboard session (:mod:`gateway.sessions`); its principal is an ``ApiKey`` too, with
``id="user:<name>"`` and its role's scope, so everything that reads the key works unchanged.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.mirrors import BucketWatch
from events import codec, storage
from events.messages import ApiKey

from .errors import ApiError

log = structlog.get_logger("gateway.auth")

PREFIX = "sk-llmr-"
DAY = 86400.0
ADMIN_READS = ("/v0/keys", "/v0/users", "/v0/audit")  # /v0 paths whose reads need the admin scope


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(
    name: str,
    scopes: list[str],
    models: list[str],
    expires_in_days: int | None,
    *,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
) -> tuple[str, ApiKey]:
    """A new secret and its record (the only time the secret exists outside its holder)."""
    secret = PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    record = ApiKey(
        id="key_" + secrets.token_hex(6),
        name=name,
        digest=digest(secret),
        scopes=sorted(set(scopes)),
        models=sorted(set(models)),
        created_at=now,
        expires_at=now + expires_in_days * DAY if expires_in_days else None,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
    )
    return secret, record


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs; None for the open routes (health, the OpenAPI document)."""
    if path == "/metrics":
        return "read"  # a Prometheus scrape sends a read-only key (bearer token): docs/observability.md
    if path.startswith("/v1/"):
        # DELETE /v1/models/{model} removes a registration: administration, not inference; deleting
        # a stored response (one's own: gateway.responses_store) is not.
        if method in ("GET", "HEAD", "POST") or path.startswith("/v1/responses/"):
            return "inference"
        return "admin"
    if path.startswith("/v0/"):
        if path.startswith("/v0/auth/"):
            return None if path == "/v0/auth/login" else "read"  # login checks a password; the rest, a session
        if path.startswith(ADMIN_READS):
            return "admin"  # listing keys and users, reading the audit log: administration, not a read
        if path.startswith("/v0/files/") and method in ("GET", "HEAD"):
            return "inference"  # the `url` of an image answer, fetched by whoever asked for it
        return "read" if method in ("GET", "HEAD") else "admin"
    return None


def allows(key: ApiKey, scope: str) -> bool:
    return scope in key.scopes or "admin" in key.scopes


class KeyRing(BucketWatch, bucket=storage.KV_KEYS, record_type=ApiKey, record_kind="API key record"):
    """The ``keys`` bucket in memory, by digest, kept current by a watcher."""

    table_attrs = ("by_digest", "_ids")
    by_digest: dict[str, ApiKey]
    _ids: dict[str, str]  # key id -> digest, to drop a deleted key

    def _drop(self, entry: Any, tables: Any, live: bool) -> None:
        table, index = tables
        old = index.pop(entry.key, None)
        if old is not None:
            table.pop(old, None)

    def _put(self, entry: Any, key: ApiKey, tables: Any, live: bool) -> None:
        table, index = tables
        previous = index.get(key.id)
        if previous is not None and previous != key.digest:
            table.pop(previous, None)
        table[key.digest], index[key.id] = key, key.digest

    def check(self, token: str) -> ApiKey | None:
        """The key whose digest is the token's (the lookup is by digest: nothing to compare)."""
        return self.by_digest.get(digest(token))

    async def add(self, key: ApiKey) -> None:
        await self.kv.put(key.id, codec.encode(key))
        self.by_digest[key.digest], self._ids[key.id] = key, key.digest  # before the watcher says so

    async def remove(self, key_id: str) -> bool:
        digest_ = self._ids.get(key_id)
        if digest_ is None:
            return False
        await self.kv.delete(key_id)
        self._ids.pop(key_id, None)
        self.by_digest.pop(digest_, None)
        return True

    def listing(self) -> list[ApiKey]:
        return sorted(self.by_digest.values(), key=lambda k: k.created_at)


def _token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if kind.lower() == "bearer" and token.strip() else None
    return None


class AuthMiddleware:
    """401 without a valid, unexpired key; 403 without the scope the path needs."""

    def __init__(self, app: ASGIApp, ring: KeyRing, sessions: Any = None) -> None:
        """``sessions``: a :class:`gateway.sessions.Sessions`, for bearer tokens that are not keys."""
        self.app = app
        self.ring = ring
        self.sessions = sessions

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine: it returns the app's (or the refusal's), so that passing a request on
        adds no frame that every resume of the request's task goes through (see gateway/hot_routes.py)."""
        if scope["type"] == "http":
            needed = required_scope(scope["method"], scope["path"])
            if needed is not None:
                error = self._refusal(scope, needed)
                if error is not None:
                    return error.response()(scope, receive, send)
        return self.app(scope, receive, send)

    def _refusal(self, scope: Scope, needed: str) -> ApiError | None:
        token = _token(scope)
        if token is None:
            return ApiError(
                401,
                "Missing API key: send it as 'Authorization: Bearer sk-...'.",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        session = self.sessions is not None and not token.startswith(PREFIX)  # a dashboard session (JWT)
        key = self.sessions.check(token) if session else self.ring.check(token)
        if key is None:
            message, code = (
                ("Invalid API key or session.", "invalid_session")
                if session
                else ("Invalid API key.", "invalid_api_key")
            )
            return ApiError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})
        if key.expires_at is not None and key.expires_at <= time.time():
            return ApiError(401, f"API key {key.id} has expired.", code="expired_api_key")
        if not allows(key, needed):
            return ApiError(
                403, f"API key {key.id} lacks the '{needed}' scope this endpoint needs.", code="insufficient_scope"
            )
        scope.setdefault("state", {})["api_key"] = key
        return None


def key_of(scope: Scope) -> ApiKey | None:
    """The key that authorised this request (None with auth off)."""
    state = scope.get("state")
    return state.get("api_key") if state else None


def check_model(scope: Scope, model: str) -> None:
    """403 when the request's key is limited to other models."""
    key = key_of(scope)
    if key is not None and key.models and model not in key.models:
        raise ApiError(
            403, f"API key {key.id} may not use the model '{model}'.", param="model", code="model_not_allowed"
        )


async def admin_key(ring: KeyRing, path: Path) -> tuple[str, bool]:
    """The admin key kept in ``path`` (mode 0600), created when there is none or when the one
    there is no longer known (its store was lost): ``(secret, created)``. How ``llm-router up``
    works from a clean start with keys on."""
    if path.exists():
        secret = path.read_text().strip()
        if ring.check(secret) is not None:
            return secret, False
    secret, key = new_key("admin (llm-router up)", ["admin"], [], None)
    await ring.add(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    os.replace(tmp, path)
    return secret, True
