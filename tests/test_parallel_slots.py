"""``--parallel N`` on llama.cpp runs N requests at once, each in a context of its own.

One llama.cpp context is not thread-safe: two generations in one crashed the node process
without a log line. These tests run real concurrent generations, in the engine and through
gateway -> NATS -> node, and check that each slot really runs while the other does.
"""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import Stack, requires_llama, wait_until

from events.openai import ChatCompletionBody, ChatMessage, EmbeddingBody
from nodes.demo_model import write_tiny_gguf
from nodes.runtimes.llama_cpp import LlamaEngine

pytestmark = [pytest.mark.e2e, requires_llama]

MODEL = "slots-tiny"
# Tokens 2 (</s>) and 4 (<|im_end|>) end a generation of the tiny model: forbidding them makes
# it run to max_tokens.
NO_END = {"2": -100.0, "4": -100.0}


def _greedy(prompt: str, max_tokens: int) -> ChatCompletionBody:
    return ChatCompletionBody(
        model=MODEL,
        messages=[ChatMessage(role="user", content=prompt)],
        max_tokens=max_tokens,
        temperature=0.0,
        seed=1,
        logit_bias=NO_END,
    )


def test_engine_runs_two_chats_at_once_in_separate_contexts(tiny_gguf) -> None:
    """Both threads must be mid-generation together (the barrier), and each text must be the
    one that prompt gives alone: a shared or mixed-up KV cache would change it."""
    prompts = ["hello there", "a different prompt"]
    alone = {}
    for prompt in prompts:
        single = LlamaEngine(str(tiny_gguf), n_ctx=512, n_threads=1)
        assert single.slots == 1
        alone[prompt] = single.chat(_greedy(prompt, 40), None, threading.Event()).text
        single.close()
    assert alone[prompts[0]] != alone[prompts[1]]

    engine = LlamaEngine(str(tiny_gguf), n_ctx=512, n_threads=1, slots=2)
    assert engine.slots == 2
    both_generating = threading.Barrier(2, timeout=30)

    def run(prompt: str) -> str:
        met = []

        def on_delta(text: str) -> None:
            if not met:
                met.append(True)
                both_generating.wait()  # BrokenBarrierError unless the other chat is generating too

        return engine.chat(_greedy(prompt, 40), on_delta, threading.Event()).text

    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(run, prompts))
    assert texts == [alone[p] for p in prompts]
    engine.close()


def test_engine_embeds_from_several_threads(tiny_gguf) -> None:
    """Embedding contexts are made on demand, one per concurrent call, up to the slots."""
    engine = LlamaEngine(str(tiny_gguf), n_ctx=512, n_threads=1, slots=2)
    texts = [f"text number {i}" for i in range(6)]
    alone = [engine.embed(EmbeddingBody(model=MODEL, input=t))[0][0] for t in texts]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda t: engine.embed(EmbeddingBody(model=MODEL, input=t))[0][0], texts))
    assert together == alone
    assert len(engine._embedders._built) <= 2
    engine.close()


def test_vision_chats_at_once_each_with_its_own_projector_context(tiny_gguf, tmp_path) -> None:
    """The LLaVA handler's libmtmd context belongs to one Llama: each slot has its own."""
    pytest.importorskip("PIL")
    from tiny_models import build_tiny_mmproj, make_png

    projector = build_tiny_mmproj(tmp_path / "mmproj-tiny.gguf")
    engine = LlamaEngine(str(tiny_gguf), n_ctx=512, n_threads=1, projector=str(projector), slots=2)
    handlers = {id(llm.chat_handler) for llm in engine._generators._built}
    assert len(handlers) == 2

    def run(size: int) -> int:
        url = "data:image/png;base64," + base64.b64encode(make_png(size, size)).decode()
        body = ChatCompletionBody(
            model=MODEL,
            max_tokens=8,
            messages=[
                ChatMessage(
                    role="user",
                    content=[
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                )
            ],
        )
        return engine.chat(body, None, threading.Event()).usage.prompt_tokens

    with ThreadPoolExecutor(2) as pool:
        prompt_tokens = list(pool.map(run, [24, 40, 32, 48]))
    assert all(n > 16 for n in prompt_tokens), prompt_tokens  # the projector's 16 image tokens, plus text
    engine.close()


@pytest.fixture(scope="module")
def stack(nats_url, tmp_path_factory):
    # A 4k context, so a stream can be long enough to time: 200 tokens of the tiny model take about
    # 13 ms now, no more than the skew between two threads' first requests.
    model = write_tiny_gguf(tmp_path_factory.mktemp("slots-model") / "slots.gguf", context_length=4096)
    stack = Stack(nats_url, tmp_path_factory.mktemp("slots"), node=False)
    stack.node = stack.start_node("node", "--parallel", "2")
    try:
        assert stack.register(model, MODEL)["ok"]
        wait_until(lambda: MODEL in stack.models(), message=f"{MODEL} in /v1/models")
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _model_parallel(stack: Stack) -> int | None:
    for node in httpx.get(stack.url + "/v0/nodes").json()["data"]:
        if node["id"] == stack.node.node_id:
            return next((m["parallel"] for m in node["models"] if m["name"] == MODEL), None)
    return None


def test_heartbeat_reports_two_slots(stack) -> None:
    assert wait_until(
        lambda: _model_parallel(stack) == 2, message=lambda: f"parallel 2 in /v0/nodes, got {_model_parallel(stack)}"
    )


def _stream(client: openai.OpenAI, prompt: str, max_tokens: int = 60) -> tuple[float, float]:
    """When one streamed chat held a slot: from its response headers, which the gateway sends
    once the node took the request into a slot, to its last chunk."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        stream=True,
        logit_bias=NO_END,
        stream_options={"include_usage": True},
    )
    started = time.monotonic()
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == max_tokens, chunks[-1]
    return started, time.monotonic()


def test_two_streams_generate_at_the_same_time(stack, client) -> None:
    """With one slot the second stream starts after the first one ends; with two they run
    side by side, overlapping for most of the shorter one."""
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda p: _stream(client, p, 3000), ["first", "second"])
    overlap = min(a[1], b[1]) - max(a[0], b[0])
    shorter = min(a[1] - a[0], b[1] - b[0])
    assert overlap > 0.5 * shorter > 0, (overlap, a, b)
    assert stack.node.popen.poll() is None


def test_mixed_concurrent_requests_all_answered(stack, client) -> None:
    def plain(i: int) -> str:
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"plain {i}"}], max_tokens=60, logit_bias=NO_END
        )
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 60
        return "plain"

    def streamed(i: int) -> str:
        _stream(client, f"streamed {i}")
        return "streamed"

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(plain if i % 2 else streamed, i) for i in range(6)]
        kinds = [f.result() for f in futures]
    assert sorted(kinds) == ["plain"] * 3 + ["streamed"] * 3
    assert stack.node.popen.poll() is None, stack.node.output()[-3000:]
    # Still serving afterwards, and still with both slots.
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=4)
    assert out.choices[0].message.role == "assistant"
    assert _model_parallel(stack) == 2
