"""Auditing every administrative HTTP request: who, what, when, and how it ended.

:class:`AuditMiddleware` is plain ASGI and sits outside the auth middleware, so it sees every
answer, the 401s and 403s of refused callers included. Once the response is sent it appends
one record to the AUDIT stream (:class:`broker.audit.AuditLog`, in the background: a slow or
absent JetStream never delays or fails the request). Reads and inference pass straight through.

What the record says:

- action: from the method and path, through :data:`ACTIONS` (one line per admin route); any
  other state-changing ``/v0`` request is ``http.<method>`` with its path as the target;
- actor: ``scope["state"]["audit_actor"]`` when a route set one (a login names the user it
  tried), else the id of the key (or session principal) auth left in the scope, else for a
  refused request the key its bearer token names, else ``anonymous`` (``local`` with keys off);
- target: the path's name (model, node, key, user), or what the route noted with :func:`note`;
- result: the HTTP status and, for an error, its OpenAI ``code``.

Bodies, tokens and secrets are never read into a record. The gateway's admin requests to the
registry carry the actor and the request id (:func:`nats_headers`), so the registry's own record
of the same action (it audits what reaches it over NATS) names the same caller.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable
from contextvars import ContextVar
from typing import Any

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.audit import AuditLog
from events import subjects

from .auth import KeyRing, _token, key_of

# (method, path template, action). ``{target}`` is what the action is done to; it may hold "/".
ACTIONS: tuple[tuple[str, str, str], ...] = (
    ("POST", "/v0/models/register", "model.register"),
    ("POST", "/v0/models/{target}/download", "model.download"),
    ("DELETE", "/v0/models/{target}", "model.delete"),
    ("DELETE", "/v1/models/{target}", "model.delete"),
    ("POST", "/v0/nodes/{target}/drain", "node.drain"),
    ("POST", "/v0/nodes/{target}/resume", "node.resume"),
    ("POST", "/v0/keys", "key.create"),
    ("DELETE", "/v0/keys/{target}", "key.revoke"),
    ("POST", "/v0/auth/login", "user.login"),
    ("POST", "/v0/auth/logout", "user.logout"),
    ("POST", "/v0/auth/password", "user.password"),
    ("POST", "/v0/users", "user.create"),
    ("PUT", "/v0/users/{target}/password", "user.password_reset"),
    ("DELETE", "/v0/users/{target}", "user.delete"),
)
READS = frozenset(("GET", "HEAD", "OPTIONS"))
INFERENCE_PATHS = ("/v1/responses/",)  # deleting one's own stored response is not administration
# What routes may leave in scope["state"] for the record (other helpers' routes too).
ACTOR, TARGET, DETAIL = "audit_actor", "audit_target", "audit_detail"


def _compile(actions: tuple[tuple[str, str, str], ...]) -> dict[str, list[tuple[re.Pattern, str]]]:
    table: dict[str, list[tuple[re.Pattern, str]]] = {}
    for method, template, action in actions:
        pattern = re.escape(template).replace(re.escape("{target}"), "(?P<target>.+)")
        table.setdefault(method, []).append((re.compile(pattern + "$"), action))
    return table


_TABLE = _compile(ACTIONS)


def action_of(method: str, path: str) -> tuple[str, str | None] | None:
    """``(action, target)`` of an administrative request; None for reads and inference."""
    if method in READS or (method == "POST" and path.startswith("/v1/")) or path.startswith(INFERENCE_PATHS):
        return None
    for pattern, action in _TABLE.get(method, ()):
        match = pattern.match(path)
        if match:
            return action, match.groupdict().get("target")
    if path.startswith(("/v0/", "/v1/")):
        return "http." + method.lower(), path
    return None


def note(scope: Scope, *, target: str | None = None, **detail: Any) -> None:
    """For a route: the target its record names (e.g. the key it created) and a few facts, never secrets."""
    state = scope.setdefault("state", {})
    if target is not None:
        state[TARGET] = target
    if detail:
        state.setdefault(DETAIL, {}).update(detail)


# The audited request being served, for the admin requests its route sends on NATS.
_CURRENT: ContextVar[tuple[Scope, str, str] | None] = ContextVar("audited_request", default=None)


def actor_of(scope: Scope, fallback: str) -> str:
    state = scope.get("state")
    if state:
        actor = state.get(ACTOR)
        if actor:
            return actor
    key = key_of(scope)
    return key.id if key is not None else fallback


def nats_headers() -> dict[str, str]:
    """Headers for an admin request to the registry: who asked and which request it is. Outside
    an audited HTTP request (a download started on demand by an inference request) the actor is
    the gateway itself."""
    current = _CURRENT.get()
    if current is None:
        return {subjects.ACTOR_HEADER: "gateway"}
    scope, request_id, fallback = current
    return {subjects.ACTOR_HEADER: actor_of(scope, fallback), subjects.REQUEST_ID_HEADER: request_id}


class _ErrorCode(msgspec.Struct):
    code: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorCode


_decode_error = msgspec.json.Decoder(_ErrorBody).decode


def error_code(body: bytes) -> str | None:
    try:
        return _decode_error(body).error.code
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class AuditMiddleware:
    """Records every administrative request once its response is sent; ``ring`` is None with keys off."""

    def __init__(self, app: ASGIApp, log: AuditLog, ring: KeyRing | None) -> None:
        self.app = app
        self.log = log
        self.ring = ring
        self.fallback = "anonymous" if ring is not None else "local"

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine for what is not an admin action (inference, reads): no frame of ours."""
        found = action_of(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if found is None:
            return self.app(scope, receive, send)
        return self._audited(scope, receive, send, *found)

    async def _audited(self, scope: Scope, receive: Receive, send: Send, action: str, target: str | None) -> None:
        request_id = uuid.uuid4().hex
        t0 = time.perf_counter()
        outcome: dict[str, Any] = {"status": 500, "code": None}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
            elif message["type"] == "http.response.body" and outcome["status"] >= 400 and outcome["code"] is None:
                outcome["code"] = error_code(message.get("body", b"")) or ""
            await send(message)

        token = _CURRENT.set((scope, request_id, self.fallback))
        try:
            await self.app(scope, receive, watch)
        finally:
            _CURRENT.reset(token)
            self._record(scope, action, target, outcome, request_id, (time.perf_counter() - t0) * 1000)

    def _record(
        self, scope: Scope, action: str, target: str | None, outcome: dict, request_id: str, duration_ms: float
    ) -> None:
        status = outcome["status"]
        actor = actor_of(scope, self.fallback)
        if actor == self.fallback and status in (401, 403) and self.ring is not None:
            token = _token(scope)  # refused: the key it named, when it names one (expired, lacking a scope)
            key = self.ring.check(token) if token else None
            actor = key.id if key is not None else actor
        state = scope.get("state") or {}
        self.log.record(
            actor,
            action,
            status,
            target=state.get(TARGET, target),
            code=outcome["code"] or None,
            method=scope["method"],
            path=scope["path"][:512],
            request_id=request_id,
            duration_ms=round(duration_ms, 3),
            detail=state.get(DETAIL, {}),
        )
