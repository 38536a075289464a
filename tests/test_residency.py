"""On-demand loading within a node's memory budget, with real processes and real llama.cpp.

Three tiny models whose 2048-token context makes each take about 22 MiB (llama.cpp's
attention buffers); a node whose budget is 50 MiB holds two of them. Requests to all three
are all answered: a request for the third waits in the gateway's queue while the node unloads
the least recently used idle model and loads it (``x-queue-wait-ms``), and a model with a
request in flight is never the one unloaded.
"""

from __future__ import annotations

import threading

import httpx
import pytest
from conftest import Stack, requires_llama, wait_until

from nodes.demo_model import write_tiny_gguf

pytestmark = [pytest.mark.e2e, requires_llama]

MODELS = ["mem-a", "mem-b", "mem-c"]
BUDGET = "50MiB"


def node_view(stack: Stack) -> dict:
    return httpx.get(stack.url + "/v0/nodes").json()["data"][0]


def loaded(stack: Stack) -> set[str]:
    return {m["name"] for m in node_view(stack)["models"] if m["state"] == "ready"}


def chat(stack: Stack, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    return httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=60)


@pytest.fixture
def stack(private_nats_url, tmp_path):
    stack = Stack(private_nats_url, tmp_path, node=False)  # no other test's models to place on the node
    stack.start_node("mem", "--memory-budget", BUDGET)
    for seed, name in enumerate(MODELS):
        path = write_tiny_gguf(tmp_path / f"{name}.gguf", seed=seed, context_length=2048)
        assert stack.register(path, name)["ok"]
    # The registry places every model where it fits: two are loaded, the third waits on disk.
    wait_until(
        lambda: len(loaded(stack)) == 2 and len(node_view(stack)["loadable"]) == 1,
        message=lambda: f"two loaded, one loadable: {node_view(stack)}",
    )
    yield stack
    stack.close()


def test_three_models_in_a_budget_for_two_take_turns_least_recently_used_out(stack) -> None:
    view = node_view(stack)
    ram = next(d for d in view["memory"] if d["device"] == "ram")
    assert ram["budget_bytes"] == 50 * 1024**2 and 0 < ram["used_bytes"] <= ram["budget_bytes"]
    for model in view["models"]:  # measured after load, near the estimate made before it
        assert abs(model["memory_bytes"]["ram"] - model["estimate_bytes"]["ram"]) < 0.25 * model["memory_bytes"]["ram"]

    used: list[str] = []  # least recently used first
    for name in sorted(loaded(stack)):  # use the two loaded ones first: the test knows the order
        answer = chat(stack, name)
        assert answer.status_code == 200, answer.text
        assert "x-queue-wait-ms" not in answer.headers  # loaded: no cold start
        used.append(name)
    cold_waits = []
    for name in MODELS * 3:
        before = loaded(stack)
        answer = chat(stack, name)
        assert answer.status_code == 200, answer.text
        after = loaded(stack)
        assert len(after) <= 2, after
        if name not in before:
            victim = next(m for m in used if m in before)  # the least recently used of those loaded
            assert after == (before - {victim}) | {name}, (name, before, after, used)
            cold_waits.append(float(answer.headers["x-queue-wait-ms"]))
        used = [m for m in used if m != name] + [name]
    assert len(cold_waits) >= 5  # every turn of three models in two places is a swap
    assert all(wait > 0 for wait in cold_waits)


def test_a_model_with_a_request_in_flight_is_never_unloaded(stack) -> None:
    first, second = sorted(loaded(stack))
    third = next(m for m in MODELS if m not in (first, second))
    assert chat(stack, first).status_code == 200
    assert chat(stack, second).status_code == 200  # `first` is now the least recently used
    # A long answer on `first` (seconds: 8 choices of 1900 tokens each, about 5 s on two CPU
    # cores; the generation loop runs thousands of tokens a second on this tiny model, so 400
    # tokens, once enough, now take under 0.1 s): its end tokens made impossible, each choice
    # runs to max_tokens.
    result: list[httpx.Response] = []
    long = {"n": 8, "max_tokens": 1900, "logit_bias": {"2": -100, "4": -100}}  # </s> and <|im_end|>
    worker = threading.Thread(target=lambda: result.append(chat(stack, first, **long)), daemon=True)
    worker.start()
    wait_until(
        lambda: any(m["name"] == first and m["active_requests"] for m in node_view(stack)["models"]),
        message="the long request running",
    )
    answer = chat(stack, third)  # needs room: `first` is older but busy, so `second` goes
    assert answer.status_code == 200, answer.text
    assert not result, "the long request ended before the swap; the test proves nothing"
    assert loaded(stack) == {first, third}
    worker.join(60)
    assert result and result[0].status_code == 200, result
    assert result[0].json()["usage"]["completion_tokens"] == 8 * 1900


def test_a_model_larger_than_the_budget_is_refused_with_the_numbers(stack, tmp_path) -> None:
    path = write_tiny_gguf(tmp_path / "huge.gguf", seed=9, context_length=8192)  # ~85 MiB at 8k tokens
    assert stack.admin("register", {"path": str(path), "name": "mem-huge", "labels": {"n_ctx": "8192"}})["ok"]
    wait_until(
        lambda: httpx.get(stack.url + "/v0/models/mem-huge").json()["state"] == "error", message="refused by the node"
    )
    answer = chat(stack, "mem-huge")
    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert "50.0 MiB" in message and "budget" in message and "--memory-budget" in message, message
    assert loaded(stack) <= set(MODELS)  # nothing was unloaded for it
