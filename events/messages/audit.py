"""The audit log: one record per administrative action (the AUDIT stream)."""

from __future__ import annotations

from msgspec import Struct, field

from .base import SCHEMA_VERSION


class AuditRecord(Struct, kw_only=True, omit_defaults=True):
    """Who did what, when, and what came of it. Never a secret and never a request body: a
    record names the key by its id, a user by name, and the target of the action by its name."""

    id: str  # unique; also the record's Nats-Msg-Id, so a retried write is stored once
    at: float  # when it ended (Unix time)
    component: str  # who recorded it: gateway, registry, cli
    actor: str  # key id, "user:<name>", "nats" (an operator over NATS), "anonymous", "local" (keys off)
    action: str  # noun.verb: model.register, key.revoke, node.drain, user.login...
    status: int  # HTTP status, or the status of the admin answer
    target: str | None = None  # the model, node, key or user acted on
    code: str | None = None  # the error code of a refusal (insufficient_scope, model_not_found...)
    method: str | None = None  # HTTP method and path, when it came over HTTP
    path: str | None = None
    request_id: str | None = None  # shared by the gateway's record and the registry's of one request
    duration_ms: float | None = None
    detail: dict[str, str | int | list[str] | None] = field(default_factory=dict)  # a few named facts
    schema: int = SCHEMA_VERSION
