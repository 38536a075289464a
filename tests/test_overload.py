"""Sustained overload with a short queue timeout must never leave a node's slots held.

Found by ``bench/reliability.py``: a request whose queue wait expired in the same loop turn
that a freed slot was handed to it got a 504 while the slot stayed reserved; after a couple
of those the gateway saw the node as full for good and answered only 504s.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
from conftest import Stack, wait_until

MODEL = "overload-tiny"
REQUESTS = 3000
CONCURRENCY = 32
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 8}


async def _overload(url: str) -> dict[int, int]:
    """``CONCURRENCY`` clients, ``REQUESTS`` in all; status -> count."""
    statuses: dict[int, int] = {}
    remaining = REQUESTS
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                status = (await client.post("/v1/chat/completions", json=BODY)).status_code
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


def test_queue_timeouts_under_overload_leave_no_slot_held(nats_url, tiny_gguf, tmp_path) -> None:
    stack = Stack(nats_url, tmp_path, node=False, gateway_args=("--queue-timeout", "0.02"))
    node = None
    try:
        assert stack.register(tiny_gguf, MODEL)["ok"]
        node = stack.delay_node(5, parallel=2, node_id=f"overload-{uuid.uuid4().hex[:6]}")
        wait_until(
            lambda: MODEL in stack.models(),
            timeout=45,  # a node process and a placement on a loaded 2-core CI run
            message=lambda: f"model ready: {httpx.get(f'{stack.url}/v0/models/{MODEL}').text[:600]}\n{node.tail()}",
        )

        statuses = asyncio.run(_overload(stack.url))
        assert set(statuses) <= {200, 504}, statuses
        assert statuses.get(504), f"no request timed out in the queue, so nothing was tested: {statuses}"

        def held() -> int:
            return sum(n["gateway_inflight"] for n in httpx.get(stack.url + "/v0/nodes").json()["data"])

        wait_until(lambda: held() == 0, timeout=5, message=lambda: f"{held()} slots still held after the load")
        assert httpx.post(stack.url + "/v1/chat/completions", json=BODY, timeout=30).status_code == 200
    finally:
        if node is not None:
            node.stop()
        stack.close()
