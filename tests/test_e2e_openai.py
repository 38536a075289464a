"""End to end with the official openai SDK: gateway -> NATS -> node -> llama.cpp, each its own process."""

from __future__ import annotations

import asyncio
import json

import httpx
import nats
import openai
import pytest
from conftest import Stack, requires_llama, wait_until

from events import encode_token

pytestmark = [pytest.mark.e2e, requires_llama]

MODEL = "e2e-tiny"


@pytest.fixture(scope="module")
def stack(nats_url, tiny_gguf, tmp_path_factory):
    stack = Stack(nats_url, tmp_path_factory.mktemp("e2e"))
    reply = stack.register(tiny_gguf, MODEL)
    assert reply["ok"], reply
    wait_until(lambda: MODEL in stack.models(), message=f"{MODEL} in /v1/models")
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL
    assert set(model.model_extra["capabilities"]) == {"chat", "completion", "embedding"}


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8, seed=1
    )
    assert out.object == "chat.completion"
    assert out.model == MODEL
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0
    assert 0 < out.usage.completion_tokens <= 8 or choice.finish_reason == "stop"
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_completion_natural_stop(client: openai.OpenAI) -> None:
    # Token 4 is <|im_end|>, the tiny model's end token: biasing it ends generation at once.
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, logit_bias={"4": 100}
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == ""
    assert out.usage.completion_tokens == 0


def test_chat_streaming(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) > 0


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason is not None
    assert all(c.usage is None for c in chunks)


def test_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="hello", max_tokens=6)
    assert out.object == "text_completion"
    assert isinstance(out.choices[0].text, str)
    assert out.usage.prompt_tokens > 0
    streamed = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=4, stream=True))
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_embeddings_one_vector_per_input(client: openai.OpenAI) -> None:
    single = client.embeddings.create(model=MODEL, input="hello world")
    assert len(single.data) == 1 and len(single.data[0].embedding) == 64
    many = client.embeddings.create(model=MODEL, input=["a", "b c", "d e f"])
    assert [d.index for d in many.data] == [0, 1, 2]
    assert all(len(d.embedding) == 64 for d in many.data)
    assert many.data[0].embedding != many.data[1].embedding
    assert many.usage.prompt_tokens > 0
    as_float = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert as_float.data[0].embedding == pytest.approx(single.data[0].embedding, rel=1e-6)


def test_unknown_model_is_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_bad_input_is_400_with_param(client: openai.OpenAI, stack) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "oracle", "content": "x"}])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert err.value.body["param"] == "temperature"
    raw = httpx.post(stack.url + "/v1/chat/completions", content=b"{not json")
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(stack.url + "/v1/embeddings", json={"input": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    route = httpx.get(stack.url + "/v1/nothing-here")
    assert route.status_code == 404 and "error" in route.json()


def test_registered_but_unserved_model_is_503(client: openai.OpenAI, stack, tmp_path) -> None:
    path = tmp_path / "orphan.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + bytes(64))  # GGUF magic, no model: loads fail
    assert stack.register(path, "orphan")["ok"]
    try:
        # The node reports its load failure; the registry folds it into the model's state.
        wait_until(lambda: httpx.get(stack.url + "/v0/models/orphan").json()["state"] == "error", timeout=15)
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="orphan", messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 503
        assert err.value.response.headers["retry-after"]
        assert "failed to load" in err.value.message and "llama.cpp could not load" in err.value.message
        assert "orphan" not in stack.models()
        assert client.models.retrieve("orphan").model_extra["ready"] is False
    finally:
        asyncio.run(_delete(stack.nats_url, "orphan"))


async def _delete(nats_url: str, name: str) -> None:
    from conftest import admin_request

    await admin_request(nats_url, "admin.model.delete", {"name": name})


def test_registry_events_are_readable_json(stack, tmp_path) -> None:
    """What `nats sub 'registry.events.>'` shows: one JSON object per event."""
    from nodes.demo_model import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "watched.gguf", seed=3)

    async def watch() -> list[dict]:
        nc = await nats.connect(stack.nats_url)
        sub = await nc.subscribe("registry.events.>")
        from conftest import admin_request

        await admin_request(stack.nats_url, "admin.model.register", {"path": str(path), "name": "watched"})
        await admin_request(stack.nats_url, "admin.model.delete", {"name": "watched"})
        events = []
        while len(events) < 2 or events[-1]["event"] != "deleted":
            msg = await sub.next_msg(timeout=10)
            events.append(json.loads(msg.data) | {"subject": msg.subject})
        await nc.close()
        return events

    events = asyncio.run(watch())
    assert events[0]["subject"] == "registry.events.model.added"
    assert events[0]["record"]["name"] == "watched"
    assert events[-1]["subject"] == "registry.events.model.deleted"


def test_duplicate_registration_is_409(stack, tiny_gguf, tmp_path) -> None:
    same = stack.register(tiny_gguf, MODEL)
    assert not same["ok"] and same["status"] == 409  # the same file again: refused, never overwritten
    assert "already registered from the same source" in same["message"]
    from nodes.demo_model import write_tiny_gguf

    other = write_tiny_gguf(tmp_path / "other.gguf")
    clash = stack.register(other, MODEL)
    assert not clash["ok"] and clash["status"] == 409 and str(tiny_gguf) in clash["message"]
    bad = stack.register(tmp_path / "missing.gguf", "missing")
    assert not bad["ok"] and "missing.gguf" in bad["message"]


def test_history_records_every_request_as_json(client: openai.OpenAI, stack) -> None:
    """What `nats stream view HISTORY` shows; a streamed answer is recorded whole."""
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "history please"}], max_tokens=10, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    rid = chunks[0].id.removeprefix("chatcmpl-")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope-history", messages=[{"role": "user", "content": "x"}])

    async def read_history() -> list[dict]:
        nc = await nats.connect(stack.nats_url)
        js = nc.jetstream()
        records = []
        sub = await js.subscribe("history.>", ordered_consumer=True)
        info = await js.stream_info("HISTORY")
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=5)
            records.append(json.loads(msg.data) | {"subject": msg.subject})
        await nc.close()
        return records

    def find():
        records = asyncio.run(read_history())
        mine = [r for r in records if r["id"] == rid]
        refused = [r for r in records if r["model"] == "nope-history"]
        return (mine, refused) if mine and refused else None

    mine, refused = wait_until(find, timeout=10, message="history records")
    record = mine[0]
    # history.<capability>.<model>.<class>.<status>.<node>.<key>: `nats sub 'history.chat.e2e-tiny.>'`
    assert record["subject"] == f"history.chat.e2e-tiny.2xx.200.{encode_token(record['node_id'])}.-"
    assert record["endpoint"] == "/v1/chat/completions"
    assert record["stream"] is True and record["status_code"] == 200
    assert record["response"]["choices"][0]["message"]["content"] == streamed
    assert record["request"]["messages"][0]["content"] == "history please"
    assert record["node_id"] and record["duration_ms"] > 0 and record["usage"]["completion_tokens"] > 0
    assert refused[0]["status_code"] == 404


def test_healthz(stack) -> None:
    health = httpx.get(stack.url + "/healthz").json()
    assert health["status"] == "ok" and health["nodes"] >= 1
