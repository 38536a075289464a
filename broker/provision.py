"""Create the streams, KV buckets and object store of ``events.storage``, idempotently.

Safe to run from every component at start-up: existing resources are updated to the
declared settings, missing ones created.
"""

from __future__ import annotations

import dataclasses

from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from events import storage


async def provision(js: JetStreamContext) -> None:
    for config in storage.STREAMS:
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
                continue
            except BadRequestError:  # another component created it a moment ago
                pass
        await js.update_stream(config)
    for kv in storage.KEY_VALUES:
        await js.create_key_value(config=dataclasses.replace(kv))
    for obj in storage.OBJECT_STORES:
        await js.create_object_store(bucket=obj.bucket, config=dataclasses.replace(obj))
