"""An existing OpenAI-compatible server as a node: llama-cpp-python's own server on the tiny GGUF.

``llm-router node --upstream URL`` runs as its own process against a real ``python -m
llama_cpp.server`` (two models from one config file: a chat model and an embedding one, behind
an API key the node gets from the environment). The gateway runs in process on the session's
nats-server and is asked with the official ``openai`` SDK: the upstream's models are listed
and served (chat, stream, embeddings) through the usual dispatch, recorded in history and
counted in usage; when the server goes away the node goes offline and its models leave
``/v1/models``, and both come back when the server returns.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Proc

from events import storage
from gateway import Gateway
from gateway.providers import Clouds
from llm_router.processes import Process

pytest.importorskip("llama_cpp")
for _module in ("fastapi", "sse_starlette", "pydantic_settings", "starlette_context"):
    pytest.importorskip(_module, reason="llama_cpp[server] extras (pip install 'llm-router[upstream-test]')")

KEY = "upstream-secret-5f1c2a"
CHAT_MODEL, EMBED_MODEL = "tiny-chat", "tiny-embed"
N_EMBD = 64  # nodes.demo_model.write_tiny_gguf's default


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """``python -m llama_cpp.server`` on a fixed port, so it can be stopped and started again."""

    def __init__(self, model: Path, workdir: Path) -> None:
        self.port = free_port()
        self.config = workdir / "llama-server.json"
        common = {"model": str(model), "n_ctx": 256, "n_threads": 1, "verbose": False}
        models = [{**common, "model_alias": CHAT_MODEL}, {**common, "model_alias": EMBED_MODEL, "embedding": True}]
        self.config.write_text(json.dumps({"host": "127.0.0.1", "port": self.port, "api_key": KEY, "models": models}))
        self.proc: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(self.config)]
        self.proc = Process(argv, name="llama-server")
        self.proc.wait_for(r"Uvicorn running on", timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.running:
            self.proc.stop()


@pytest.fixture(scope="module")
def llama_server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    server = LlamaServer(tiny_gguf, tmp_path_factory.mktemp("upstream"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def gateway(nats_url: str):
    gateway = Gateway(nats_url=nats_url, auth=False, clouds=Clouds([]))
    await gateway.start(serve_http=False)
    yield gateway
    await gateway.stop()


@pytest.fixture(scope="module")
def node(nats_url: str, llama_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("upstream-node")
    args = ["--log-level", "debug", "node", "--nats-url", nats_url, "--data-dir", str(data), "--parallel", "2"]
    args += ["--upstream", llama_server.url, "--upstream-interval", "0.3", "--upstream-failures", "2"]
    proc = Proc(args, env={"LLM_ROUTER_UPSTREAM_KEY": KEY})
    proc.node_id = proc.wait_for(r"node (\S+) ready", timeout=60).group(1)
    yield proc
    if proc.running:
        proc.stop(timeout=45)  # a node waits up to 30 s for in-flight answers; its upstream may be gone
    assert KEY not in proc.output(), "the upstream key appeared in the node's output"


@pytest.fixture
async def client(gateway: Gateway):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gateway")
    async with openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=http) as sdk:
        yield sdk


async def listed(client: openai.AsyncOpenAI) -> dict[str, object]:
    return {m.id: m for m in (await client.models.list()).data}


async def until(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_the_upstreams_models_are_listed_and_the_node_says_where_they_come_from(gateway, node, client) -> None:
    async def both_listed() -> bool:
        return {CHAT_MODEL, EMBED_MODEL} <= set(await listed(client))

    await until(both_listed, 20, "the upstream's models in /v1/models")
    models = await listed(client)
    assert models[CHAT_MODEL].owned_by == "upstream"
    nodes = (await client._client.get("http://gateway/v0/nodes")).json()["data"]
    mine = next(n for n in nodes if n["id"] == node.node_id)
    assert mine["state"] == "online"
    runtime = next(r for r in mine["runtimes"] if r["name"] == "upstream")
    assert runtime["available"] and sorted(runtime["models"]) == [CHAT_MODEL, EMBED_MODEL]
    assert {m["origin"] for m in mine["models"]} == {"upstream"}


async def test_chat_stream_and_embeddings_go_through_the_node_to_the_upstream(gateway, node, client) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert raw.headers["x-node-id"] == node.node_id
    answer = raw.parse()
    assert answer.model == CHAT_MODEL and isinstance(answer.choices[0].message.content, str)
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0  # the server's count

    stream = await client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) and finish in ("length", "stop")
    assert usage is not None and 0 < usage.completion_tokens <= 4  # counted by the node where the server does not

    embedded = await client.embeddings.create(model=EMBED_MODEL, input=["one", "two words"])
    assert [len(e.embedding) for e in embedded.data] == [N_EMBD, N_EMBD]
    assert embedded.data[0].embedding != embedded.data[1].embedding

    await gateway.history.flush()
    usage_view = (await client._client.get("http://gateway/v0/usage?period=day")).json()["periods"]["day"]
    row = next(r for r in usage_view["by_model"] if r["model"] == CHAT_MODEL)
    assert row["provider"] == "local" and row["requests"] >= 2 and row["completion_tokens"] >= 2


async def test_an_upstream_that_goes_away_takes_its_node_offline_and_back(gateway, node, llama_server, client) -> None:
    async def chat_listed() -> bool:
        return CHAT_MODEL in await listed(client)

    await until(chat_listed, 20, "the upstream's model listed")
    llama_server.stop()

    async def gone() -> bool:
        return CHAT_MODEL not in await listed(client)

    took = await until(gone, 10, "the upstream's models gone from /v1/models")
    assert took < 5, took  # 2 failed checks 0.3 s apart, then one heartbeat without models
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])

    async def offline() -> bool:
        nodes = (await client._client.get("http://gateway/v0/nodes")).json()["data"]
        return any(n["id"] == node.node_id and n["state"] == "offline" for n in nodes)

    await until(offline, storage.NODE_TTL_S + 5, "the node offline (silent past the heartbeat TTL)")

    llama_server.start()

    async def online_again() -> bool:
        nodes = (await client._client.get("http://gateway/v0/nodes")).json()["data"]
        mine = [n for n in nodes if n["id"] == node.node_id]
        return bool(mine) and mine[0]["state"] == "online" and CHAT_MODEL in await listed(client)

    await until(online_again, 30, "the node online with its models again")
    answer = await client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "back?"}], max_tokens=2
    )
    assert answer.choices[0].message.content is not None
    assert KEY not in node.output() and "upstream check failed" in node.output()
