"""The dispatcher's choice of node and its queue, in process, in milliseconds.

A real ``Dispatcher`` and ``NodeDirectory`` on the session's nats-server; heartbeats are real
``NodeHeartbeat`` structs published on the real subject; a "node" is a plain subscription on
its ``infer_on_node`` subject that answers real replies. No process is started.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from broker import connect, mirrors, provision
from broker.mirrors import NodeDirectory
from events import codec, encode_token, storage, subjects
from events.messages import Failure, InferenceRequest, LoadedModel, NodeGoodbye, NodeHeartbeat, TextDone, Usage
from gateway import dispatch
from gateway.dispatch import Call, ClientDisconnected, Dispatcher, QueueFull, QueueTimeout

CHAT = subjects.CHAT


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.002)


@dataclass
class FakeNode:
    """A node's inference subject and nothing else: it records what it got and answers
    ``TextDone`` (after ``delay_s``, once ``gate`` is open), or first ``busy`` times
    ``node_busy``, or first ``silent`` times nothing at all (a lost reply)."""

    node_id: str
    cluster: Cluster
    delay_s: float = 0.0
    busy: int = 0
    silent: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.gate.set()

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    async def on_request(self, msg) -> None:
        request = codec.decode(msg.data, InferenceRequest)
        self.seen.append(request.request_id)
        if self.silent:
            self.silent -= 1
            return
        if self.busy:
            self.busy -= 1
            busy = Failure(
                request_id=request.request_id,
                node_id=self.node_id,
                status=429,
                message="every slot is taken",
                type="rate_limit_error",
                code="node_busy",
            )
            await self.cluster.node_nc.publish(msg.reply, codec.encode(busy))
            return
        task = asyncio.create_task(self._answer(msg.reply, request.request_id))  # the callback must not block
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, inbox: str, request_id: str) -> None:
        await self.gate.wait()
        await asyncio.sleep(self.delay_s)
        done = TextDone(request_id=request_id, node_id=self.node_id, finish_reason="stop", usage=Usage(1, 1, 2))
        await self.cluster.node_nc.publish(inbox, codec.encode(done))


class Cluster:
    """One dispatcher (the gateway's connection) and fake nodes (their own connection)."""

    def __init__(self, gateway_nc, node_nc, directory: NodeDirectory, dispatcher: Dispatcher) -> None:
        self.gateway_nc, self.node_nc = gateway_nc, node_nc
        self.directory, self.dispatcher = directory, dispatcher
        self.model = f"unit-{uuid.uuid4().hex[:8]}"
        self.nodes: list[FakeNode] = []
        self.ghosts: list[str] = []  # announced, never subscribed
        self._clock = time.time()

    async def add_node(self, name: str, parallel: int = 1, **behaviour) -> FakeNode:
        node = FakeNode(f"{name}-{uuid.uuid4().hex[:6]}", self, **behaviour)
        await self.node_nc.subscribe(subjects.infer_on_node(CHAT, self.model, node.node_id), cb=node.on_request)
        await self.node_nc.flush()
        self.nodes.append(node)
        await self.beat(node.node_id, parallel=parallel)
        return node

    async def beat(self, node_id: str, *, parallel: int = 1, requests: list[str] | None = None) -> None:
        """Publish a heartbeat and wait until the directory has it."""
        self._clock += 0.001  # strictly later than the last one: the directory keeps the newest
        sent_at = self._clock
        beat = NodeHeartbeat(
            node_id=node_id,
            hostname="unit",
            started_at=0.0,
            sent_at=sent_at,
            interval_s=2.0,
            max_parallel=parallel,
            models=[
                LoadedModel(
                    name=self.model, runtime="llama_cpp", capabilities=[CHAT], artifact_bytes=1, parallel=parallel
                )
            ],
            requests=requests,
        )
        await self.node_nc.publish(subjects.node_heartbeat(node_id), codec.encode(beat))
        await until(lambda: any(b.node_id == node_id and b.sent_at == sent_at for b, _, _ in self.directory.known()))

    def call(self) -> Call:
        return self.dispatcher.call(CHAT, self.model, {"prompt": "hi"}, stream=False)

    async def ask(self, call: Call | None = None) -> TextDone:
        call = call or self.call()
        try:
            return await call.next()
        finally:
            await call.aclose()

    def start(self, call: Call | None = None) -> asyncio.Task:
        return asyncio.create_task(self.ask(call))

    async def held_node(self, call: Call | None = None) -> tuple[FakeNode, asyncio.Task]:
        """A one-slot node that got ``call`` (or a new one) and holds it: later calls wait in the gateway."""
        node = await self.add_node("one")
        node.hold()
        running = self.start(call)
        await until(lambda: len(node.seen) == 1)
        return node, running


@asynccontextmanager
async def cluster(nats_url: str, **settings) -> AsyncIterator[Cluster]:
    gateway_nc = await connect(nats_url, name="unit-gateway")
    node_nc = await connect(nats_url, name="unit-nodes")
    js = gateway_nc.jetstream()
    await provision(js)
    directory = NodeDirectory()
    await directory.start(gateway_nc, js)
    dispatcher = Dispatcher(gateway_nc, directory, **settings)
    await dispatcher.start()
    await gateway_nc.flush()
    c = Cluster(gateway_nc, node_nc, directory, dispatcher)
    try:
        yield c
    finally:
        for node in c.nodes:
            node.release()
        for node_id in [n.node_id for n in c.nodes] + c.ghosts:
            await node_nc.publish(subjects.node_goodbye(node_id), codec.encode(NodeGoodbye(node_id=node_id)))
        await dispatcher.stop()
        await directory.stop()
        await node_nc.drain()
        await gateway_nc.drain()


async def test_the_free_node_that_answered_fastest_gets_the_request(nats_url) -> None:
    async with cluster(nats_url) as c:
        slow = await c.add_node("slow", delay_s=0.15)
        fast = await c.add_node("fast", delay_s=0.005)
        # Two at once: one each (one slot per node), which measures both service times.
        first = await asyncio.gather(c.ask(), c.ask())
        assert sorted(r.node_id for r in first) == sorted([slow.node_id, fast.node_id])
        measured = c.dispatcher.service_s
        assert measured[(fast.node_id, c.model)] < measured[(slow.node_id, c.model)]
        for _ in range(3):
            assert (await c.ask()).node_id == fast.node_id
        fast.hold()  # its only slot taken: the slower node is free, so it answers
        held = c.start()
        await until(lambda: c.dispatcher.inflight[(fast.node_id, c.model)] == 1)
        assert (await c.ask()).node_id == slow.node_id
        fast.release()
        assert (await held).node_id == fast.node_id
        assert not c.dispatcher.inflight


async def test_a_full_node_queues_requests_in_order_and_serves_each_when_a_slot_frees(nats_url) -> None:
    async with cluster(nats_url) as c:
        calls = [c.call() for _ in range(3)]
        node, first = await c.held_node(calls[0])
        tasks = [first]
        for waiting, call in enumerate(calls[1:], start=1):
            tasks.append(c.start(call))
            await until(lambda waiting=waiting: c.dispatcher.waiting == waiting)
        assert node.seen == [calls[0].request_id]  # the others wait in the gateway, not on the node
        node.release()
        replies = await asyncio.gather(*tasks)
        assert all(r.node_id == node.node_id for r in replies)
        assert node.seen == [call.request_id for call in calls]  # first in, first out
        assert c.dispatcher.waiting == 0 and not c.dispatcher.inflight
        assert calls[1].waited_ms > 0 and calls[2].waited_ms > 0


async def test_a_full_queue_refuses_at_once(nats_url) -> None:
    async with cluster(nats_url, queue_size=1) as c:
        node, running = await c.held_node()
        queued = c.start()
        await until(lambda: c.dispatcher.waiting == 1)
        with pytest.raises(QueueFull) as err:
            await c.ask()
        assert err.value.size == 1
        node.release()
        await asyncio.gather(running, queued)
        assert len(node.seen) == 2


async def test_a_wait_past_the_queue_timeout_gives_up(nats_url) -> None:
    async with cluster(nats_url, queue_timeout=0.15) as c:
        node, running = await c.held_node()
        started = time.monotonic()
        with pytest.raises(QueueTimeout):
            await c.ask()
        assert time.monotonic() - started >= 0.15
        assert c.dispatcher.waiting == 0
        node.release()
        await running
        assert len(node.seen) == 1  # the timed-out call was never sent


async def test_node_busy_sends_the_request_again_and_skips_that_node_meanwhile(nats_url) -> None:
    async with cluster(nats_url) as c:
        busy = await c.add_node("busy", busy=1)  # another gateway holds its slot: it says so once
        call = c.call()
        reply = await c.ask(call)
        assert reply.node_id == busy.node_id
        assert busy.seen == [call.request_id, call.request_id]  # re-queued, then served
        assert call.waited_ms >= dispatch.BUSY_BACKOFF_S * 1000 * 0.9  # after the back-off, not at once
        assert not c.dispatcher.inflight

        other = await c.add_node("other", delay_s=0.05)  # slower: busy stays the first choice
        await c.ask()  # measures "other"; "busy" is faster
        busy.busy = 1
        call = c.call()
        reply = await c.ask(call)
        assert reply.node_id == other.node_id  # the busy node is skipped for the back-off
        assert busy.seen[-1] == call.request_id and other.seen[-1] == call.request_id


async def test_no_responders_retries_on_the_other_node(nats_url) -> None:
    async with cluster(nats_url) as c:
        alive = await c.add_node("alive")
        await c.ask()  # "alive" has a measured time; an unmeasured node is tried first
        ghost = f"ghost-{uuid.uuid4().hex[:6]}"  # heartbeats, but nothing subscribed: it died
        c.ghosts.append(ghost)
        await c.beat(ghost)
        call = c.call()
        reply = await c.ask(call)
        assert reply.node_id == alive.node_id
        assert call.excluded == {ghost}
        assert ghost not in {b.node_id for b in c.directory.live()}  # forgotten until its next beat


async def test_abandoning_a_queued_call_leaves_the_queue_at_once(nats_url) -> None:
    async with cluster(nats_url) as c:
        node, running = await c.held_node()
        call = c.call()
        queued = asyncio.create_task(call.next())
        await until(lambda: c.dispatcher.waiting == 1)
        call.abandon()
        with pytest.raises(ClientDisconnected):
            await asyncio.wait_for(queued, 0.1)
        assert c.dispatcher.waiting == 0
        await call.aclose()
        node.release()
        await running
        assert len(node.seen) == 1  # the abandoned call was never sent
        assert not c.dispatcher.inflight


async def test_two_heartbeats_after_the_send_without_the_request_mean_its_reply_was_lost(nats_url, monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "TICK_S", 0.02)  # the health check runs on every tick
    monkeypatch.setattr(mirrors, "LOST_MARGIN_S", 0.0)  # beats sent by hand, milliseconds apart
    async with cluster(nats_url) as c:
        node = await c.add_node("lossy", silent=1)
        await c.beat(node.node_id, requests=[])
        call = c.call()
        task = c.start(call)
        await until(lambda: len(node.seen) == 1)
        rid = call.request_id
        for _ in range(2):  # the node holds it: nothing is lost
            await c.beat(node.node_id, requests=[rid])
        await c.beat(node.node_id, requests=[])  # one beat without it may predate the request's arrival
        await asyncio.sleep(0.1)
        assert not task.done() and node.seen == [rid]
        await c.beat(node.node_id, requests=[])  # the second cannot: it finished it, and the reply is lost
        reply = await asyncio.wait_for(task, 1.0)
        assert reply.node_id == node.node_id
        assert node.seen == [rid, rid]  # sent again, to the same node: it is fine
        assert call.excluded == set()


async def test_lost_needs_two_listing_beats_received_after_the_send(nats_url, monkeypatch) -> None:
    monkeypatch.setattr(mirrors, "LOST_MARGIN_S", 0.0)
    async with cluster(nats_url) as c:
        d = c.directory
        old = f"old-{uuid.uuid4().hex[:6]}"  # a node that does not report its requests
        c.ghosts.append(old)
        await c.beat(old)
        await c.beat(old)
        assert not d.lost(old, "r1", 0.0)
        node = f"new-{uuid.uuid4().hex[:6]}"
        c.ghosts.append(node)
        await c.beat(node, requests=["r0"])
        sent = time.monotonic()
        await c.beat(node, requests=["r0"])
        assert not d.lost(node, "r1", sent)  # the beat before this one came before the send
        await c.beat(node, requests=["r1"])
        assert not d.lost(node, "r1", sent)  # it knows the request
        await c.beat(node, requests=[])
        assert not d.lost(node, "r1", sent)  # the one before listed it
        await c.beat(node, requests=[])
        assert d.lost(node, "r1", sent)
        assert not d.lost(node, "r1", time.monotonic())  # sent after both beats: nothing to tell yet


async def test_a_beat_read_again_from_the_nodes_bucket_counts_once(nats_url, monkeypatch) -> None:
    """After a reconnection the gateway re-reads the nodes bucket (NodeDirectory.resync); a beat
    it has already received live must not come back as a second one, or one beat without a
    request would be taken for two and the request sent again while the node still runs it."""
    monkeypatch.setattr(mirrors, "LOST_MARGIN_S", 0.0)
    async with cluster(nats_url) as c:
        node = f"again-{uuid.uuid4().hex[:6]}"
        c.ghosts.append(node)
        sent = time.monotonic()
        await c.beat(node, requests=[])
        kv = await c.gateway_nc.jetstream().key_value(storage.KV_NODES)
        await kv.put(encode_token(node), codec.encode(c.directory._nodes[node].beat))  # as the node writes it
        try:
            await c.directory.resync(c.gateway_nc.jetstream())
            assert not c.directory.lost(node, "r1", sent)  # still one beat without it
            await c.beat(node, requests=[])
            assert c.directory.lost(node, "r1", sent)
        finally:
            await kv.delete(encode_token(node))


def test_beats_right_after_the_send_never_count_as_a_lost_reply() -> None:
    """A node beats at once on some events: two beats built before the request arrived omit it,
    and must not make the gateway send it again (it would run twice)."""
    directory = NodeDirectory()

    def beat(requests: list[str], seen: float) -> None:
        directory._remember(
            NodeHeartbeat(node_id="n", hostname="h", started_at=0, sent_at=seen, interval_s=2, requests=requests), seen
        )

    sent = time.monotonic()
    beat([], sent + 0.01)
    beat([], sent + 0.02)
    assert not directory.lost("n", "r1", sent)  # within the margin
    beat([], sent + mirrors.LOST_MARGIN_S + 0.1)
    beat([], sent + mirrors.LOST_MARGIN_S + 0.2)
    assert directory.lost("n", "r1", sent)
    beat(["r1"], sent + mirrors.LOST_MARGIN_S + 0.3)
    assert not directory.lost("n", "r1", sent)
