"""The real Starlette app of a real Gateway, called in process through httpx.ASGITransport.

The gateway runs against the session's nats-server but binds no socket (``serve_http=False``);
no node and no registry are started, so these are the answers a client gets before any work
reaches a node: OpenAI-shaped errors, health, the model list.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from events import MAX_NAME_BYTES, codec, encode_token, storage
from events.messages import ModelRecord, ModelSource
from gateway import Gateway

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
async def gateway(nats_url):
    gateway = Gateway(nats_url=nats_url, auth=False)
    await gateway.start(serve_http=False)
    yield gateway
    await gateway.stop()


@pytest.fixture
async def client(gateway):
    transport = httpx.ASGITransport(app=gateway.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


def chat_body(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def error_of(response: httpx.Response) -> dict:
    """The OpenAI error object, checked for its four fields."""
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


async def test_an_empty_body_is_a_400(client) -> None:
    response = await client.post(CHAT, content=b"")
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and "empty" in error["message"]


async def test_a_body_that_is_not_json_is_a_400(client) -> None:
    response = await client.post(CHAT, content=b'{"model": "m", ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and "not valid JSON" in error["message"]


async def test_an_unknown_model_is_a_404_naming_the_param(client) -> None:
    response = await client.post(CHAT, json=chat_body(f"nope-{uuid.uuid4().hex[:8]}"))
    assert response.status_code == 404
    error = error_of(response)
    assert (error["param"], error["code"]) == ("model", "model_not_found")


async def test_an_over_long_model_name_is_a_400_before_it_reaches_a_subject(client) -> None:
    response = await client.post(CHAT, json=chat_body("m" * (MAX_NAME_BYTES + 1)))
    assert response.status_code == 400
    error = error_of(response)
    assert (error["param"], error["code"]) == ("model", "invalid_model")


async def test_a_registered_model_no_node_serves_is_a_503_with_retry_after(gateway, client) -> None:
    name = f"unserved-{uuid.uuid4().hex[:8]}"
    record = ModelRecord(
        name=name,
        format="gguf",
        runtime="llama_cpp",
        capabilities=["chat"],
        source=ModelSource(kind="path", path=f"/nowhere/{name}.gguf"),
    )
    kv = await gateway.js.key_value(storage.KV_MODELS)
    await kv.create(encode_token(name), codec.encode(record))  # as registry/service.py writes it
    try:
        deadline = time.monotonic() + 5
        while gateway.catalog.get(name) is None:  # the gateway's watcher mirrors the bucket
            assert time.monotonic() < deadline, "the gateway never saw the record"
            await asyncio.sleep(0.005)
        response = await client.post(CHAT, json=chat_body(name))
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
        error = error_of(response)
        assert error["type"] == "service_unavailable" and error["code"] == "model_unavailable"
        listed = (await client.get("/v1/models")).json()["data"]
        assert name not in {m["id"] for m in listed}  # registered, but not ready anywhere
    finally:
        await kv.purge(encode_token(name))


async def test_healthz_reports_the_broker_and_what_the_gateway_sees(client) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["nats"]) == ("ok", "connected")
    assert isinstance(body["nodes"], int) and isinstance(body["models"], int)
    assert set(body["history"]) == {"pending", "retried", "dropped", "unindexed"}
    assert set(body["logs"]) == {"pending", "shipped", "dropped"}  # the log shipper's buffer


async def test_the_model_list_is_empty_without_nodes(gateway, client) -> None:
    deadline = time.monotonic() + storage.NODE_TTL_S + 1  # nodes killed by an earlier module expire
    while gateway.directory.live():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    response = await client.get("/v1/models")
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": []}


async def test_an_unknown_path_is_an_openai_404(client) -> None:
    response = await client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert error_of(response)["type"] == "invalid_request_error"


async def test_over_long_names_in_paths_and_queries_are_refused_not_500(client, gateway) -> None:
    """Every name that would become a subject token or a KV key is bounded (256 bytes)."""
    long = "x" * 5000
    for method, path in (
        ("GET", f"/v0/downloads/{long}"),
        ("GET", f"/v0/downloads?model={long}"),
        ("POST", f"/v0/nodes/{long}/drain"),
        ("GET", f"/v0/models/{long}"),
        ("GET", f"/v1/models/{long}"),
    ):
        response = await client.request(method, path)
        assert response.status_code in (400, 404), (path[:40], response.status_code, response.text[:300])
        error_of(response)
    assert gateway.nc.is_connected and (await client.get("/healthz")).json()["nats"] == "connected"
