"""Names and settings of every JetStream stream, KV bucket and object store.

``broker.provision`` creates exactly these, idempotently. Every stream is bounded by age
and bytes so that a long-running deployment never fills its disk.
"""

from __future__ import annotations

from typing import Any

from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType, StreamConfig

from . import subjects
from .tokens import encode_token

DAY = 24 * 3600.0
GiB = 1024**3
MiB = 1024**2

# Node presence: heartbeat every HEARTBEAT_INTERVAL_S, gone after NODE_TTL_S without one.
HEARTBEAT_INTERVAL_S = 2.0
NODE_TTL_S = 10.0
# A node's durable registry consumer outlives restarts, but not a node retired for a month.
NODE_CONSUMER_RETENTION_S = 30 * 24 * 3600.0

REGISTRY_EVENTS = "REGISTRY_EVENTS"
PLACEMENTS = "PLACEMENTS"
HISTORY = "HISTORY"
LOGS = "LOGS"
AUDIT = "AUDIT"

KV_MODELS = "models"
KV_NODES = "nodes"
KV_DOWNLOADS = "downloads"
KV_SETTINGS = "settings"
KV_KEYS = "keys"  # API keys, by id: digests only (nodes get no access to it)
KV_LEASES = "leases"
# A download lease lives this long unless its holder renews it (every third of it).
LEASE_TTL_S = 15.0
# Dashboard users by name (``user_key``): argon2id hashes, never a password. Also the secret that
# signs session tokens, under a key no username encodes to; nodes get no access to either bucket.
KV_USERS = "users"
KV_SESSIONS = "sessions"  # dashboard sessions by id; a session lives SESSION_TTL_S and no longer
# GET /v0/history/{id}: a record's HISTORY sequence by its id, kept as long as the records are.
KV_HISTORY_IDS = "history-ids"
HISTORY_MAX_AGE_S = 7 * DAY
SESSION_TTL_S = 7 * DAY
SESSION_SECRET_KEY = "session.secret"  # a '.': never the encoding of a name (events.tokens escapes it)
# Token and cost counters per UTC day, provider, model and API key (gateway/usage.py): kept 100
# days, so this month, last month and the weeks between can always be added up from days.
KV_USAGE = "usage"
USAGE_TTL_S = 100 * DAY
# Stored Responses API answers (GET /v1/responses/{id}, previous_response_id), each with the whole
# conversation that led to it, so a value is bounded (a default NATS server's max_payload is 1 MiB).
KV_RESPONSES = "responses"
RESPONSE_TTL_S = 30 * DAY
RESPONSE_MAX_BYTES = 1000 * 1024
OBJ_MODEL_BLOBS = "model-blobs"
# Claim-check payloads (uploads, generated images and audio) too big for one NATS message.
# Consumers delete what they read; the TTL removes whatever a crash or a ``url`` answer left.
OBJ_PAYLOADS = "payloads"
PAYLOAD_TTL_S = 3600.0


def _stream(name: str, subject: str, max_age: float, max_bytes: int, description: str, **limits: Any) -> StreamConfig:
    """A stream of one subject tree, on disk and, like every stream, bounded by age and bytes."""
    return StreamConfig(
        name=name,
        description=description,
        subjects=[subject],
        max_age=max_age,
        max_bytes=max_bytes,
        storage=StorageType.FILE,
        **limits,
    )


