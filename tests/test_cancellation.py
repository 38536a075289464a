"""A client that disconnects mid-stream stops the generation on the node."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import nats
import pytest
from conftest import Stack, requires_llama, wait_until

from events.openai import CompletionBody
from nodes.runtimes.llama_cpp import LlamaEngine

pytestmark = [pytest.mark.e2e, requires_llama]

MODEL = "cancel-tiny"


def test_engine_stops_at_the_next_token_when_cancelled(tiny_gguf) -> None:
    engine = LlamaEngine(str(tiny_gguf), n_ctx=512, n_threads=1)
    # Forbidding tokens 2 and 4 (its end tokens) makes the tiny model run to max_tokens unless cancelled.
    body = CompletionBody(model=MODEL, prompt="go", max_tokens=450, logit_bias={"2": -100.0, "4": -100.0})
    full = engine.complete(body, None, threading.Event())
    assert full.usage.completion_tokens == 450

    cancelled = threading.Event()
    threading.Timer(0.02, cancelled.set).start()
    outcome = engine.complete(body, lambda text: None, cancelled)
    assert outcome.finish_reason == "cancelled"
    assert outcome.usage.completion_tokens < 450
    engine.close()


def test_disconnect_publishes_cancel_and_frees_the_node(nats_url, tiny_gguf, tmp_path) -> None:
    stack = Stack(nats_url, tmp_path)
    try:
        stack.serve(tiny_gguf, MODEL)

        async def scenario() -> list[str]:
            nc = await nats.connect(nats_url)
            cancels = await nc.subscribe("infer.cancel.*")
            # Tokens 2 and 4 end generation; forbidding them keeps the tiny model busy for all 480 tokens.
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "go"}],
                "max_tokens": 480,
                "logit_bias": {"2": -100, "4": -100},
                "stream": True,
            }
            async with httpx.AsyncClient(timeout=30) as client:
                async with client.stream("POST", stack.url + "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            break  # the role chunk arrived: hang up mid-generation
            msg = await cancels.next_msg(timeout=5)
            await nc.close()
            return json.loads(msg.data)

        cancel = asyncio.run(scenario())
        assert cancel["reason"] == "client disconnected"

        def node_idle() -> bool:
            beat = asyncio.run(_heartbeat(nats_url))
            return beat["active_requests"] == 0 and beat["queue_depth"] == 0

        wait_until(node_idle, timeout=5, message="node active count back to 0")
    finally:
        stack.close()


async def _heartbeat(nats_url: str) -> dict:
    nc = await nats.connect(nats_url)
    sub = await nc.subscribe("nodes.heartbeat.*")
    msg = await sub.next_msg(timeout=5)
    await nc.close()
    return json.loads(msg.data)
