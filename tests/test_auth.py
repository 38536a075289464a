"""API keys on the real gateway app, in process (httpx.ASGITransport), on a real nats-server.

Two gateways share the session's NATS, as two gateways of a cluster share its ``keys`` bucket:
a key created on one works on the other, and a key revoked on one is refused on the other
within a second.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

import httpx
import nats
import openai
import pytest
from conftest import Proc, Stack, requires_llama, wait_until

from events import codec, storage
from gateway import Gateway
from gateway.auth import admin_key, digest, new_key

CHAT = {"model": "auth-nowhere", "messages": [{"role": "user", "content": "hi"}]}


@asynccontextmanager
async def gateways(nats_url: str, count: int = 2):
    started = [Gateway(nats_url=nats_url) for _ in range(count)]
    for gateway in started:
        await gateway.start(serve_http=False)
    clients = [httpx.AsyncClient(transport=httpx.ASGITransport(app=g.app), base_url="http://gw") for g in started]
    try:
        yield started, clients
    finally:
        for client in clients:
            await client.aclose()
        for gateway in started:
            await gateway.stop()


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def until(predicate, timeout: float = 1.0) -> float:
    """Seconds until ``predicate()`` (awaited) is true; fails after ``timeout``."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_keys_scopes_models_expiry_and_revocation_on_two_gateways(nats_url, tmp_path) -> None:
    async with gateways(nats_url) as ((a, b), (ca, cb)):
        admin, created = await admin_key(a.keys, tmp_path / "admin.key")
        assert created and (tmp_path / "admin.key").stat().st_mode & 0o777 == 0o600
        assert (await admin_key(a.keys, tmp_path / "admin.key")) == (admin, False)  # kept, not made again

        # No key, a wrong key, a wrong scheme: 401 in the OpenAI shape, on /v1 and /v0 alike.
        for headers in ({}, bearer("sk-llmr-nope"), {"authorization": f"Basic {admin}"}):
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v0/nodes"), ("GET", "/v1/models")):
                answer = await ca.request(method, path, headers=headers, json=CHAT if method == "POST" else None)
                assert answer.status_code == 401, (path, answer.text)
                assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
        assert (await ca.get("/healthz")).status_code == 200  # open: a load balancer probes it
        document = (await ca.get("/openapi.json")).json()
        assert document["security"] == [{"bearer": []}] and document["paths"]["/healthz"]["get"]["security"] == []

        async def create(client: httpx.AsyncClient, **body) -> dict:
            answer = await client.post("/v0/keys", json={"name": "t", **body}, headers=bearer(admin))
            assert answer.status_code == 201, answer.text
            return answer.json()

        inference = await create(ca, scopes=["inference"], expires_in_days=7)
        read = await create(ca, scopes=["read"])
        limited = await create(ca, scopes=["inference"], models=["only-this"])
        assert inference["key"].startswith("sk-llmr-") and not inference["never_expires"] and read["never_expires"]

        # Scopes: inference is /v1, read is /v0 reads, admin is everything (keys included).
        assert (await cb.get("/v1/models", headers=bearer(inference["key"]))).status_code == 200
        for key, method, path, status in (
            (inference, "GET", "/v0/nodes", 403),
            (inference, "POST", "/v0/models/register", 403),
            (read, "GET", "/v0/nodes", 200),
            (read, "POST", "/v0/models/register", 403),
            (read, "GET", "/v0/keys", 403),
            (read, "POST", "/v1/chat/completions", 403),
            (inference, "DELETE", "/v1/models/auth-nowhere", 403),  # deleting a model is administration
            (inference, "GET", "/v0/files/" + "0" * 32 + ".png", 404),  # an image answer's url: not a read
        ):
            answer = await cb.request(method, path, headers=bearer(key["key"]), json={"path": "/x"})
            assert answer.status_code == status, (key["scopes"], method, path, answer.text)
            if status == 403:
                assert answer.json()["error"]["code"] == "insufficient_scope"
        # A key limited to one model: 403 naming the model, before the model is even looked up.
        answer = await cb.post("/v1/chat/completions", json=CHAT, headers=bearer(limited["key"]))
        assert answer.status_code == 403 and answer.json()["error"]["param"] == "model"
        answer = await cb.post(
            "/v1/chat/completions", json={**CHAT, "model": "only-this"}, headers=bearer(limited["key"])
        )
        assert answer.status_code == 404  # allowed; just not registered

        # Revoked on gateway A: refused on gateway B within a second.
        assert (await ca.delete(f"/v0/keys/{inference['id']}", headers=bearer(admin))).status_code == 200

        async def refused_on_b() -> bool:
            return (await cb.get("/v1/models", headers=bearer(inference["key"]))).status_code == 401

        assert await until(refused_on_b) < 1.0
        assert (await ca.delete(f"/v0/keys/{inference['id']}", headers=bearer(admin))).status_code == 404

        # Expired: written straight into the bucket, as another gateway would; refused everywhere.
        secret, record = new_key("old", ["inference"], [], 3)
        record.expires_at = time.time() - 1
        kv = await a.js.key_value(storage.KV_KEYS)
        await kv.put(record.id, codec.encode(record))

        async def expired_on_b() -> bool:
            answer = await cb.get("/v1/models", headers=bearer(secret))
            return answer.status_code == 401 and answer.json()["error"]["code"] == "expired_api_key"

        await until(expired_on_b)

        async def listed_expired_on_a() -> bool:
            listing = (await ca.get("/v0/keys", headers=bearer(admin))).json()["data"]
            return any(k["id"] == record.id and k["expired"] for k in listing)

        await until(listed_expired_on_a)
        listing = (await ca.get("/v0/keys", headers=bearer(admin))).json()["data"]
        assert all("digest" not in k and "key" not in k for k in listing)

        # The official SDK: a missing key is its AuthenticationError, a good one works.
        sdk = openai.AsyncOpenAI(base_url="http://gw/v1", api_key="sk-llmr-bad", http_client=cb, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()
        sdk = openai.AsyncOpenAI(base_url="http://gw/v1", api_key=read["key"], http_client=cb, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):
            await sdk.models.list()

        # Secrets are nowhere in plaintext: not in the bucket, not in history (which names the key id).
        await cb.post("/v1/chat/completions", json=CHAT, headers=bearer(limited["key"]))
        await b.history.flush()
        stored = b"".join([entry.value for entry in [await kv.get(k) for k in await kv.keys()]])
        history = await _history(nats_url)
        for secret_ in (admin, inference["key"], read["key"], limited["key"], secret):
            assert secret_.encode() not in stored and secret_.encode() not in history
        assert digest(admin).encode() in stored  # what is kept instead
        assert json.dumps(limited["id"]).encode() in history


async def _history(nats_url: str) -> bytes:
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe("history.>", ordered_consumer=True)
        data = []
        while True:
            try:
                data.append((await sub.next_msg(timeout=0.5)).data)
            except nats.errors.TimeoutError:
                break
        await sub.unsubscribe()
        return b"\n".join(data)
    finally:
        await nc.close()


def test_no_auth_is_refused_off_loopback() -> None:
    with pytest.raises(RuntimeError, match="loopback"):
        Gateway(nats_url=None, host="0.0.0.0", auth=False)
    Gateway(nats_url=None, host="127.0.0.1", auth=False)
    Gateway(nats_url=None, host="::1", auth=False)


@pytest.mark.e2e
@requires_llama
def test_a_cluster_gateway_with_keys_made_by_the_operator_cli(nats_url, tiny_gguf, tmp_path) -> None:
    """`gateway` on its own has no key: the operator makes one over NATS (`llm-router keys`)."""
    stack = Stack(nats_url, tmp_path, auth=True)
    try:
        assert stack.register(tiny_gguf, "auth-tiny")["ok"]
        made = Proc(["keys", "--nats-url", nats_url, "create", "ci", "--scope", "inference", "--expires-days", "7"])
        assert made.popen.wait(30) == 0, made.output()
        created = json.loads(made.output()[: made.output().rindex("}") + 1])
        client = openai.OpenAI(base_url=stack.url + "/v1", api_key=created["key"], max_retries=0)
        wait_until(lambda: "auth-tiny" in [m.id for m in client.models.list()], message="model served")
        answer = client.chat.completions.create(
            model="auth-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert answer.choices[0].message.role == "assistant"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-llmr-x", max_retries=0).models.list()

        listed = Proc(["keys", "--nats-url", nats_url, "ls"])
        assert listed.popen.wait(30) == 0 and created["id"] in listed.output()
        assert created["key"] not in listed.output()
        removed = Proc(["keys", "--nats-url", nats_url, "rm", created["id"]])
        assert removed.popen.wait(30) == 0, removed.output()
        started = time.monotonic()
        wait_until(
            lambda: httpx.get(stack.url + "/v1/models", headers=bearer(created["key"])).status_code == 401,
            timeout=1.0,
            message="revoked key refused",
        )
        assert time.monotonic() - started < 1.0
        assert created["key"] not in stack.gateway.output()
    finally:
        stack.close()
