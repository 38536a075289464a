"""What the operator commands (``keys``, ``users``) share: one bucket over a fresh connection.

Each connects as the operator, provisions the streams and buckets (a cluster whose gateway never
started has none yet), opens its bucket and reads every entry straight from it.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from broker import connect, provision

from .nats_options import nats_auth


@asynccontextmanager
async def operator_bucket(args: argparse.Namespace, client: str, bucket: str) -> AsyncIterator[tuple[Any, Any]]:
    """(JetStream, the bucket) on a connection named ``client``, closed on the way out."""
    nc = await connect(args.nats_url, name=client, auth=nats_auth(args))
    try:
        js = nc.jetstream()
        await provision(js, role=nc.role)
        yield js, await js.key_value(bucket)
    finally:
        await nc.close()


async def entries(kv: Any, timeout: float = 30.0) -> list[Any]:
    """Every entry of ``kv`` that holds a value, read by one watcher up to the end of the current
    values. (``kv.keys()`` and a get per key stops early on a busy server and skips keys.)"""
    watcher = await kv.watchall(ignore_deletes=True)
    found: list[Any] = []

    async def read() -> None:
        async for entry in watcher:
            if entry is None:  # the end of the values there are now
                return
            if entry.value:
                found.append(entry)

    try:
        await asyncio.wait_for(read(), timeout)
    finally:
        await watcher.stop()
    return found
