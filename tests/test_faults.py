"""Faults are normal: a protocol error, a broker restart under load, clients that give up.

Every test runs real processes (nats-server, registry, gateway, nodes) and breaks them for real:
a server ``-ERR``, ``kill -9`` of nats-server, clients that time out.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import nats
import pytest
from conftest import Proc, Stack, requires_llama, wait_until, wait_until_async
from nats.aio.client import Client

from broker import EmbeddedNats, connect
from broker.connection import SubjectTooLong
from events import MAX_NAME_BYTES, subjects
from gateway.dispatch import BROKER_GRACE_S

pytestmark = pytest.mark.e2e

MODEL = "faults-tiny"


def _why_not_ready(stack: Stack, node: Proc) -> str:
    """What the node printed and what the gateway knows, when a model never becomes ready."""
    nodes = httpx.get(stack.url + "/v0/nodes").text[:1500]
    model = httpx.get(stack.url + "/v0/models/" + MODEL).text[:800]
    return f"model ready; node: {node.output()[-2000:]}; nodes: {nodes}; model: {model}"


def chat(url: str, model: str = MODEL, *, max_tokens: int = 4, timeout: float = 30.0) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ protocol errors


async def test_a_server_error_reconnects_the_client_with_its_subscriptions(nats_url) -> None:
    """nats-py closes its client for good on a server -ERR; ours reconnects and replays."""
    nc = await connect(nats_url, name="test-err")
    try:

        async def echo(msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("test.err.echo", cb=echo)
        with pytest.raises(SubjectTooLong):  # refused before the wire: nothing happens to the link
            await nc.publish("x" * 5000, b"")
        assert nc.is_connected
        # Bypass our check, as a path we forgot would: the server answers -ERR and drops us.
        await Client.publish(nc, "test." + "x" * 5000, b"")
        deadline = time.monotonic() + 10
        while (nc.stats["reconnects"] < 1 or not nc.is_connected) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert nc.stats["reconnects"] >= 1 and nc.is_connected and not nc.is_closed
        reply = await nc.request("test.err.echo", b"still here", timeout=5)
        assert reply.data == b"still here"
    finally:
        await nc.close()


@requires_llama
async def test_a_flush_is_a_barrier_for_the_subscriptions_sent_before_it(nats_url) -> None:
    """A component says it is ready after a flush; a publish from another connection right then
    must reach its new subscription. (nats-py's own flush can lose that race: its PING jumps
    ahead of the buffered SUB.)"""
    rounds = 3000
    listener = await connect(nats_url, name="test-barrier-listener")
    talker = await connect(nats_url, name="test-barrier-talker")
    got: list[str] = []

    async def heard(msg) -> None:
        got.append(msg.subject)

    try:
        for round_ in range(rounds):
            await listener.subscribe(f"test.barrier.{round_}", cb=heard)
            await listener.flush()
            await talker.publish(f"test.barrier.{round_}", b"")
        await talker.flush()
        deadline = asyncio.get_running_loop().time() + 5
        while len(got) < rounds and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert len(got) == rounds, f"{rounds - len(got)} publishes reached the server before their subscription"
    finally:
        await talker.close()
        await listener.close()


async def test_payloads_come_through_the_one_copy_receive_buffer_whole(nats_url) -> None:
    """The client's parser slices payloads out of its buffer as memoryviews (one copy, not
    two): every size, with and without headers, arrives as the bytes that were sent."""
    listener = await connect(nats_url, name="test-payloads-listener")
    talker = await connect(nats_url, name="test-payloads-talker")
    got: list = []

    async def heard(msg) -> None:
        got.append((msg.data, msg.headers))

    largest = min(3 * 1024 * 1024 + 7, listener.max_payload - 1024)  # the fixture's server takes 8 MiB
    sizes = [0, 1, 2, 4093, 65537, 1024 * 1024 - 4096, min(1024 * 1024, largest), largest]
    sent = []
    try:
        assert type(listener._ps.buf).__name__ == "_PayloadBuffer"
        await listener.force_reconnect()  # the parser is reset on every connection: still installed
        await wait_until_async(lambda: listener.is_connected, message="reconnected")
        assert type(listener._ps.buf).__name__ == "_PayloadBuffer"
        await listener.subscribe("test.payloads", cb=heard)
        await listener.flush()
        for index, size in enumerate(sizes * 2):
            payload = os.urandom(size)
            headers = {"Index": str(index)} if index % 2 else None
            sent.append((payload, headers))
            await talker.publish("test.payloads", payload, headers=headers)
        await talker.flush()
        deadline = asyncio.get_running_loop().time() + 10
        while len(got) < len(sent) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert [len(data) for data, _ in got] == [len(data) for data, _ in sent]
        for (data, headers), (payload, sent_headers) in zip(got, sent, strict=True):
            assert type(data) is bytes and data == payload
            assert headers == sent_headers
    finally:
        await talker.close()
        await listener.close()


def test_an_over_long_model_name_is_refused_and_the_gateway_keeps_serving(nats_url, tiny_gguf, tmp_path) -> None:
    stack = Stack(nats_url, tmp_path)
    try:
        stack.serve(tiny_gguf, MODEL)
        long_name = "m" * 5000
        for path, body in (
            ("/v1/chat/completions", {"model": long_name, "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"model": long_name, "prompt": "hi"}),
            ("/v1/embeddings", {"model": long_name, "input": "hi"}),
            ("/v1/audio/speech", {"model": long_name, "input": "hi", "voice": "x"}),
            ("/v1/images/generations", {"model": "é" * (MAX_NAME_BYTES // 2 + 1), "prompt": "x"}),
        ):
            answer = httpx.post(stack.url + path, json=body, timeout=10)
            assert answer.status_code == 400, (path, answer.text)
            error = answer.json()["error"]
            assert error["param"] == "model" and error["code"] == "invalid_model", error
        for path in ("/v1/models/" + long_name, "/v0/models/" + long_name):
            assert httpx.get(stack.url + path, timeout=10).status_code == 404
        health = httpx.get(stack.url + "/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["nats"] == "connected"
        assert chat(stack.url).status_code == 200
        assert "nats error" not in stack.gateway.output()
    finally:
        stack.close()


# ------------------------------------------------------------------ broker restart


def _history_ids(url: str) -> set[str]:
    """Every request id in the HISTORY stream."""

    async def read() -> set[str]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            info = await js.stream_info("HISTORY")
            ids: set[str] = set()
            if info.state.messages == 0:
                return ids
            sub = await js.subscribe("history.>", ordered_consumer=True)
            while len(ids) < info.state.messages:
                msg = await sub.next_msg(timeout=5)
                ids.add(json.loads(msg.data)["id"])
            await sub.unsubscribe()
            return ids
        finally:
            await nc.close()

    return asyncio.run(read())


class Load:
    """``clients`` threads looping short chats, each answer noted with its time and status."""

    def __init__(self, url: str, clients: int = 4, timeout: float = 30.0) -> None:
        self.url = url
        self.timeout = timeout
        self.results: list[tuple[float, float, int, str, dict]] = []  # (start, end, status, id, headers)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 4}
                try:
                    answer = client.post(self.url + "/v1/chat/completions", json=body)
                    status, rid, headers = (
                        answer.status_code,
                        answer.headers.get("x-request-id", ""),
                        dict(answer.headers),
                    )
                except httpx.HTTPError as exc:
                    status, rid, headers = -1, "", {"error": repr(exc)}
                self.results.append((started, time.monotonic(), status, rid, headers))
                if status != 200:
                    time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)


@requires_llama
def test_kill_9_of_nats_under_load_recovers_in_seconds_and_loses_no_history(tiny_gguf, tmp_path) -> None:
    store = tmp_path / "nats"
    port = free_port()
    server = EmbeddedNats(store, port=port)
    url = server.start_sync()
    stack = Stack(url, tmp_path)
    load = None
    try:
        stack.serve(tiny_gguf, MODEL)
        load = Load(stack.url)
        time.sleep(2.0)
        server._proc.kill()  # kill -9: nothing flushed, every connection cut
        server._proc.wait()
        killed = time.monotonic()
        time.sleep(4.0)  # longer than the gateway's grace for a lost link (BROKER_GRACE_S)
        during = httpx.get(stack.url + "/healthz", timeout=5)
        server = EmbeddedNats(store, port=port)
        server.start_sync()
        restarted = time.monotonic()
        time.sleep(8.0)
        load.stop()
        results = load.results

        # During the outage: fast 503s with Retry-After, nothing hangs to the client's timeout.
        assert during.status_code == 503 and during.json()["nats"] in ("reconnecting", "disconnected")
        assert all(end - start < 12 for start, end, *_ in results), max(end - start for start, end, *_ in results)
        failed = [r for r in results if r[2] != 200]
        assert all(r[2] == 503 and "retry-after" in r[4] for r in failed), failed[:5]
        # A request that arrives while the link is down waits at most the grace, then 503. (One in
        # flight at the kill may take longer: its reply is found lost after the restart, then sent
        # again; it still ends as a 200 or a clean 503, never at the client's timeout.)
        arrived_down = [r for r in failed if killed + 0.5 <= r[0] < restarted]
        assert all(end - start < BROKER_GRACE_S + 1.5 for start, end, *_ in arrived_down), arrived_down[:5]
        # Serving again within 5 s of the restart, and steadily afterwards.
        after = [r for r in results if r[0] >= restarted]
        failures = [(round(a - restarted, 2), status) for a, b, status, *_ in results if status != 200]
        first_ok = min(end for start, end, status, *_ in after if status == 200)
        # Issue 11 asked for 5 s. About 1.2 s on a quiet machine: the node beats at once and again
        # half a second later, so a gateway finds the replies the old server lost within a second.
        assert first_ok - restarted < 5, (first_ok - restarted, failures[-20:])
        late = [r for r in results if r[0] >= restarted + 5]
        assert late and all(r[2] == 200 for r in late), [r[2] for r in late]
        # No slot left held by a reply lost in the outage.
        nodes = httpx.get(stack.url + "/v0/nodes", timeout=5).json()
        assert nodes["queue"]["waiting"] == 0 and all(n["gateway_inflight"] == 0 for n in nodes["data"]), nodes
        # Every answered request is in history, including those recorded during the outage.
        answered = {r[3] for r in results if r[3]}
        assert any(r[2] == 503 and killed <= r[0] < restarted for r in results)
        wait_until(
            lambda: httpx.get(stack.url + "/healthz").json()["history"]["pending"] == 0, message="history written"
        )
        missing = answered - _history_ids(url)
        assert not missing, f"{len(missing)} of {len(answered)} history records missing"
        assert httpx.get(stack.url + "/healthz").json()["history"]["dropped"] == 0
    finally:
        if load is not None:
            load.stop()
        stack.close()
        server.stop_sync()


# ------------------------------------------------------------------ clients that give up


def test_clients_that_give_up_leave_the_queue_and_free_the_node(nats_url, tiny_gguf, tmp_path) -> None:
    stack = Stack(nats_url, tmp_path, node=False, gateway_args=("--queue-timeout", "30"))
    node = None
    try:
        assert stack.register(tiny_gguf, MODEL)["ok"]
        node = stack.delay_node(4000)  # one slot; every request would hold it 4 s
        wait_until(lambda: MODEL in stack.models(), message=lambda: _why_not_ready(stack, node))

        def impatient() -> None:
            with pytest.raises(httpx.TimeoutException):
                chat(stack.url, timeout=1.0)

        threads = [threading.Thread(target=impatient) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # Six abandoned requests were 24 s of work; none of it may run or wait any longer.
        wait_until(
            lambda: httpx.get(stack.url + "/v0/nodes").json()["queue"]["waiting"] == 0, timeout=3, message="queue empty"
        )
        started = time.monotonic()
        fresh = chat(stack.url, timeout=30)
        took = time.monotonic() - started
        assert fresh.status_code == 200
        assert took < 4.0 + 1.5, (
            f"a new request waited {took:.1f} s behind abandoned work; node: {node.output()[-3000:]}; gateway: {stack.gateway.output()[-3000:]}"
        )
        assert "x-queue-wait-ms" not in fresh.headers or int(fresh.headers["x-queue-wait-ms"]) < 1000

        def abandoned() -> int:
            return sum(1 for rid in _history_statuses(stack.nats_url).values() if rid == 499)

        wait_until(lambda: abandoned() >= 6, timeout=10, message="six 499 records")
    finally:
        if node is not None:
            node.stop()
        stack.close()


def _history_statuses(url: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            found: dict[str, int] = {}
            sub = await js.subscribe(subjects.history_filter("chat", MODEL), ordered_consumer=True)
            while True:  # until the stream has nothing more for half a second
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    break
                record = json.loads(msg.data)
                found[record["id"]] = record["status_code"]
            await sub.unsubscribe()
            return found
        finally:
            await nc.close()

    return asyncio.run(read())


# ------------------------------------------------------------------ discovery


@requires_llama
def test_nodes_the_registry_and_gateways_answer_nats_micro_discovery(nats_url, tiny_gguf, tmp_path) -> None:
    """`nats micro ls|info|stats` work on our components: the endpoint layer speaks the micro protocol."""
    stack = Stack(nats_url, tmp_path)
    try:
        stack.serve(tiny_gguf, MODEL)
        assert chat(stack.url).status_code == 200

        async def ask() -> tuple[list[dict], dict, dict]:
            nc = await nats.connect(nats_url)
            try:
                inbox = nc.new_inbox()
                sub = await nc.subscribe(inbox)
                await nc.publish("$SRV.PING", b"", reply=inbox)
                pings = []
                while True:
                    try:
                        pings.append(json.loads((await sub.next_msg(timeout=0.5)).data))
                    except nats.errors.TimeoutError:
                        break
                node = next(
                    p
                    for p in pings
                    if p["name"] == "llm-router-node" and p["metadata"]["node_id"] == stack.node.node_id
                )
                info = json.loads((await nc.request(f"$SRV.INFO.llm-router-node.{node['id']}", b"", timeout=5)).data)
                stats = json.loads((await nc.request(f"$SRV.STATS.llm-router-node.{node['id']}", b"", timeout=5)).data)
                gateways = [p for p in pings if p["name"] == "llm-router-gateway"]
                healths = []
                for gateway in gateways:  # the health endpoint each gateway's service lists
                    ginfo = json.loads((await nc.request(f"$SRV.INFO.llm-router-gateway.{gateway['id']}", b"")).data)
                    (health,) = [e["subject"] for e in ginfo["endpoints"] if e["name"] == "health"]
                    healths.append(json.loads((await nc.request(health, b"", timeout=5)).data))
                return pings, info, stats, healths
            finally:
                await nc.close()

        pings, info, stats, healths = asyncio.run(ask())
        assert {"llm-router-node", "llm-router-registry", "llm-router-gateway"} <= {p["name"] for p in pings}
        ours = [h for h in healths if h["url"] == stack.url]
        assert ours and ours[0]["status"] == "ok" and ours[0]["nodes"] >= 1, healths
        assert info["type"] == "io.nats.micro.v1.info_response"
        chat_endpoints = [e for e in info["endpoints"] if e["name"] == "chat" and e["metadata"]["model"] == MODEL]
        assert {e["queue_group"] for e in chat_endpoints} == {"nodes", ""}
        served = sum(e["num_requests"] for e in stats["endpoints"] if e["name"] == "chat")
        assert served >= 1 and all(e["num_errors"] == 0 for e in stats["endpoints"] if e["name"] == "chat")
    finally:
        stack.close()


@requires_llama
def test_a_fresh_nats_server_with_an_empty_store_is_provisioned_again(tiny_gguf, tmp_path) -> None:
    """The server comes back without its data: streams, buckets and the node's durable consumer
    are created again by the components, and a registration made afterwards is served."""
    port = free_port()
    server = EmbeddedNats(tmp_path / "nats-a", port=port)
    url = server.start_sync()
    stack = Stack(url, tmp_path)
    try:
        stack.serve(tiny_gguf, MODEL)
        server._proc.kill()
        server._proc.wait()
        server = EmbeddedNats(tmp_path / "nats-b", port=port)  # a new, empty store
        server.start_sync()
        wait_until(lambda: httpx.get(stack.url + "/healthz").status_code == 200, message="gateway connected")
        # The registration was in the lost store: the gateway's mirror follows the new one.
        wait_until(lambda: MODEL not in stack.models(), timeout=15, message="registration gone with the store")
        wait_until(lambda: stack.register(tiny_gguf, MODEL).get("ok"), timeout=30, message="registry provisioned again")
        wait_until(lambda: chat(stack.url).status_code == 200, timeout=30, message=lambda: stack.node.output()[-3000:])
        assert "registry consumer lost with the server's store" in stack.node.output()
        assert set(_history_ids(url)), "HISTORY was created again and is written"
    finally:
        stack.close()
        server.stop_sync()


def test_a_stream_whose_client_leaves_at_once_frees_its_slot(nats_url, tiny_gguf, tmp_path) -> None:
    """The client is gone before the first chunk is written: Starlette cancels the response before
    its generator starts, and the call must still be closed (slot, inbox, cancel on the node)."""
    stack = Stack(nats_url, tmp_path, node=False)
    node = None
    try:
        assert stack.register(tiny_gguf, MODEL)["ok"]
        node = stack.delay_node(3000)
        wait_until(lambda: MODEL in stack.models(), message=lambda: _why_not_ready(stack, node))
        host, port = stack.url.removeprefix("http://").split(":")
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": True}).encode()
        for _ in range(3):
            with socket.create_connection((host, int(port))) as sock:
                head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.3)

        def held() -> int:
            return sum(n["gateway_inflight"] for n in httpx.get(stack.url + "/v0/nodes").json()["data"])

        wait_until(lambda: held() == 0, timeout=5, message=lambda: f"{held()} slot(s) still held")
        started = time.monotonic()
        assert chat(stack.url, timeout=30).status_code == 200
        assert time.monotonic() - started < 3.0 + 2.0  # its own 3 s, not behind abandoned streams
    finally:
        if node is not None:
            node.stop()
        stack.close()
