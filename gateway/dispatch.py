"""Sending one inference request to one node with a free slot, queueing when there is none.

The gateway owns the choice. Every (node, model) has the slots the node declares; the
dispatcher counts its own requests on each and sends only where a slot is free, preferring the
node that has answered this model fastest (a moving average of its service times), so a fast
node is used before a slow one and an idle node before a busy one. When no slot is free, a
request waits in a bounded FIFO queue per model: full → 429, waited longer than the queue
timeout → 504. Requests are sent with ``when_busy="reject"``: a node whose slots are taken by
another gateway answers ``node_busy`` at once, and the request goes back to the head of the
queue. That keeps two gateways sharing the same nodes correct without coordinating them.

Replies come back on one wildcard inbox subscription, demultiplexed by call. A node that is not
subscribed answers "no responders" at once; a node that died is noticed when its heartbeat
expires. Either way, a call that has received nothing yet is retried once on another node.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter, deque
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker.mirrors import NodeDirectory
from events import codec, subjects
from events.messages import FINAL_REPLIES, CancelRequest, Failure, InferenceRequest, NodeHeartbeat, Reply

from .errors import ApiError

log = structlog.get_logger("gateway")

NO_RESPONDERS = "503"
_ABANDONED = object()  # put in a call's reply queue when its client left
BUSY_BACKOFF_S = 0.05  # a node that said busy is skipped this long (or until one of ours ends there)
EWMA = 0.2
SlotKey = tuple[str, str]  # (node id, model)


class NodeGone(Exception):
    """The chosen node cannot answer (no responders, heartbeat expired, draining), or no longer
    knows the request (``lost``: its reply was lost; the node itself is fine)."""

    def __init__(self, reason: str, *, lost: bool = False) -> None:
        super().__init__(reason)
        self.lost = lost


class ClientDisconnected(Exception):
    """The HTTP client went away while its request waited: nobody needs the answer."""


def broker_unavailable() -> ApiError:
    return ApiError(503, "The message broker (NATS) is unreachable; the gateway is reconnecting. Retry shortly.",
                    code="broker_unavailable", headers={"Retry-After": "2"})


class Dispatcher:
    def __init__(
        self,
        nc: Client,
        directory: NodeDirectory,
        *,
        request_timeout: float = 600.0,
        queue_size: int = 100,
        queue_timeout: float = 60.0,
    ) -> None:
        self.nc = nc
        self.directory = directory
        self.request_timeout = request_timeout
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.inflight: Counter[SlotKey] = Counter()
        self.service_s: dict[SlotKey, float] = {}
        self._busy_until: dict[SlotKey, float] = {}
        self._waiters: dict[tuple[str, str], deque[tuple[asyncio.Future, Call]]] = {}
        self.waiting = 0
        self._prefix = nc.new_inbox()
        self._ids = itertools.count()
        self._calls: dict[str, asyncio.Queue] = {}
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)
        self.directory.on_change(self._serve_waiters)  # a heartbeat may bring a node or free slots

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_reply(self, msg: Msg) -> None:
        queue = self._calls.get(msg.subject)
        if queue is not None:
            queue.put_nowait(msg)

    def call(self, capability: str, model: str, params: Any, *, stream: bool) -> Call:
        return Call(self, capability, model, params, stream)

    def node_inflight(self, node_id: str) -> int:
        return sum(n for (node, _), n in self.inflight.items() if node == node_id)

    # ------------------------------------------------------------ choosing a slot

    def _slots(self, beat: NodeHeartbeat, model: str) -> int:
        return next((m.parallel for m in beat.models if m.name == model), beat.max_parallel) or 1

    def _pick(self, call: Call) -> NodeHeartbeat | None:
        """The best node with a free slot for the call, or None."""
        now = time.monotonic()
        best, best_score = None, None
        for beat in self.directory.serving(call.model, call.capability):
            key = (beat.node_id, call.model)
            if beat.node_id in call.excluded or self._busy_until.get(key, 0.0) > now:
                continue
            slots, used = self._slots(beat, call.model), self.inflight[key]
            if used >= slots:
                continue
            # Expected time to finish one more request here; unknown nodes are tried first.
            score = self.service_s.get(key, 0.0) * (used + 1) / slots
            if best_score is None or score < best_score:
                best, best_score = beat, score
        return best

    def _reserve(self, call: Call, beat: NodeHeartbeat) -> None:
        self.inflight[(beat.node_id, call.model)] += 1

    def release(self, node_id: str, model: str, service_s: float | None = None) -> None:
        key = (node_id, model)
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]
        self._busy_until.pop(key, None)
        if service_s is not None:
            before = self.service_s.get(key)
            self.service_s[key] = service_s if before is None else before + EWMA * (service_s - before)
        self._serve_waiters()

    def broker_lost(self) -> None:
        """The NATS connection dropped: fail every queued request now (503, retry shortly) rather
        than let it wait out the queue timeout; calls already sent wait for their replies."""
        for queue in self._waiters.values():
            for future, _ in queue:
                if not future.done():
                    future.set_exception(broker_unavailable())

    def mark_busy(self, node_id: str, model: str) -> None:
        """The node said it has no free slot (another gateway's work): skip it for a moment."""
        self._busy_until[(node_id, model)] = time.monotonic() + BUSY_BACKOFF_S
        asyncio.get_running_loop().call_later(BUSY_BACKOFF_S, self._serve_waiters)

    async def acquire(self, call: Call) -> NodeHeartbeat:
        """A reserved slot for the call: at once, or after waiting in the model's queue."""
        key = (call.model, call.capability)
        queue = self._waiters.get(key)
        if not queue:
            beat = self._pick(call)
            if beat is not None:
                self._reserve(call, beat)
                return beat
        if not [b for b in self.directory.serving(call.model, call.capability) if b.node_id not in call.excluded]:
            raise _no_node(call.model)
        if self.waiting >= self.queue_size:
            raise ApiError(
                429, f"The request queue is full ({self.queue_size} waiting); retry later.",
                code="queue_full", headers={"Retry-After": str(max(1, round(self.queue_timeout)))},
            )
        future = asyncio.get_running_loop().create_future()
        call.waiting = future
        queue = self._waiters.setdefault(key, deque())
        entry = (future, call)
        queue.append(entry)
        self.waiting += 1
        started = time.monotonic()
        try:
            beat = await asyncio.wait_for(asyncio.shield(future), timeout=self.queue_timeout)
        except TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result().node_id, call.model)  # assigned just as the wait expired
            raise ApiError(
                504, f"Waited {self.queue_timeout:g} s in the queue for a free node; retry later.", code="queue_timeout"
            ) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result().node_id, call.model)  # assigned just as the client left
            raise
        finally:
            call.waiting = None
            self.waiting -= 1
            if entry in queue:
                queue.remove(entry)
            if not queue:
                self._waiters.pop(key, None)
        call.waited_ms += (time.monotonic() - started) * 1000
        return beat

    def _serve_waiters(self) -> None:
        """Hand free slots to the oldest waiters, model by model."""
        for (model, capability), queue in list(self._waiters.items()):
            while queue:
                future, call = queue[0]
                if future.done():
                    queue.popleft()
                    continue
                beat = self._pick(call)
                if beat is None:
                    if not self.directory.serving(model, capability):
                        future.set_exception(_no_node(model))
                        queue.popleft()
                        continue
                    break
                queue.popleft()
                self._reserve(call, beat)
                future.set_result(beat)


