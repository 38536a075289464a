"""What the operator commands (``keys``, ``users``) share: one bucket over a fresh connection.

Each connects as the operator, provisions the streams and buckets (a cluster whose gateway never
started has none yet) and opens its bucket; ``broker.buckets.current_entries`` reads its entries.
"""

from __future__ import annotations

import argparse
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
