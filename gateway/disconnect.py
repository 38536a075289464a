"""Noticing a client that leaves while its request waits (queued, or running unstreamed).

A stream notices by itself, when writing fails; a client waiting for one JSON answer gives no
sign until the answer is written. Once the body is read, the next ASGI ``receive()`` returns
only when the client disconnects, so one watcher per waiting request is enough: it abandons
the call, which leaves the queue at once or is cancelled on its node.

The watcher starts only after ``WATCH_AFTER_S``: most answers come sooner, and a timer costs
far less than a task per request. A client that leaves is still noticed within that delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.requests import Request

from .dispatch import Call

WATCH_AFTER_S = 0.05


@contextmanager
def abandon_on_disconnect(request: Request, call: Call) -> Iterator[None]:
    """While inside, a disconnect of ``request``'s client abandons ``call``. Leave it before
    handing the response to a StreamingResponse, which listens for the disconnect itself."""
    watcher: list[asyncio.Task] = []

    def start() -> None:
        watcher.append(asyncio.ensure_future(_watch(request, call)))

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, start)
    try:
        yield
    finally:
        timer.cancel()
        if watcher:
            watcher[0].cancel()


async def _watch(request: Request, call: Call) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            call.abandon()
            return