def _no_node(model: str) -> ApiError:
    return ApiError(
        503, f"No live node is serving the model '{model}' right now. Retry shortly.",
        code="model_unavailable", headers={"Retry-After": "5"},
    )


class Call:
    """One request's life: ``async with dispatcher.call(...) as call: reply = await call.next()``."""

    def __init__(self, dispatcher: Dispatcher, capability: str, model: str, params: Any, stream: bool) -> None:
        self.d = dispatcher
        self.capability = capability
        self.model = model
        self.request = InferenceRequest(
            request_id=uuid.uuid4().hex, model=model, capability=capability, params=params, stream=stream,
            when_busy="reject",
        )
        self.node_id: str | None = None  # the node asked last (kept for the history record)
        self._slot: str | None = None  # the node whose slot this call holds
        self.received = 0
        self.finished = False
        self.waited_ms = 0.0
        self.excluded: set[str] = set()  # nodes that died under this call
        self._failovers = 0
        self._sent_at = 0.0
        self.waiting: asyncio.Future | None = None  # while queued for a free slot
        self.abandoned = False
        self._sent = False
        self._inbox = f"{dispatcher._prefix}.{next(dispatcher._ids)}"
        self._queue: asyncio.Queue = asyncio.Queue()
        self._deadline = time.monotonic() + dispatcher.request_timeout

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def __aenter__(self) -> Call:
        """Registers the reply inbox; the request is sent (after a free slot) by the first next()."""
        self.d._calls[self._inbox] = self._queue
        return self

    def abandon(self) -> None:
        """The client left: a queued call leaves the queue, a sent one stops waiting (its
        ``__aexit__`` then cancels it on the node). ``next()`` raises ClientDisconnected."""
        self.abandoned = True
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(ClientDisconnected())
        self._queue.put_nowait(_ABANDONED)

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

    def _release(self, *, finished: bool = False) -> None:
        """Give the slot back (once); a finished answer also teaches the node's speed."""
        if self._slot is not None:
            took = time.monotonic() - self._sent_at if finished else None
            self.d.release(self._slot, self.model, took)
            self._slot = None

    async def _send(self) -> None:
        self._release()
        if self.abandoned:
            raise ClientDisconnected()
        if not self.d.nc.is_connected:
            raise broker_unavailable()
        self._sent = True
        node = await self.d.acquire(self)
        self.node_id = self._slot = node.node_id
        self._sent_at = time.monotonic()
        subject = subjects.infer_on_node(self.capability, self.model, node.node_id)
        await self.d.nc.publish(subject, codec.encode(self.request), reply=self._inbox)

    async def next(self) -> Reply:
        """The next reply. Before anything has arrived, a busy node means "queue again" and a
        dead or draining node means "retry once elsewhere"."""
        if not self._sent:
            await self._send()
        while True:
            try:
                reply = await self._next_from_node()
            except NodeGone as gone:
                if self.received or self._failovers >= 1:
                    raise ApiError(503, f"node {self.node_id} stopped answering: {gone}", code="node_unavailable",
                                   headers={"Retry-After": "1"}) from None
                log.warning("retrying", request_id=self.request_id, node=self.node_id, reason=str(gone))
                self._failovers += 1
                if not gone.lost:  # a node that lost one reply is still fine to use
                    self.excluded.add(self.node_id)
                await self._send()
                continue
            if not self.received and isinstance(reply, Failure) and reply.code == "node_busy":
                self.d.mark_busy(self.node_id, self.model)
                await self._send()
                continue
            self.received += 1
            if isinstance(reply, FINAL_REPLIES):
                self.finished = True
                self._release(finished=not isinstance(reply, Failure))
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
                if self.d.directory.lost(self.node_id, self.request_id, self._sent_at):
                    raise NodeGone("it no longer knows the request (its reply was lost)", lost=True) from None
                continue
            if msg is _ABANDONED:
                raise ClientDisconnected()
            if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
                # Nobody listens on the node's subject: it died or unloaded the model.
                self.d.directory.forget(self.node_id)
                raise NodeGone("no responders")
            reply = codec.decode_reply(msg.data)
            if reply.node_id != self.node_id:
                continue  # a late answer from a node we already gave up on
            if isinstance(reply, Failure) and reply.code == "node_draining" and not self.received:
                raise NodeGone("draining")
            return reply
