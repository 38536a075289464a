"""Load-aware dispatch, the bounded queue, failover and drain, with real nodes.

Timing-sensitive tests run nodes of ``bench/stack.py`` whose engine takes a fixed time per
request (``--delay-ms``, the bench-only engine); the stream test runs the tiny llama.cpp model.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from conftest import Proc, Stack, wait_until

pytestmark = pytest.mark.e2e

MODEL = "dispatch-tiny"


def chat(url: str, max_tokens: int = 8, *, timeout: float = 60) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def nodes(stack: Stack) -> dict[str, dict]:
    return {n["id"]: n for n in httpx.get(stack.url + "/v0/nodes").json()["data"]}


def running_on(stack: Stack) -> str:
    """The node holding the one request in flight (waits for it to be sent)."""
    return wait_until(
        lambda: next((i for i, n in nodes(stack).items() if n["gateway_inflight"]), None), message="request running"
    )


def delay_node(stack: Stack, delay_ms: float, parallel: int = 1) -> Proc:
    """A node whose engine answers every request after ``delay_ms`` (stopped with the stack)."""
    proc = stack.delay_node(delay_ms, parallel=parallel)
    stack.extra_nodes.append(proc)
    return proc


@pytest.fixture
def stack(nats_url, tiny_gguf, tmp_path):
    """registry + gateway with no node yet; the test adds the nodes it needs."""
    stack = Stack(nats_url, tmp_path, node=False, gateway_args=("--queue-size", "1", "--queue-timeout", "0.6"))
    stack.extra_nodes = []
    assert stack.register(tiny_gguf, MODEL)["ok"]
    yield stack
    for node in stack.extra_nodes:
        if node.popen.poll() is None:
            node.stop()
    stack.close()


def serving(stack: Stack, count: int) -> None:
    wait_until(
        lambda: len(httpx.get(f"{stack.url}/v0/models/{MODEL}").json()["nodes"]) == count,
        message=lambda: f"{count} node(s) serving; {stack.diagnosis()}",
    )


def test_queue_full_is_429_and_a_long_wait_is_504(stack) -> None:
    node = delay_node(stack, 1500)
    serving(stack, 1)
    first, first_result = in_background(chat, stack.url)  # holds the only slot for 1.5 s
    assert running_on(stack) == node.node_id
    waiting, waiting_result = in_background(chat, stack.url)
    wait_until(lambda: httpx.get(stack.url + "/v0/nodes").json()["queue"]["waiting"] == 1, message="one waiting")
    full = chat(stack.url)
    assert full.status_code == 429 and full.headers["retry-after"]
    assert full.json()["error"]["code"] == "queue_full"
    waiting.join()
    assert waiting_result[0].status_code == 504 and waiting_result[0].json()["error"]["code"] == "queue_timeout"
    first.join()
    assert first_result[0].status_code == 200 and "x-queue-wait-ms" not in first_result[0].headers


def test_a_request_that_waited_says_how_long(nats_url, tiny_gguf, tmp_path) -> None:
    stack = Stack(nats_url, tmp_path, node=False, gateway_args=("--queue-timeout", "10"))
    stack.extra_nodes = []
    try:
        assert stack.register(tiny_gguf, MODEL)["ok"]
        delay_node(stack, 500)
        serving(stack, 1)
        first, _ = in_background(chat, stack.url)
        running_on(stack)
        queued = chat(stack.url)
        assert queued.status_code == 200
        assert int(queued.headers["x-queue-wait-ms"]) > 100 and queued.headers["x-queue-status"] == "queued"
        first.join()
        assert httpx.get(stack.url + "/v0/nodes").json()["queue"]["waiting"] == 0
    finally:
        for node in stack.extra_nodes:
            node.stop()
        stack.close()


def test_requests_go_to_the_faster_free_node_not_round_robin(stack) -> None:
    fast, slow = delay_node(stack, 30), delay_node(stack, 600)
    serving(stack, 2)
    answers = [chat(stack.url) for _ in range(12)]  # one at a time: both nodes are always free
    assert all(a.status_code == 200 for a in answers)
    used = [a.headers["x-node-id"] for a in answers]
    # Each node is tried once while unmeasured; after that the faster one gets the work.
    assert used.count(slow.node_id) <= 1 and used.count(fast.node_id) >= 11, used
    # Two at once: the second goes to the node that is free, slow or not.
    both = [in_background(chat, stack.url) for _ in range(2)]
    for thread, _ in both:
        thread.join()
    assert {result[0].headers["x-node-id"] for _, result in both} == {fast.node_id, slow.node_id}


def test_killed_node_during_a_request_is_answered_by_the_other(stack) -> None:
    first, second = delay_node(stack, 2000), delay_node(stack, 2000)
    serving(stack, 2)
    request, result = in_background(chat, stack.url)
    victim = running_on(stack)
    next(p for p in (first, second) if p.node_id == victim).kill()  # SIGKILL: no goodbye, no answer
    request.join(60)
    answer = result[0]
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-node-id"] != victim
    wait_until(lambda: nodes(stack)[victim]["state"] == "offline", timeout=15, message="victim listed offline")
    assert all(n["gateway_inflight"] == 0 for n in nodes(stack).values())


def test_killed_node_during_a_stream_ends_it_with_an_error_event(stack) -> None:
    pair = [delay_node(stack, 3000), delay_node(stack, 3000)]  # stream their text, then take 3 s to finish
    serving(stack, 2)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": True}
    events = []
    with httpx.stream("POST", stack.url + "/v1/chat/completions", json=body, timeout=60) as response:
        victim = response.headers["x-node-id"]
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if '"content":"pong"' in line:  # a token has reached the client: now the node dies
                next(p for p in pair if p.node_id == victim).kill()
    assert any('"content":"pong"' in e for e in events)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "node_unavailable" and victim in error["message"]


def test_drain_finishes_running_work_and_takes_no_new(stack) -> None:
    first, second = delay_node(stack, 1200), delay_node(stack, 1200)
    serving(stack, 2)
    request, result = in_background(chat, stack.url)
    drained = running_on(stack)
    other = second.node_id if drained == first.node_id else first.node_id
    reply = httpx.post(f"{stack.url}/v0/nodes/{drained}/drain")
    assert reply.status_code == 200
    assert reply.json()["state"] == "draining" and reply.json()["active_requests"] == 1
    assert nodes(stack)[drained]["state"] == "draining"
    assert {chat(stack.url).headers["x-node-id"] for _ in range(2)} == {other}
    request.join()
    assert result[0].status_code == 200 and result[0].headers["x-node-id"] == drained  # finished, not cut
    wait_until(lambda: nodes(stack)[drained]["state"] == "drained", timeout=5, message="drained reported")
    assert httpx.post(f"{stack.url}/v0/nodes/{drained}/resume").json()["state"] == "online"
    assert httpx.post(f"{stack.url}/v0/nodes/nobody/drain").status_code == 404


def test_a_node_without_gpu_needs_allow_cpu(spawn, nats_url, tmp_path) -> None:
    node = spawn("node", "--nats-url", nats_url, "--data-dir", str(tmp_path))
    assert node.popen.wait(30) == 1
    assert "no GPU found" in node.output() and "--allow-cpu" in node.output()


def test_two_gateways_share_one_node_without_overloading_it(nats_url, tiny_gguf, tmp_path) -> None:
    stack = Stack(nats_url, tmp_path, node=False)  # default queue: 100 requests, 60 s
    stack.extra_nodes = []
    other = Proc(["gateway", "--nats-url", stack.nats_url, "--port", "0", "--no-auth"])
    try:
        assert stack.register(tiny_gguf, MODEL)["ok"]
        node = delay_node(stack, 800)  # one slot
        serving(stack, 1)
        other_url = other.wait_for(r"gateway ready: (http://\S+)/v1").group(1)
        wait_until(
            lambda: httpx.get(f"{other_url}/v0/models/{MODEL}").json()["nodes"], message="second gateway sees the node"
        )
        calls = [in_background(chat, url) for url in (stack.url, other_url, stack.url, other_url)]
        for thread, _ in calls:
            thread.join()
        answers = [result[0] for _, result in calls]
        # Neither gateway knows the other's work: the node refuses what it cannot start
        # (node_busy) and the refused gateway queues the request again, so all are answered.
        assert [a.status_code for a in answers] == [200] * 4
        assert {a.headers["x-node-id"] for a in answers} == {node.node_id}
    finally:
        other.stop()
        for proc in stack.extra_nodes:
            proc.stop()
        stack.close()
