"""Noticing a client that leaves while its request waits (queued, or running unstreamed).

A stream notices by itself, when writing fails; a client waiting for one JSON answer gives no
sign until the answer is written. Once the body is read, the next ASGI ``receive()`` returns
only when the client disconnects, so one watcher task per waiting request is enough: it
abandons the call, which leaves the queue at once or is cancelled on its node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.requests import Request

from .dispatch import Call


@asynccontextmanager
async def abandon_on_disconnect(request: Request, call: Call) -> AsyncIterator[None]:
    """While inside, a disconnect of ``request``'s client abandons ``call``. Leave it before
    handing the response to a StreamingResponse, which listens for the disconnect itself."""
    watcher = asyncio.create_task(_watch(request, call))
    try:
        yield
    finally:
        watcher.cancel()


async def _watch(request: Request, call: Call) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            call.abandon()
            return
