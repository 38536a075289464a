"""Sending one inference request to one node and reading its replies.

The gateway chooses the node (least in-flight among live nodes that serve the model) and
publishes on that node's own subject, so the choice is ours rather than NATS's random pick.
All replies come back on one wildcard inbox subscription and are demultiplexed by call, which
costs no SUB/UNSUB per request. A node that is not subscribed answers "no responders" at
once; a node that died is noticed when its heartbeat expires. Either way, a call that has not
yet received anything is retried once on another node.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections import Counter
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker.mirrors import NodeDirectory
from events import codec, subjects
from events.messages import (
    FINAL_REPLIES,
    CancelRequest,
    InferenceRequest,
    NodeHeartbeat,
    Reply,
)

from .errors import ApiError

log = structlog.get_logger("gateway")

NO_RESPONDERS = "503"


class NodeGone(Exception):
    """The chosen node cannot answer (no responders, heartbeat expired)."""


class Dispatcher:
    def __init__(self, nc: Client, directory: NodeDirectory, *, request_timeout: float = 600.0) -> None:
        self.nc = nc
        self.directory = directory
        self.request_timeout = request_timeout
        self.inflight: Counter[str] = Counter()
        self._prefix = nc.new_inbox()
        self._ids = itertools.count()
        self._calls: dict[str, asyncio.Queue] = {}
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_reply(self, msg: Msg) -> None:
        queue = self._calls.get(msg.subject)
        if queue is not None:
            queue.put_nowait(msg)

    def choose(self, model: str, capability: str, exclude: set[str] = frozenset()) -> NodeHeartbeat | None:
        nodes = [n for n in self.directory.serving(model, capability) if n.node_id not in exclude]
        if not nodes:
            return None
        random.shuffle(nodes)  # equal loads: spread, do not pile onto the first
        return min(nodes, key=lambda n: self.inflight[n.node_id] / max(1, n.max_parallel))

    def call(self, capability: str, model: str, params: Any, *, stream: bool) -> Call:
        return Call(self, capability, model, params, stream)


class Call:
    """One request's life: ``async with dispatcher.call(...) as call: reply = await call.next()``."""

    def __init__(self, dispatcher: Dispatcher, capability: str, model: str, params: Any, stream: bool) -> None:
        self.d = dispatcher
        self.capability = capability
        self.model = model
        self.request = InferenceRequest(
            request_id=uuid.uuid4().hex, model=model, capability=capability, params=params, stream=stream
        )
        self.node_id: str | None = None
        self.received = 0
        self.finished = False
        self._tried: set[str] = set()
        self._inbox = f"{dispatcher._prefix}.{next(dispatcher._ids)}"
        self._queue: asyncio.Queue = asyncio.Queue()
        self._deadline = time.monotonic() + dispatcher.request_timeout

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def __aenter__(self) -> Call:
        self.d._calls[self._inbox] = self._queue
        try:
            await self._send()
        except BaseException:
            self.d._calls.pop(self._inbox, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.d._calls.pop(self._inbox, None)
        self._release()
        if not self.finished and self.node_id is not None:
            # The client left (or we gave up): stop the generation on the node.
            try:
                await self.d.nc.publish(
                    subjects.infer_cancel(self.request_id), codec.encode(CancelRequest(request_id=self.request_id))
                )
            except Exception as err:
                log.warning("cancel not delivered", request_id=self.request_id, error=str(err))

    def _release(self) -> None:
        if self.node_id is not None:
            self.d.inflight[self.node_id] -= 1
            if self.d.inflight[self.node_id] <= 0:
                del self.d.inflight[self.node_id]

    async def _send(self) -> None:
        node = self.d.choose(self.model, self.capability, exclude=self._tried)
        if node is None:
            raise ApiError(
                503,
                f"No live node is serving the model '{self.model}' right now. Retry shortly.",
                code="model_unavailable",
                headers={"Retry-After": "5"},
            )
        self._release()
        self.node_id = node.node_id
        self._tried.add(node.node_id)
        self.d.inflight[node.node_id] += 1
        subject = subjects.infer_on_node(self.capability, self.model, node.node_id)
        await self.d.nc.publish(subject, codec.encode(self.request), reply=self._inbox)

    async def next(self) -> Reply:
        """The next reply; retries on another node while nothing has arrived from the first."""
        while True:
            try:
                reply = await self._next_from_node()
            except NodeGone as gone:
                if self.received or len(self._tried) >= 2:
                    raise ApiError(503, f"node {self.node_id} stopped answering: {gone}", code="node_unavailable")
                log.warning("retrying on another node", request_id=self.request_id, node=self.node_id, reason=str(gone))
                await self._send()
                continue
            self.received += 1
            if isinstance(reply, FINAL_REPLIES):
                self.finished = True
            return reply

    async def _next_from_node(self) -> Reply:
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(504, "the node did not answer in time", code="timeout")
            try:
                msg: Msg = await asyncio.wait_for(self._queue.get(), timeout=min(1.0, remaining))
            except TimeoutError:
                if not self.d.directory.is_live(self.node_id):
                    raise NodeGone("its heartbeat expired") from None
                continue
            if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
                # Nobody listens on the node's subject: it died or unloaded the model.
                self.d.directory.forget(self.node_id)
                raise NodeGone("no responders")
            reply = codec.decode_reply(msg.data)
            if reply.node_id == self.node_id:
                return reply
            # A late answer from a node we already gave up on: ignore it.
