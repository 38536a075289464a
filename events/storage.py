"""Names and settings of every JetStream stream, KV bucket and object store.

``broker.provision`` creates exactly these, idempotently. Every stream is bounded by age
and bytes so that a long-running deployment never fills its disk.
"""

from __future__ import annotations

from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType, StreamConfig

from . import subjects

DAY = 24 * 3600.0
GiB = 1024**3
MiB = 1024**2

# Node presence: heartbeat every HEARTBEAT_INTERVAL_S, gone after NODE_TTL_S without one.
HEARTBEAT_INTERVAL_S = 2.0
NODE_TTL_S = 10.0
# A node's durable registry consumer outlives restarts, but not a node retired for a month.
NODE_CONSUMER_RETENTION_S = 30 * 24 * 3600.0

REGISTRY_EVENTS = "REGISTRY_EVENTS"
HISTORY = "HISTORY"
LOGS = "LOGS"

KV_MODELS = "models"
KV_NODES = "nodes"
KV_DOWNLOADS = "downloads"
KV_SETTINGS = "settings"
OBJ_MODEL_BLOBS = "model-blobs"

STREAMS: tuple[StreamConfig, ...] = (
    StreamConfig(
        name=REGISTRY_EVENTS,
        description="model added/updated/deleted events; nodes replay what they missed",
        subjects=[subjects.REGISTRY_EVENTS_ALL],
        max_age=30 * DAY,
        max_msgs=100_000,
        max_bytes=256 * MiB,
        storage=StorageType.FILE,
    ),
    StreamConfig(
        name=HISTORY,
        description="one record per API request (7 days)",
        subjects=[subjects.HISTORY_ALL],
        max_age=7 * DAY,
        max_bytes=2 * GiB,
        storage=StorageType.FILE,
    ),
    StreamConfig(
        name=LOGS,
        description="structured logs of every component",
        subjects=[subjects.LOGS_ALL],
        max_age=3 * DAY,
        max_bytes=512 * MiB,
        storage=StorageType.FILE,
    ),
)

KEY_VALUES: tuple[KeyValueConfig, ...] = (
    KeyValueConfig(bucket=KV_MODELS, description="model registrations, written by the registry", history=5),
    KeyValueConfig(bucket=KV_NODES, description="last heartbeat of each live node", ttl=NODE_TTL_S),
    KeyValueConfig(bucket=KV_DOWNLOADS, description="download tasks and progress", ttl=7 * DAY),
    KeyValueConfig(bucket=KV_SETTINGS, description="users, hashed API keys and settings", history=5),
)

OBJECT_STORES: tuple[ObjectStoreConfig, ...] = (
    ObjectStoreConfig(bucket=OBJ_MODEL_BLOBS, description="model files hosted by the registry"),
)
