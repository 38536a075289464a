"""Files for every node: the registry hosts a path-registered model's file in the object store,
and a node puts what it fetched from the origin there, so the next node fetches it over NATS.

Real processes, real NATS, real llama.cpp; the origin is the local fake Hub (``HF_ENDPOINT``).
"""

from __future__ import annotations

import asyncio

import httpx
import nats
import pytest
from conftest import Stack, requires_llama, wait_until
from fake_hf import FakeHub

from broker.blobs import blob_info, blob_name, file_sha256, object_sha256
from nodes.demo_model import write_tiny_gguf

pytestmark = [pytest.mark.e2e, requires_llama]

REPO, FILE = "share/Tiny-GGUF", "tiny-q8_0.gguf"


async def _blob(url: str, name: str):
    nc = await nats.connect(url)
    try:
        return await blob_info(nc.jetstream(), name)
    finally:
        await nc.close()


def blob(stack: Stack, model: str, filename: str):
    return asyncio.run(_blob(stack.nats_url, blob_name(model, filename)))


def chat(stack: Stack, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=30)


def served_by(stack: Stack, model: str) -> list[str]:
    return httpx.get(f"{stack.url}/v0/models/{model}").json()["nodes"]


def test_a_path_model_reaches_a_node_that_cannot_see_the_path(nats_url, tmp_path) -> None:
    stack = Stack(nats_url, tmp_path / "stack", node=False)
    try:
        source = write_tiny_gguf(tmp_path / "only-the-registry" / "hosted.gguf", seed=11)
        digest = file_sha256(source)
        assert stack.register(source, "hosted")["ok"]
        info = wait_until(lambda: blob(stack, "hosted", "hosted.gguf"), message="the registry hosting the file")
        assert object_sha256(info) == digest and info.size == source.stat().st_size
        source.unlink()  # from now on, only the object store has it
        far = stack.start_node("far")  # its own data dir: no cache, no shared dir, no path
        answer = chat(stack, "hosted")
        assert answer.status_code == 503 and "object store" in answer.json()["error"]["message"], answer.text
        wait_until(lambda: served_by(stack, "hosted") == [far.node_id], message="loaded from the object store")
        answer = chat(stack, "hosted")
        assert answer.status_code == 200 and answer.headers["x-node-id"] == far.node_id, answer.text
        copies = list((tmp_path / "stack" / "far" / "node" / "models").rglob("hosted.gguf"))
        assert len(copies) == 1 and file_sha256(copies[0]) == digest
    finally:
        stack.close()
    assert blob(stack, "hosted", "hosted.gguf") is None  # deleted with the model (Stack.close deletes it)


@pytest.fixture
def hub(tiny_gguf):
    hub = FakeHub()
    hub.add_repo(REPO, {FILE: tiny_gguf.read_bytes()})
    hub.start()
    yield hub
    hub.stop()


def origin_requests(hub: FakeHub) -> int:
    """Requests for the file's contents or metadata (not the registry's repository listing)."""
    return hub.count("GET", f"/{REPO}/resolve/") + hub.count("HEAD", f"/{REPO}/resolve/")


def test_a_second_node_fetches_an_origin_model_without_asking_the_origin(nats_url, hub, tmp_path) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    stack = Stack(nats_url, tmp_path, env=env, node=False)
    try:
        first = stack.start_node("first")
        reply = httpx.post(
            stack.url + "/v0/models/register", json={"repo": REPO, "filename": FILE, "name": "shared"}, timeout=30
        )
        assert reply.status_code == 201, reply.text
        stack.registered.append("shared")
        assert chat(stack, "shared").status_code == 503  # the first request starts the download
        wait_until(lambda: served_by(stack, "shared") == [first.node_id], message="the first node serving it")
        info = wait_until(lambda: blob(stack, "shared", FILE), message="the first node sharing its download")
        assert object_sha256(info) == file_sha256(next((tmp_path / "first").rglob(FILE)))
        asked = origin_requests(hub)
        assert asked >= 1 and hub.bytes_served

        second = stack.start_node("second")
        order = httpx.post(f"{stack.url}/v0/models/shared/download", json={"node": second.node_id}, timeout=30)
        assert order.status_code in (200, 202), order.text
        assert "object store" in order.json()["task"]["nodes"][0]["source"], order.text
        wait_until(lambda: sorted(served_by(stack, "shared")) == sorted([first.node_id, second.node_id]), 20)
        assert origin_requests(hub) == asked  # not one more request to the origin
    finally:
        stack.close()


def test_a_node_told_not_to_share_keeps_its_download_to_itself(nats_url, hub, tmp_path) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    stack = Stack(nats_url, tmp_path, env=env, node=False)
    try:
        node = stack.start_node("private", "--no-share-downloads")
        reply = httpx.post(
            stack.url + "/v0/models/register", json={"repo": REPO, "filename": FILE, "name": "unshared"}, timeout=30
        )
        assert reply.status_code == 201, reply.text
        stack.registered.append("unshared")
        assert chat(stack, "unshared").status_code == 503
        wait_until(lambda: served_by(stack, "unshared") == [node.node_id], message="downloaded and served")
        assert blob(stack, "unshared", FILE) is None
    finally:
        stack.close()
