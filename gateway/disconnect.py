"""Noticing a client that leaves while its request waits (queued, or running unstreamed).

A stream notices by itself, when writing fails; a client waiting for one JSON answer gives no
sign until the answer is written. Once the body is read, the next ASGI ``receive()`` returns
only when the client disconnects, so one watcher per waiting request is enough: it abandons
the call, which leaves the queue at once or is cancelled on its node.

The watcher starts only after ``WATCH_AFTER_S``: most answers come sooner, and one sweep for
all waiting requests costs far less than a task (or a timer) per request. A client that leaves
is still noticed within twice that delay.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from .dispatch import Call

WATCH_AFTER_S = 0.05


class _Sweeper:
    """One timer for every waiting request of an event loop: every ``WATCH_AFTER_S`` the ones
    waiting longer than that get their watcher task. Entering and leaving is a dict insert and
    pop, cheaper than a ``call_later`` handle per request; the sweep runs only while requests wait."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: dict[int, abandon_on_disconnect] = {}
        self.task: asyncio.Task | None = None

    def add(self, watch: abandon_on_disconnect) -> None:
        watch.since = self.loop.time()
        self.waiting[id(watch)] = watch
        if self.task is None:
            self.task = self.loop.create_task(self._sweep(), name="disconnect-sweeper")

    async def _sweep(self) -> None:
        try:
            while self.waiting:
                await asyncio.sleep(WATCH_AFTER_S)
                due = self.loop.time() - WATCH_AFTER_S
                for watch in [w for w in self.waiting.values() if w.watcher is None and w.since <= due]:
                    watch.watcher = self.loop.create_task(watch._watch())
        finally:
            self.task = None


_SWEEPERS: dict[asyncio.AbstractEventLoop, _Sweeper] = {}


def _sweeper() -> _Sweeper:
    loop = asyncio.get_running_loop()
    sweeper = _SWEEPERS.get(loop)
    if sweeper is None:
        for old in [old for old in _SWEEPERS if old.is_closed()]:  # loops of finished runs (tests)
            del _SWEEPERS[old]
        sweeper = _SWEEPERS[loop] = _Sweeper(loop)
    return sweeper


class abandon_on_disconnect:  # noqa: N801 - used as a context manager, named like contextlib's
    """``with abandon_on_disconnect(request, call):`` a disconnect of the client abandons the
    call. Leave it before handing a StreamingResponse the request: that listens by itself."""

    __slots__ = ("request", "call", "watcher", "since", "sweeper")

    def __init__(self, request: Request, call: Call) -> None:
        self.request = request
        self.call = call
        self.watcher: asyncio.Task | None = None
        self.since = 0.0
        self.sweeper: _Sweeper | None = None

    def __enter__(self) -> None:
        self.sweeper = _sweeper()
        self.sweeper.add(self)

    def __exit__(self, *exc: object) -> None:
        self.sweeper.waiting.pop(id(self), None)
        if self.watcher is not None:
            self.watcher.cancel()

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.call.abandon()
                return