# name, subjects, max age, max bytes, description; then any other bound.
STREAMS: tuple[StreamConfig, ...] = (
    _stream(REGISTRY_EVENTS, subjects.REGISTRY_EVENTS_ALL, 30 * DAY, 256 * MiB,
            "model added/updated/deleted events; nodes replay what they missed", max_msgs=100_000),
    _stream(PLACEMENTS, subjects.PLACEMENT_ALL, 7 * DAY, 64 * MiB,
            "placement decisions: which nodes load which model (the last 100 per model)", max_msgs_per_subject=100),
    _stream(HISTORY, subjects.HISTORY_ALL, HISTORY_MAX_AGE_S, 2 * GiB, "one record per API request (7 days)"),
    _stream(LOGS, subjects.LOGS_ALL, 3 * DAY, 512 * MiB, "structured logs of every component"),
    _stream(AUDIT, subjects.AUDIT_ALL, 90 * DAY, 1 * GiB, "admin actions: who, what, when, result (90 days)",
            # Per (component, action, actor): a flood of refused anonymous attempts evicts only its
            # own older records, never the actions of real keys and users.
            max_msgs_per_subject=100_000,
            allow_direct=True),  # GET /v0/audit pages it with batched direct gets
)  # fmt: skip

KEY_VALUES: tuple[KeyValueConfig, ...] = (
    KeyValueConfig(bucket=KV_MODELS, description="model registrations, written by the registry", history=5),
    KeyValueConfig(bucket=KV_NODES, description="last heartbeat of each live node", ttl=NODE_TTL_S),
    KeyValueConfig(bucket=KV_DOWNLOADS, description="download tasks and progress", ttl=7 * DAY),
    # Its description predates the keys bucket; kept, since a changed config fails older components' provisioning.
    KeyValueConfig(bucket=KV_SETTINGS, description="users, hashed API keys and settings", history=5),
    KeyValueConfig(bucket=KV_KEYS, description="API keys: SHA-256 digests, scopes, models, expiry", history=1),
    KeyValueConfig(bucket=KV_LEASES, description="who downloads a model into a shared models dir", ttl=LEASE_TTL_S),
    KeyValueConfig(
        bucket=KV_USERS, description="dashboard users: argon2id hashes, roles; the session secret", history=1
    ),
    KeyValueConfig(
        bucket=KV_SESSIONS,
        description="dashboard sessions: user and expiry, never the token",
        ttl=SESSION_TTL_S,
        history=1,
    ),
    KeyValueConfig(
        bucket=KV_HISTORY_IDS,
        description="HISTORY sequence of each request id, for GET /v0/history/{id}",
        ttl=HISTORY_MAX_AGE_S,
        max_bytes=256 * MiB,
        history=1,
    ),
    KeyValueConfig(
        bucket=KV_USAGE,
        description="tokens and cost per UTC day, provider, model and API key",
        ttl=USAGE_TTL_S,
        history=1,
    ),
    KeyValueConfig(
        bucket=KV_RESPONSES,
        description="stored Responses API answers and their conversations (30 days)",
        ttl=RESPONSE_TTL_S,
        max_value_size=RESPONSE_MAX_BYTES,
        max_bytes=2 * GiB,
        history=1,
    ),
)

OBJECT_STORES: tuple[ObjectStoreConfig, ...] = (
    ObjectStoreConfig(bucket=OBJ_MODEL_BLOBS, description="model files hosted by the registry"),
    ObjectStoreConfig(
        bucket=OBJ_PAYLOADS,
        description="temporary request/response payloads (claim checks)",
        ttl=PAYLOAD_TTL_S,
        max_bytes=8 * GiB,
    ),
)


def download_key(node_id: str, model: str) -> str:
    """``downloads`` bucket key of a node's latest progress report on a model."""
    return f"progress.{encode_token(node_id)}.{encode_token(model)}"


def user_key(name: str) -> str:
    """``users`` bucket key of a user (names checked by ``events.tokens.username_error`` first)."""
    return encode_token(name)


def usage_key(day: str, provider: str, model: str, key_id: str | None) -> str:
    """``usage`` bucket key of one day's counters (``day``: ``YYYY-MM-DD``; no key: ``-``)."""
    return f"{day}.{encode_token(provider)}.{encode_token(model)}.{encode_token(key_id) if key_id else '-'}"


def response_key(response_id: str) -> str:
    """``responses`` bucket key of a stored response (ids are checked by the route first)."""
    return encode_token(response_id)


def download_task_key(task_id: str) -> str:
    return f"task.{encode_token(task_id)}"
