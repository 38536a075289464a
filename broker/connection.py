"""Connecting to NATS: one place for URL, credentials, reconnect and backoff."""

from __future__ import annotations

import os

import nats
import structlog
from nats.aio.client import Client

log = structlog.get_logger("broker")

DEFAULT_URL = "nats://127.0.0.1:4222"


def nats_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("LLM_ROUTER_NATS_URL") or DEFAULT_URL


async def connect(url: str | None = None, *, name: str, credentials: str | None = None) -> Client:
    """Connect with unlimited reconnects and jittered backoff; logs every state change.

    ``credentials`` is a NATS ``.creds`` file (per-role users come with the security issue).
    """
    url = nats_url(url)

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", component=name, error=str(exc))

    async def on_disconnect() -> None:
        log.warning("nats disconnected", component=name)

    async def on_reconnect() -> None:
        log.info("nats reconnected", component=name)

    return await nats.connect(
        servers=[s.strip() for s in url.split(",")],
        name=name,
        user_credentials=credentials or os.environ.get("LLM_ROUTER_NATS_CREDS") or None,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1.0,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        # Requests may carry several MB (answers, embeddings); let the server's limit decide.
        pending_size=64 * 1024 * 1024,
    )
