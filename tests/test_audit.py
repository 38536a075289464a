"""The audit log: every admin action, refused ones included, in the AUDIT stream; ``GET /v0/audit``.

A real registry, gateway (keys on) and node run in this test's event loop (tests/inprocess.py)
on the session's nats-server; the stream is read raw, with an ordered consumer, as ``nats
stream view AUDIT`` would, so what is checked is what is stored, not what the API makes of it.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import nats
import pytest
from conftest import admin_request
from inprocess import running

from broker import provision
from events import storage
from gateway import Gateway
from gateway.auth import digest


@pytest.fixture(scope="module")
async def stack(nats_url, tmp_path_factory):
    async with running(nats_url, tmp_path_factory.mktemp("audit")) as stack:
        yield stack


async def stored(nats_url: str) -> list[tuple[bytes, dict]]:
    """Every message of the AUDIT stream: its raw bytes and its JSON."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        if (await js.stream_info(storage.AUDIT)).state.messages == 0:
            return []
        sub = await js.subscribe("audit.>", ordered_consumer=True)
        found = []
        while True:
            msg = await sub.next_msg(timeout=5)
            found.append((msg.subject.encode() + b" " + msg.data, msgspec.json.decode(msg.data)))
            if msg.metadata.num_pending == 0:
                break
        await sub.unsubscribe()
        return found
    finally:
        await nc.close()


async def flushed(stack) -> None:
    await stack.gateway.audit.flush()
    await stack.registry.audit.flush()


def matching(records: list[dict], **fields) -> list[dict]:
    return [r for r in records if all(r.get(name) == value for name, value in fields.items())]


async def test_every_admin_action_is_recorded_with_who_what_and_the_result(stack, nats_url, tiny_gguf) -> None:
    s, t0 = stack, time.time()
    admin_id = s.gateway.keys.check(s.admin).id
    name = f"audit-{uuid.uuid4().hex[:6]}"
    made = await s.create_key(scopes=["inference"])
    read = await s.create_key(scopes=["read"])
    wrong = "sk-llmr-not-a-key-" + uuid.uuid4().hex
    calls = [
        # (method, path, headers, body, status): each is one record, the refused ones too.
        ("POST", "/v0/keys", {}, {"name": "x", "scopes": ["read"]}, 401),
        ("POST", "/v0/keys", s.bearer(wrong), {"name": "x", "scopes": ["read"]}, 401),
        ("POST", "/v0/keys", s.bearer(read["key"]), {"name": "x", "scopes": ["read"]}, 403),
        ("DELETE", f"/v1/models/{name}", s.bearer(made["key"]), None, 403),
        ("POST", "/v0/models/register", s.bearer(), {"path": str(tiny_gguf), "name": name}, 201),
        ("POST", "/v0/models/register", s.bearer(), {"path": str(tiny_gguf), "name": name}, 409),
        ("POST", f"/v0/nodes/{s.node.node_id}/drain", s.bearer(), None, 200),
        ("POST", f"/v0/nodes/{s.node.node_id}/resume", s.bearer(), None, 200),
        ("POST", "/v0/nodes/nowhere-node/drain", s.bearer(), None, 404),
        ("POST", "/v0/nodes/nowhere-node/reboot", s.bearer(), None, 404),
        ("DELETE", f"/v1/models/{name}", s.bearer(), None, 200),
        ("DELETE", f"/v0/models/{name}", s.bearer(), None, 404),
        ("POST", f"/v0/models/{name}/download", s.bearer(), {}, 404),
        ("DELETE", f"/v0/keys/{made['id']}", s.bearer(), None, 200),
        ("DELETE", f"/v0/keys/{made['id']}", s.bearer(), None, 404),
        ("GET", "/v0/models", s.bearer(), None, 200),  # reads are not recorded
        ("GET", "/v0/keys", s.bearer(), None, 200),
    ]
    for method, path, headers, body, status in calls:
        answer = await s.client.request(method, path, headers=headers, json=body)
        assert answer.status_code == status, (method, path, answer.text)
    # An operator over NATS, as `nats req admin.model.delete '{"name": ...}'` sends it.
    assert (await admin_request(nats_url, "admin.model.delete", {"name": name}))["status"] == 404

    async def registry_has_recorded() -> list[dict]:
        await flushed(s)
        records = [r for _, r in await stored(nats_url) if r["at"] >= t0]
        return records if matching(records, component="registry", actor="nats") else []

    deadline = time.monotonic() + 10
    while not (records := await registry_has_recorded()):
        assert time.monotonic() < deadline, "the registry's record of the NATS request never arrived"
        await asyncio.sleep(0.05)
    gw = [r for r in records if r["component"] == "gateway"]
    expected = [
        # (actor, action, status, target, code)
        (admin_id, "key.create", 201, made["id"], None),
        (admin_id, "key.create", 201, read["id"], None),
        ("anonymous", "key.create", 401, None, "missing_api_key"),
        ("anonymous", "key.create", 401, None, "invalid_api_key"),
        (read["id"], "key.create", 403, None, "insufficient_scope"),
        (made["id"], "model.delete", 403, name, "insufficient_scope"),
        (admin_id, "model.register", 201, name, None),
        (admin_id, "model.register", 409, name, "model_already_registered"),
        (admin_id, "node.drain", 200, s.node.node_id, None),
        (admin_id, "node.resume", 200, s.node.node_id, None),
        (admin_id, "node.drain", 404, "nowhere-node", "node_not_found"),
        (admin_id, "http.post", 404, "/v0/nodes/nowhere-node/reboot", None),
        (admin_id, "model.delete", 200, name, None),
        (admin_id, "model.delete", 404, name, "model_not_found"),
        (admin_id, "model.download", 404, name, "model_not_found"),
        (admin_id, "key.revoke", 200, made["id"], None),
        (admin_id, "key.revoke", 404, made["id"], "key_not_found"),
    ]
    for actor, action, status, target, code in expected:
        found = matching(gw, actor=actor, action=action, status=status, target=target, code=code)
        assert len(found) == 1, (actor, action, status, target, code, found or gw)
        assert found[0]["method"] in ("POST", "DELETE") and found[0]["request_id"] and found[0]["duration_ms"] >= 0
    assert not [r for r in gw if r.get("method") == "GET"]
    assert matching(gw, action="key.create", target=made["id"])[0]["detail"] == {
        "name": "test",
        "scopes": ["inference"],
    }

    # The registry's own record of the actions it carried out names the gateway's caller and request.
    registered = matching(gw, action="model.register", status=201)[0]
    mirror = matching(records, component="registry", action="model.register", request_id=registered["request_id"])
    assert [(r["actor"], r["status"], r["target"]) for r in mirror] == [(admin_id, 201, name)]
    assert matching(records, component="registry", action="model.delete", actor=admin_id, status=200, target=name)
    nats_delete = matching(records, component="registry", actor="nats")
    assert [(r["action"], r["status"], r["target"], r.get("request_id")) for r in nats_delete] == [
        ("model.delete", 404, name, None)
    ]

    # No secret anywhere in the stream, nor a key's digest; the refused token neither.
    raw = b"\n".join(data for data, _ in await stored(nats_url))
    for secret in (s.admin, made["key"], read["key"], wrong):
        assert secret.encode() not in raw and digest(secret).encode() not in raw
    assert f"audit.gateway.key.create.{made['id']}".encode() not in raw  # made never created a key
    assert f"audit.gateway.key.create.{read['id']}".encode() in raw  # its refused attempt, by subject


