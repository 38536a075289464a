"""Logs: one structlog record of a component, as the LOGS stream and the log files keep it."""

from __future__ import annotations

from typing import Any

from msgspec import Struct, field

from .base import SCHEMA_VERSION


class LogRecord(Struct, kw_only=True, omit_defaults=True):
    ts: float  # seconds since the epoch
    level: str  # debug, info, warning, error, critical
    component: str  # gateway, registry, node, up
    instance: str  # the node id for a node, else host and process id
    event: str  # the message
    logger: str | None = None  # the structlog logger's name (gateway.auth, broker.appender...)
    node_id: str | None = None
    request_id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # the record's other key-values, as text or numbers
    schema: int = SCHEMA_VERSION
