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

from starlette.requests import Request

from .dispatch import Call

WATCH_AFTER_S = 0.05


class abandon_on_disconnect:  # noqa: N801 - used as a context manager, named like contextlib's
    """``with abandon_on_disconnect(request, call):`` a disconnect of the client abandons the
    call. Leave it before handing a StreamingResponse the request: that listens by itself."""

    __slots__ = ("request", "call", "timer", "watcher")

    def __init__(self, request: Request, call: Call) -> None:
        self.request = request
        self.call = call
        self.watcher: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start)

    def __exit__(self, *exc: object) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()

    def _start(self) -> None:
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.call.abandon()
                return