async def test_a_claimed_actor_is_bounded_and_still_recorded(stack, nats_url) -> None:
    """Whoever may publish admin requests may claim any actor in the header; it is kept as said,
    cut to 64 characters, and cannot break the subject it goes to."""
    claimed = "ops team > *.all " + "é" * 100
    nc = await nats.connect(nats_url)
    try:
        headers = {"Llm-Router-Actor": claimed, "Llm-Router-Request-Id": "r" * 500}
        reply = await nc.request("admin.model.delete", b'{"name": "claimed-nothing"}', timeout=10, headers=headers)
        assert msgspec.json.decode(reply.data)["status"] == 404
    finally:
        await nc.close()
    deadline = time.monotonic() + 5
    while not (found := [r for _, r in await stored(nats_url) if r.get("target") == "claimed-nothing"]):
        assert time.monotonic() < deadline, "no record of the request"
        await stack.registry.audit.flush()
        await asyncio.sleep(0.05)
    (record,) = found
    assert record["actor"] == claimed[:63] + "…" and len(record["request_id"]) == 64
    answer = await stack.client.get("/v0/audit", params={"actor": record["actor"]}, headers=stack.bearer())
    assert [r["target"] for r in answer.json()["data"]] == ["claimed-nothing"]


async def test_the_audit_log_pages_newest_first_with_filters(stack) -> None:
    s = stack
    pager = await s.create_key(scopes=["admin"])  # an actor of its own: its records are exactly these
    for i in range(7):
        answer = await s.client.delete(f"/v0/keys/key_nope{i}", headers=s.bearer(pager["key"]))
        assert answer.status_code == 404
    await flushed(s)

    async def page(**params) -> dict:
        answer = await s.client.get("/v0/audit", params=params, headers=s.bearer())
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "list" and body["has_more"] == (body["next_before"] is not None)
        return body

    pages, before = [], None
    while True:
        body = await page(actor=pager["id"], limit=3, **({"before": before} if before else {}))
        pages.append([r["target"] for r in body["data"]])
        if not body["has_more"]:
            break
        before = body["next_before"]
        assert before == body["data"][-1]["seq"]
    assert pages == [["key_nope6", "key_nope5", "key_nope4"], ["key_nope3", "key_nope2", "key_nope1"], ["key_nope0"]]

    record = (await page(actor=pager["id"], limit=1))["data"][0]
    assert record["object"] == "audit_record" and record["component"] == "gateway"
    assert (record["actor"], record["action"], record["status"], record["code"]) == (
        pager["id"],
        "key.revoke",
        404,
        "key_not_found",
    )
    assert set(record) >= {"seq", "id", "at", "method", "path", "request_id", "duration_ms", "detail"}

    revokes = (await page(action="key.revoke", limit=500))["data"]
    assert len(revokes) >= 7 and {r["action"] for r in revokes} == {"key.revoke"}
    assert [r["seq"] for r in revokes] == sorted((r["seq"] for r in revokes), reverse=True)
    assert (await page(action="key.create", actor=pager["id"])) == {
        "object": "list",
        "data": [],
        "next_before": None,
        "has_more": False,
    }
    created = (await page(action="key.create", component="gateway", limit=500))["data"]
    assert pager["id"] in {r["target"] for r in created}

    newest = await page(limit=2)
    seqs = [r["seq"] for r in newest["data"]]
    assert len(seqs) == 2 and seqs[0] > seqs[1] and newest["next_before"] == seqs[1]
    last = (await s.gateway.js.stream_info(storage.AUDIT)).state.last_seq
    assert seqs[0] == last
    older = await page(limit=500, before=seqs[1])
    assert older["data"] and all(r["seq"] < seqs[1] for r in older["data"])

    await s.refuses(
        "/v0/audit",
        (
            ({"limit": 0}, "limit"),
            ({"limit": 501}, "limit"),
            ({"limit": "x"}, "limit"),
            ({"before": 0}, "before"),
            ({"action": "register"}, "action"),
            ({"action": "a.b.c"}, "action"),
            ({"action": "model.register\n"}, "action"),
            ({"component": "Gateway"}, "component"),
            ({"actor": "x" * 65}, "actor"),
        ),
    )
    # Reading the audit log is administration: a read key may not.
    read = await s.create_key(scopes=["read"])
    assert (await s.client.get("/v0/audit", headers=s.bearer(read["key"]))).status_code == 403
    assert (await s.client.get("/v0/audit")).status_code == 401


