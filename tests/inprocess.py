"""Registry, gateway (API keys on) and a node in the test's own event loop, on the session's NATS.

The node runs the instant engine of ``bench/minimal_engine.py`` (the delay node of conftest's
``Stack.delay_node`` runs it too): every answer is "pong" with a usage of 1 prompt and 1
completion token, so tests of what answers cost (token rate limits) know the cost exactly. The
gateway is called through httpx.ASGITransport on its real app, as in tests/test_auth.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from conftest import Stack

from gateway import Gateway
from gateway.auth import admin_key
from nodes import NodeAgent
from registry import Registry

_BENCH = Path(__file__).resolve().parent.parent / "bench" / "minimal_engine.py"
_spec = importlib.util.spec_from_file_location("minimal_engine", _BENCH)
minimal_engine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(minimal_engine)


class Running:
    def __init__(self, registry: Registry, gateway: Gateway, node: NodeAgent | None, admin: str) -> None:
        self.registry, self.gateway, self.node = registry, gateway, node
        self.admin = admin  # the admin key's secret
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw")

    def bearer(self, secret: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {secret or self.admin}"}

    async def create_key(self, **body) -> dict:
        answer = await self.client.post("/v0/keys", json={"name": "test", **body}, headers=self.bearer())
        assert answer.status_code == 201, answer.text
        return answer.json()

    async def refuses(self, path: str, cases: tuple[tuple[dict[str, Any], str], ...]) -> None:
        """``GET path`` answers each ``(params, param)`` of ``cases`` with a 400 OpenAI error naming
        ``param``: the read APIs' checks of their query parameters."""
        for params, param in cases:
            answer = await self.client.get(path, params=params, headers=self.bearer())
            assert answer.status_code == 400, (params, answer.text)
            error = answer.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error", (params, error)

    async def serving(self, model: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.gateway.directory.serving(model):
            assert time.monotonic() < deadline, f"no node serves {model} after {timeout} s"
            await asyncio.sleep(0.05)


@asynccontextmanager
async def running(
    nats_url: str, data_dir: Path, *, node: bool = True, delay_s: float = 0.0, parallel: int = 4, **gateway_options
):
    """``delay_s``: the engine's service time per chat or completion; ``parallel``: the node's
    slots per model; ``gateway_options``: more arguments of the Gateway (e.g. ``clouds``)."""
    # Tests register files of the session's temporary directories (e.g. the tiny_gguf fixture).
    registry = Registry(nats_url=nats_url, model_roots=[Stack.model_root or data_dir])
    await registry.start()
    gateway = Gateway(nats_url=nats_url, **gateway_options)
    await gateway.start(serve_http=False)
    agent = None
    if node:
        agent = NodeAgent(
            nats_url=nats_url,
            data_dir=data_dir / "node",
            runtimes=[minimal_engine.MinimalRuntime(delay_s)],
            node_id=f"inproc-{uuid.uuid4().hex[:6]}",
            parallel=parallel,
        )
        await agent.start()
    secret, _ = await admin_key(gateway.keys, data_dir / "admin.key")
    stack = Running(registry, gateway, agent, secret)
    before = set(gateway.catalog.records)
    try:
        yield stack
    finally:
        # What the test registered goes again: the session's NATS is shared, and a model left
        # registered would be placed on the nodes of later tests (and count in their budgets).
        for name in set(gateway.catalog.records) - before:
            await registry.delete(name)
        await stack.client.aclose()
        if agent is not None:
            await agent.stop()
        await gateway.stop()
        await registry.stop()
