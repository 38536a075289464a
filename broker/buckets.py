"""Reading a KV bucket's current values whole, and knowing when a watcher has delivered them.

nats.py marks "the current values end here" (the None a watcher yields, which ``kv.keys()``
stops at) from a consumer-info reply that can overtake the values themselves on a busy machine
(nats-io/nats.py#842): the server counts a value as delivered once its consumer has sent it,
so the reply says nothing is pending while the values are still on their way. ``keys()`` then
raises NoKeysError, or returns some of the keys, for a bucket that holds them. A node reading
the registrations at start that way missed a model for good (its registry consumer delivers
only new events), and CI runs failed on nodes that never loaded a model registered before them.

Here the end is what the values say themselves: the one delivered with no message pending after
it (``Entry.delta == 0``); a None ends them only when the bucket's stream holds no message.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE

from .permissions import kv_stream


async def holds_messages(js: JetStreamContext, bucket: str, keys: str = ">") -> bool:
    """Whether the bucket's stream holds a message for a key matching ``keys`` (a KV key pattern)."""
    if keys == ">":
        return (await js.stream_info(kv_stream(bucket))).state.messages > 0
    info = await js.stream_info(kv_stream(bucket), subjects_filter=f"$KV.{bucket}.{keys}")
    return bool(info.state.subjects)


async def values_end(js: JetStreamContext, bucket: str, entry: Any, keys: str = ">") -> bool:
    """Whether ``entry`` (from a watcher of ``keys`` that keeps deletes; None: nats.py's marker)
    is the last of the bucket's current values."""
    if entry is None:
        return not await holds_messages(js, bucket, keys)
    return entry.delta == 0


def is_deleted(entry: Any) -> bool:
    return entry.operation in (KV_DEL, KV_PURGE) or not entry.value


async def current_entries(js: JetStreamContext, bucket: str, keys: str = ">", timeout: float = 30.0) -> list[Any]:
    """The current value of every key matching ``keys`` (deleted keys left out), read by one
    watcher up to the end of what the bucket holds now; raises TimeoutError when that end does
    not come within ``timeout``."""
    kv = await js.key_value(bucket)
    watcher = await kv.watch(keys)  # with deletes: the last value may be one, and it ends the values
    latest: dict[str, Any] = {}

    async def read() -> None:
        async for entry in watcher:
            if entry is not None:
                latest[entry.key] = entry
            if await values_end(js, bucket, entry, keys):
                return

    try:
        await asyncio.wait_for(read(), timeout)
    finally:
        await watcher.stop()
    return [entry for entry in latest.values() if not is_deleted(entry)]