async def test_without_keys_the_actor_is_local(nats_url) -> None:
    gateway = Gateway(nats_url=nats_url, auth=False)
    await gateway.start(serve_http=False)
    try:
        import httpx

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw") as client:
            node = f"nowhere-{uuid.uuid4().hex[:6]}"
            assert (await client.post(f"/v0/nodes/{node}/drain")).status_code == 404
            await gateway.audit.flush()
            body = (await client.get("/v0/audit", params={"actor": "local", "limit": 1})).json()
        assert [(r["target"], r["action"], r["status"]) for r in body["data"]] == [(node, "node.drain", 404)]
    finally:
        await gateway.stop()


@pytest.mark.e2e
def test_the_keys_cli_records_what_it_does(nats_url) -> None:
    from conftest import Proc

    made = Proc(["keys", "--nats-url", nats_url, "create", "by-cli", "--scope", "read"])
    assert made.popen.wait(30) == 0, made.output()
    created = msgspec.json.decode(made.output()[: made.output().rindex("}") + 1])
    assert Proc(["keys", "--nats-url", nats_url, "rm", created["id"]]).popen.wait(30) == 0
    assert Proc(["keys", "--nats-url", nats_url, "rm", created["id"]]).popen.wait(30) == 1
    records = [r for _, r in asyncio.run(stored(nats_url)) if r.get("target") == created["id"]]
    assert [(r["component"], r["actor"], r["action"], r["status"]) for r in records] == [
        ("cli", "nats", "key.create", 201),
        ("cli", "nats", "key.revoke", 200),
        ("cli", "nats", "key.revoke", 404),
    ]
    assert records[0]["detail"] == {"name": "by-cli", "scopes": ["read"]}
    raw = b"".join(data for data, _ in asyncio.run(stored(nats_url)))
    assert created["key"].encode() not in raw


async def test_an_unwritable_audit_log_neither_slows_nor_fails_requests(stack, nats_url) -> None:
    """Last in this module: it deletes the AUDIT stream (and with it the records above)."""
    s = stack
    retried = s.gateway.audit.retried
    await s.gateway.js.delete_stream(storage.AUDIT)
    started = time.monotonic()
    answer = await s.client.delete("/v0/keys/key_while_down", headers=s.bearer())
    assert answer.status_code == 404 and time.monotonic() - started < 0.5
    deadline = time.monotonic() + 5
    while s.gateway.audit.retried == retried:  # refused (no stream): kept and retried
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert s.gateway.audit.pending >= 1
    health = (await s.client.get("/healthz")).json()["audit"]
    assert health["pending"] >= 1 and health["retried"] >= 1
    await provision(s.gateway.js)  # the stream back, as any component's start or reconnection does
    await s.gateway.audit.flush()
    assert s.gateway.audit.pending == 0
    assert [r["target"] for _, r in await stored(nats_url) if r["action"] == "key.revoke"] == ["key_while_down"]
