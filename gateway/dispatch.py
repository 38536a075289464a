"""Sending one inference request to one node with a free slot, queueing when there is none.

The gateway owns the choice. Every (node, model) has the slots the node declares; the
dispatcher counts its own requests on each and sends only where a slot is free, preferring the
node that has answered this model fastest (a moving average of its service times), so a fast
node is used before a slow one and an idle node before a busy one. When no slot is free, a
request waits in a bounded queue per model: full → QueueFull, waited longer than the queue
timeout → QueueTimeout. The queue is served oldest first while it drains and newest first once
it is standing (adaptive LIFO: under overload the oldest are about to be given up on). Requests
are sent with ``when_busy="reject"``: a node whose slots are taken by another gateway answers
``node_busy`` at once, and the request goes back to the head of the queue. That keeps two
gateways sharing the same nodes correct without coordinating them.

A model that no node has loaded, but some node has the files of, is a cold start: the request
waits in the queue (the wait shows in ``x-queue-wait-ms``) while the registry places the model
on a node and that node loads it (the ``placer``, gateway/placement.py, asks); its heartbeat
then lists the model and the queue is served. A queue that keeps standing for a model asks
for one more replica. A node that answers ``model_not_loaded`` (it unloaded the model just as
the request was sent) is treated like a busy one: the request goes back to the queue's head.

Replies come back on one wildcard inbox subscription, demultiplexed by call into its Mailbox.
A node that is not subscribed answers "no responders" at once; a node that died is noticed
when its heartbeat expires; a reply that was lost is noticed when the node's heartbeats stop
listing the request. A call that has received nothing yet is then retried once (elsewhere,
unless only the reply was lost). Errors are DispatchError subclasses, which know nothing of
HTTP (gateway.errors.api_error maps them).
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

log = structlog.get_logger("gateway")

NO_RESPONDERS = "503"
_ABANDONED = object()  # put in a call's reply queue when its client left
_TICK = object()  # put in a waiting call's reply queue once a second (health and deadline checks)
TICK_S = 1.0
BUSY_BACKOFF_S = 0.05  # a node that said busy is skipped this long (or until one of ours ends there)
EWMA = 0.2
BROKER_GRACE_S = 2.0  # a request waits this long for a lost NATS connection to come back, then 503
LIFO_AFTER_S = 0.25  # a queue whose oldest request waited this long is standing: serve newest first
SCALE_AFTER_S = 2.0  # a queue standing this long asks the registry for one more replica
SlotKey = tuple[str, str]  # (node id, model)


class DispatchError(Exception):
    """Why a call got no answer. Scheduling knows nothing of HTTP: ``gateway.errors.api_error``
    maps each kind to its OpenAI error, in one place."""


class NoNode(DispatchError):
    def __init__(self, model: str) -> None:
        super().__init__(f"no live node is serving the model {model!r}")
        self.model = model


class NotPlaced(DispatchError):
    """The model could not be loaded anywhere: the registry found no node for it, or the node
    chosen could not load it (``status``: 503, or 507 when it fits no node's memory budget)."""

    def __init__(self, model: str, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.model = model
        self.status = status


class QueueFull(DispatchError):
    def __init__(self, size: int, retry_after_s: float) -> None:
        super().__init__(f"the request queue is full ({size} waiting)")
        self.size = size
        self.retry_after_s = retry_after_s


class QueueTimeout(DispatchError):
    def __init__(self, waited_s: float) -> None:
        super().__init__(f"waited {waited_s:g} s in the queue for a free node")
        self.waited_s = waited_s


class NodeUnavailable(DispatchError):
    """The node stopped answering after part of the answer, or twice in a row."""

    def __init__(self, node_id: str | None, reason: str) -> None:
        super().__init__(f"node {node_id} stopped answering: {reason}")
        self.node_id = node_id


class NodeTimeout(DispatchError):
    def __init__(self) -> None:
        super().__init__("the node did not answer in time")


class BrokerUnavailable(DispatchError):
    def __init__(self) -> None:
        super().__init__("the message broker (NATS) is unreachable; the gateway is reconnecting")


class ClientDisconnected(DispatchError):
    """The HTTP client went away while its request waited: nobody needs the answer."""

    def __init__(self) -> None:
        super().__init__("client disconnected")


class NodeGone(Exception):
    """The chosen node cannot answer (no responders, heartbeat expired, draining), or no longer
    knows the request (``lost``: its reply was lost; the node itself is fine). Internal: it
    turns into a retry or a NodeUnavailable."""

    def __init__(self, reason: str, *, lost: bool = False) -> None:
        super().__init__(reason)
        self.lost = lost


class Dispatcher:
    def __init__(
        self,
        nc: Client,
        directory: NodeDirectory,
        *,
        request_timeout: float = 600.0,
        queue_size: int = 100,
        queue_timeout: float = 60.0,
        lifo_after_s: float = LIFO_AFTER_S,
    ) -> None:
        self.nc = nc
        # Asks the registry to place a model (gateway.placement.Placer): placer.want(model, capability, reason, waiting).
        self.placer: Any = None
        self.lifo_after_s = lifo_after_s
        self.directory = directory
        self.request_timeout = request_timeout
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.inflight: Counter[SlotKey] = Counter()
        self.service_s: dict[SlotKey, float] = {}
        self._busy_until: dict[SlotKey, float] = {}
        self._waiters: dict[tuple[str, str], deque[tuple[asyncio.Future, Call, float]]] = {}
        self.waiting = 0
        self._prefix = nc.new_inbox()
        self._ids = itertools.count()
        self._calls: dict[str, Mailbox] = {}
        self._sub = None
        self._ticker: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._connected.set()
        self._grace: asyncio.TimerHandle | None = None  # fails queued requests if the link stays down

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)
        self.directory.on_change(self._serve_waiters)  # a heartbeat may bring a node or free slots
        self._ticker = asyncio.create_task(self._tick(), name="dispatch-ticker")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _tick(self) -> None:
        """Once a second, wake every waiting call to check its deadline and its node's health:
        one timer for all calls instead of a timeout on every reply (``asyncio.wait_for`` costs a
        task per await). Queues standing for SCALE_AFTER_S ask for another replica."""
        while True:
            await asyncio.sleep(TICK_S)
            for mailbox in self._calls.values():
                if mailbox.empty():
                    mailbox.put(_TICK)
            self._ask_for_replicas()

    def _ask_for_replicas(self) -> None:
        """Queues of a model no node has loaded ask again (an earlier decision may have been
        refused or missed); queues standing SCALE_AFTER_S ask for one more replica."""
        if self.placer is None:
            return
        now = time.monotonic()
        for (model, capability), queue in self._waiters.items():
            if not queue or not self.directory.placeable(model):
                continue  # an upstream server's model: its node announces it, the registry has no say
            if not self.directory.serving(model, capability):
                self.placer.want(model, capability, "on_demand", len(queue))
            elif self._standing(queue, now) and now - queue[0][2] >= SCALE_AFTER_S:
                self.placer.want(model, capability, "queueing", len(queue))

    async def _on_reply(self, msg: Msg) -> None:
        mailbox = self._calls.get(msg.subject)
        if mailbox is not None:
            mailbox.put(msg)

    def call(self, capability: str, model: str, params: Any, *, stream: bool) -> Call:
        """A call with its reply inbox open; ``aclose()`` it when done (the Exchange does)."""
        return Call(self, capability, model, params, stream)

    def open_inbox(self, mailbox: Mailbox) -> str:
        """A reply subject whose messages land in ``mailbox`` (one wildcard subscription for all)."""
        inbox = f"{self._prefix}.{next(self._ids)}"
        self._calls[inbox] = mailbox
        return inbox

    def close_inbox(self, inbox: str) -> None:
        self._calls.pop(inbox, None)

    async def send(self, call: Call, node_id: str) -> None:
        subject = subjects.infer_on_node(call.capability, call.model, node_id)
        await self.nc.publish(subject, codec.encode(call.request), reply=call.inbox)

    async def cancel(self, request_id: str) -> None:
        """Tell the node running ``request_id`` to stop (best effort: the client is gone)."""
        try:
            await self.nc.publish(subjects.infer_cancel(request_id), codec.encode(CancelRequest(request_id=request_id)))
        except Exception as err:
            log.warning("cancel not delivered", request_id=request_id, error=str(err))

    def queued(self) -> Counter[str]:
        """Requests waiting for a free slot now, by model (read by /metrics at scrape time)."""
        counts: Counter[str] = Counter()
        for (model, _), queue in self._waiters.items():
            counts[model] += sum(1 for future, _, _ in queue if not future.done())
        return counts

    def node_inflight(self, node_id: str) -> int:
        return sum(n for (node, _), n in self.inflight.items() if node == node_id)

    # ------------------------------------------------------------ choosing a slot

    def _slots(self, beat: NodeHeartbeat, model: str) -> int:
        return self.directory.slots(beat.node_id, model)

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
        """The NATS connection dropped. On a cluster the client is back on another server within
        milliseconds, so give it ``BROKER_GRACE_S``; still down then, every queued request fails
        (503, retry shortly) rather than wait out the queue timeout. Sent calls wait for replies."""
        self._connected.clear()
        if self._grace is not None:
            self._grace.cancel()
        self._grace = asyncio.get_running_loop().call_later(BROKER_GRACE_S, self._fail_if_still_down)

    def broker_back(self) -> None:
        self._connected.set()
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _fail_if_still_down(self) -> None:
        if self._connected.is_set():
            return
        for queue in self._waiters.values():
            for future, _, _ in queue:
                if not future.done():
                    future.set_exception(BrokerUnavailable())

    async def wait_for_broker(self) -> None:
        """Return once connected; BrokerUnavailable if that takes longer than BROKER_GRACE_S."""
        if self.nc.is_connected:
            return
        try:
            await asyncio.wait_for(self._connected.wait(), BROKER_GRACE_S)
        except TimeoutError:
            raise BrokerUnavailable() from None

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
        serving = [b for b in self.directory.serving(call.model, call.capability) if b.node_id not in call.excluded]
        if not serving and not self.directory.loadable(call.model, call.capability):
            raise NoNode(call.model)
        if self.waiting >= self.queue_size:
            raise QueueFull(self.queue_size, self.queue_timeout)
        future = asyncio.get_running_loop().create_future()
        call.waiting = future
        queue = self._waiters.setdefault(key, deque())
        now = time.monotonic()
        entry = (future, call, now)
        if call.retry_next and not self._standing(queue, now):
            queue.appendleft(entry)  # refused as busy: it is next, not last (LIFO serves the right end)
        else:
            queue.append(entry)
        call.retry_next = False
        self.waiting += 1
        started = time.monotonic()
        if call.queued_since is None:
            call.queued_since = started  # requeued after node_busy: the same queue timeout, not a new one
            call.queued_at = time.time()
        if not serving and self.placer is not None and self.directory.placeable(call.model):  # a cold start
            self.placer.want(call.model, call.capability, "on_demand", len(queue), now=True)
        try:
            remaining = max(0.0, call.queued_since + self.queue_timeout - started)
            beat = await asyncio.wait_for(asyncio.shield(future), timeout=remaining)
        except TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result().node_id, call.model)  # assigned just as the wait expired
            raise QueueTimeout(self.queue_timeout) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result().node_id, call.model)  # assigned just as the client left
            raise
        finally:
            call.waiting = None
            self.waiting -= 1
            call.waited_ms += (time.monotonic() - started) * 1000  # a timeout's wait too (history, metrics)
            if entry in queue:
                queue.remove(entry)
            if not queue and self._waiters.get(key) is queue:  # not a newer queue of the same model
                del self._waiters[key]
        return beat

    def _standing(self, queue: deque, now: float) -> bool:
        """Whether the queue has stopped draining: its oldest request has waited lifo_after_s."""
        while queue and queue[0][0].done():
            queue.popleft()
        return bool(queue) and now - queue[0][2] >= self.lifo_after_s

    def _serve_waiters(self) -> None:
        """Hand free slots to waiters, model by model: the oldest first, or the newest while the
        queue is standing (overload). Under overload the oldest are the requests whose clients
        are about to give up; serving them first spends every slot on answers nobody reads,
        while the newest still have their whole patience left (adaptive LIFO). The oldest then
        wait out the queue timeout, or their client leaves."""
        now = time.monotonic()
        for (model, capability), queue in list(self._waiters.items()):
            while queue:
                newest = self._standing(queue, now)
                if not queue:
                    break
                future, call, _ = queue[-1] if newest else queue[0]
                if future.done():
                    queue.pop() if newest else queue.popleft()
                    continue
                beat = self._pick(call)
                if beat is None:
                    if not self.directory.serving(model, capability):
                        failure = self._cold_failure(model, capability, call)
                        if failure is not None:
                            future.set_exception(failure)
                            queue.pop() if newest else queue.popleft()
                            continue
                    break
                queue.pop() if newest else queue.popleft()
                self._reserve(call, beat)
                future.set_result(beat)

    def _cold_failure(self, model: str, capability: str, call: Call) -> DispatchError | None:
        """Why a call waiting for a model no node has loaded must fail now, or None (it waits
        while a node loads it): no node has its files any more, or every one that has them
        failed to load it since the call was queued (with the node's numbers)."""
        nodes = self.directory.loadable(model, capability)
        if not nodes:
            return NoNode(model)
        errors = []
        for beat in nodes:
            entry = next((m for m in beat.loadable if m.name == model), None)
            if entry is None or not entry.error or (entry.failed_at or 0.0) < (call.queued_at or 0.0):
                return None
            errors.append(f"node {beat.node_id}: {entry.error}")
        return NotPlaced(model, f"Model '{model}' could not be loaded: " + "; ".join(errors))

    def placement_failed(self, model: str, message: str, status: int = 503) -> None:
        """The registry found no node for ``model``: every call queued for it fails with why."""
        if self.directory.serving(model):
            return
        for (queued, _), queue in self._waiters.items():
            if queued != model:
                continue
            for future, _, _ in queue:
                if not future.done():
                    future.set_exception(NotPlaced(model, message, status))


_ID_PREFIX = uuid.uuid4().hex[:20]  # 80 random bits per process; a counter makes the rest
_id_counter = itertools.count()


def new_request_id() -> str:
    """A unique 32-hex-digit id, like a uuid4's hex but without a system call per request."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


class Mailbox:
    """A call's replies as they arrive: a deque and at most one waiting future. What
    ``asyncio.Queue`` does for one consumer, without its construction cost on every request."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque = deque()
        self.waiter: asyncio.Future | None = None

    def put(self, item: Any) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self.items

    async def get(self) -> Any:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class Call:
    """One request's life, as an async iterator of the node's replies ending with the final one.

    The first ``__anext__`` takes a slot (queueing if none is free) and sends the request; a
    busy node means "queue again", a dead or draining one "retry once elsewhere", a lost reply
    "send again". ``aclose()`` gives the slot back and, when the answer was not complete, tells
    the node to stop. Raises DispatchError subclasses only.
    """

    provider: str | None = None  # answered by a node (a cloud provider's call: gateway/providers/routes.py)

    def __init__(self, dispatcher: Dispatcher, capability: str, model: str, params: Any, stream: bool) -> None:
        self.d = dispatcher
        self.capability = capability
        self.model = model
        self.request = InferenceRequest(
            request_id=new_request_id(),
            model=model,
            capability=capability,
            params=params,
            stream=stream,
            when_busy="reject",
        )
        self.node_id: str | None = None  # the node asked last (kept for the history record)
        self._slot: str | None = None  # the node whose slot this call holds
        self.received = 0
        self.finished = False
        self.closed = False
        self.waited_ms = 0.0
        self.excluded: set[str] = set()  # nodes that died under this call
        self.waiting: asyncio.Future | None = None  # while queued for a free slot
        self.abandoned = False
        self.retry_next = False  # refused as busy: queue at the head, not the tail
        self.queued_since: float | None = None  # first time in the queue (the queue timeout counts from it)
        self.queued_at: float | None = None  # the same, wall clock (nodes report load failures with it)
        self._failovers = 0
        self._sent = False
        self._sent_at = 0.0
        self._mailbox = Mailbox()
        self.inbox = dispatcher.open_inbox(self._mailbox)
        self._deadline = time.monotonic() + dispatcher.request_timeout

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> Reply:
        if self.finished:
            raise StopAsyncIteration
        return await self.next()

    async def aclose(self) -> None:
        """Free the slot and the inbox (once); stop the node's work if the answer is incomplete."""
        if self.release_all():
            await self.cancel_on_node()

    def release_all(self) -> bool:
        """The synchronous part of ``aclose``: slot and inbox freed (once). True when the node
        still works on an incomplete answer, which ``cancel_on_node`` then stops."""
        if self.closed:
            return False
        self.closed = True
        self.d.close_inbox(self.inbox)
        self._release()
        return not self.finished and self.node_id is not None

    async def cancel_on_node(self) -> None:
        await self.d.cancel(self.request_id)

    def abandon(self) -> None:
        """The client left: a queued call leaves the queue, a sent one stops waiting (``aclose``
        then cancels it on the node). The pending ``next()`` raises ClientDisconnected."""
        self.abandoned = True
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(ClientDisconnected())
        self._mailbox.put(_ABANDONED)

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
        await self.d.wait_for_broker()
        if self.abandoned:  # the client left while we waited for the link
            raise ClientDisconnected()
        self._sent = True
        node = await self.d.acquire(self)
        self._slot = node.node_id
        if self.abandoned:  # a slot came just as the client left: give it to the next one
            self._release()
            raise ClientDisconnected()
        self.node_id = node.node_id
        self._sent_at = time.monotonic()
        await self.d.send(self, node.node_id)

    async def next(self) -> Reply:
        """The next reply (see the class doc for what happens before the first one)."""
        if not self._sent:
            await self._send()
        while True:
            try:
                reply = await self._next_from_node()
            except NodeGone as gone:
                if self.received or self._failovers >= 1:
                    raise NodeUnavailable(self.node_id, str(gone)) from None
                log.warning("retrying", request_id=self.request_id, node=self.node_id, reason=str(gone))
                self._failovers += 1
                if not gone.lost:  # a node that lost one reply is still fine to use
                    self.excluded.add(self.node_id)
                await self._send()
                continue
            if not self.received and isinstance(reply, Failure) and reply.code in ("node_busy", "model_not_loaded"):
                self._release()  # before marking: releasing a slot there clears the node's busy mark
                if reply.code == "model_not_loaded":  # unloaded just now: a cold start, back to the queue
                    self.d.directory.note_unloaded(self.node_id, self.model)
                else:
                    self.d.mark_busy(self.node_id, self.model)
                self.retry_next = True
                await self._send()
                continue
            self.received += 1
            if isinstance(reply, FINAL_REPLIES):
                self.finished = True
                self._release(finished=not isinstance(reply, Failure))
            return reply

    async def _next_from_node(self) -> Reply:
        while True:
            msg = await self._mailbox.get()
            if msg is _TICK:
                if time.monotonic() >= self._deadline:
                    raise NodeTimeout()
                if not self.d.directory.is_live(self.node_id):
                    raise NodeGone("it is gone (a goodbye, or no heartbeat within the TTL)")
                if self.d.directory.lost(self.node_id, self.request_id, self._sent_at):
                    raise NodeGone("it no longer knows the request (its reply was lost)", lost=True)
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
