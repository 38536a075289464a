"""Cloud providers behind the gateway, asked with the official ``openai`` SDK.

The three providers are fakes run by the tests (tests/fake_providers.py), each on its own port
and speaking its real protocol: OpenAI's API, Anthropic's Messages API with its SSE event types
and tool_use blocks, Google's OpenAI-compatible endpoint. The gateway is the real one, in
process (httpx.ASGITransport) on the session's nats-server, except where a test needs real
sockets (streaming without buffering).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import time
import uuid
from contextlib import asynccontextmanager

import httpx
import openai
import pytest
from fake_providers import FAKES, KEYS

from events import codec, storage, subjects
from events.messages import HistoryRecord, UsageDay
from gateway import Gateway
from gateway.auth import new_key
from gateway.providers import Clouds, PriceTable, ProviderSettings

OPENAI, ANTHROPIC, GOOGLE = "openai:gpt-4o-mini", "anthropic:claude-3-5-haiku-20241022", "google:gemini-2.0-flash"
CHAT_MODELS = (OPENAI, ANTHROPIC, GOOGLE)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PRICES = {
    "openai:gpt-4o-mini*": {"input": 1.0, "output": 2.0},
    "anthropic:claude-3-5-haiku*": {"input": 3.0, "output": 5.0},
}


def settings(fakes: dict, **keys: str | None) -> list[ProviderSettings]:
    """The three providers pointed at the fakes; ``keys`` overrides a provider's key (None: unset)."""
    bases = {"openai": "/v1", "anthropic": "", "google": "/v1beta/openai"}
    return [ProviderSettings(name, keys.get(name, KEYS[name]), fakes[name].url + bases[name]) for name in FAKES]


@pytest.fixture(scope="module")
async def fakes():
    started = {name: await kind().start() for name, kind in FAKES.items()}
    yield started
    for fake in started.values():
        await fake.stop()


@asynccontextmanager
async def serving(nats_url: str, clouds: Clouds, *, auth: bool = False, http: bool = False):
    gateway = Gateway(nats_url=nats_url, auth=auth, clouds=clouds, port=0)
    await gateway.start(serve_http=http)
    await clouds.catalog.attempted()
    try:
        yield gateway
    finally:
        await gateway.stop()


def sdk(gateway: Gateway, key: str = "unused") -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gateway")
    return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=key, http_client=http, max_retries=0)


@pytest.fixture(scope="module")
async def gateway(nats_url, fakes, tmp_path_factory):
    prices = tmp_path_factory.mktemp("prices") / "prices.json"
    prices.write_text(json.dumps(PRICES))
    async with serving(nats_url, Clouds(settings(fakes), prices=PriceTable.load(prices))) as gateway:
        yield gateway


@pytest.fixture
async def client(gateway):
    async with sdk(gateway) as client:
        yield client


def last_request(fake, path: str) -> dict:
    return next(r for r in reversed(fake.requests) if r["path"].endswith(path))


async def collect(stream) -> tuple[str, str | None, dict[int, dict], object]:
    """(text, finish reason, tool calls by index, usage) of a streamed chat."""
    text, finish, calls, usage = [], None, {}, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            text.append(choice.delta.content or "")
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                if call.function:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
    return "".join(text), finish, calls, usage


# ---------------------------------------------------------------- chat, streamed and not


@pytest.mark.parametrize("model", CHAT_MODELS)
async def test_a_chat_goes_to_the_provider_its_prefix_names(client, fakes, model) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    raw = await client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=20)
    answer = raw.parse()
    assert answer.choices[0].message.content == "echo: hello there"
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (4, 3)  # the fakes count words
    provider, name = model.split(":", 1)
    assert raw.headers["x-provider"] == provider and raw.headers["x-request-id"]
    sent = last_request(fakes[provider], "/messages" if provider == "anthropic" else "/chat/completions")
    assert sent["body"]["model"] == name  # the provider's own name, without our prefix
    if provider == "anthropic":  # translated to the Messages API
        assert sent["body"]["system"] == "Be brief." and sent["body"]["max_tokens"] == 20
        assert sent["body"]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
        assert sent["headers"]["x-api-key"] == KEYS["anthropic"] and sent["headers"]["anthropic-version"]
    else:  # passed through as the client sent it
        assert sent["body"]["messages"] == messages
        assert sent["headers"]["authorization"] == f"Bearer {KEYS[provider]}"


@pytest.mark.parametrize("model", CHAT_MODELS)
async def test_a_streamed_chat_arrives_as_openai_chunks_with_usage(client, model) -> None:
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, calls, usage = await collect(stream)
    assert (text, finish, calls) == ("echo: one two three", "stop", {})
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 4)


async def test_without_include_usage_the_stream_has_no_usage_chunk_but_usage_is_counted(client, gateway) -> None:
    """The gateway asks OpenAI for the usage chunk (to count tokens) and keeps it from the client."""
    response = await client._client.post(
        "http://gateway/v1/chat/completions",
        json={"model": OPENAI, "messages": [{"role": "user", "content": "count me"}], "stream": True},
    )
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(chunk["choices"] for chunk in chunks)  # no choices-less usage chunk
    record = await history_of(gateway, response.headers["x-request-id"], OPENAI)
    assert record.stream and record.usage is not None and record.usage.completion_tokens == 3
    assert record.response["choices"][0]["message"]["content"] == "echo: count me"


# ---------------------------------------------------------------- tools and structured output


@pytest.mark.parametrize("model", CHAT_MODELS)
async def test_tool_calls_round_trip_through_every_provider(client, fakes, model) -> None:
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    answer = await client.chat.completions.create(model=model, messages=ask, tools=[WEATHER], tool_choice="auto")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    if model == ANTHROPIC:
        sent = last_request(fakes["anthropic"], "/messages")["body"]
        assert sent["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]
        assert sent["tool_choice"] == {"type": "auto"}

    follow_up = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    final = await client.chat.completions.create(model=model, messages=follow_up, tools=[WEATHER])
    assert final.choices[0].message.content == "The tool said: sunny, 21 C"
    if model == ANTHROPIC:  # tool_use and tool_result blocks, in Anthropic's shape
        sent = last_request(fakes["anthropic"], "/messages")["body"]["messages"]
        assert sent[1]["content"][0] == {
            "type": "tool_use",
            "id": call.id,
            "name": "get_weather",
            "input": {"city": "Paris"},
        }
        assert sent[2] == {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}],
        }

    stream = await client.chat.completions.create(model=model, messages=ask, tools=[WEATHER], stream=True)
    text, finish, calls, _ = await collect(stream)
    assert finish == "tool_calls" and text == ""
    assert [c["name"] for c in calls.values()] == ["get_weather"] and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("model", [OPENAI, ANTHROPIC])
async def test_structured_output_follows_the_schema(client, fakes, model) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "rain": {"type": "boolean"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema}}
    answer = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "forecast"}], response_format=response_format
    )
    assert json.loads(answer.choices[0].message.content) == {"city": "Paris", "rain": True}
    assert answer.choices[0].finish_reason == "stop"
    if model == ANTHROPIC:  # a forced tool: Anthropic has no JSON mode
        sent = last_request(fakes["anthropic"], "/messages")["body"]
        assert sent["tool_choice"] == {"type": "tool", "name": "json_response"}
    else:
        assert last_request(fakes["openai"], "/chat/completions")["body"]["response_format"] == response_format
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "forecast"}], response_format=response_format, stream=True
    )
    text, finish, calls, _ = await collect(stream)
    assert json.loads(text) == {"city": "Paris", "rain": True} and finish == "stop" and not calls


async def test_an_image_part_reaches_anthropic_as_an_image_block(client, fakes) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    content = [
        {"type": "text", "text": "what is it"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    ]
    answer = await client.chat.completions.create(model=ANTHROPIC, messages=[{"role": "user", "content": content}])
    assert answer.choices[0].message.content == "echo: what is it"
    block = last_request(fakes["anthropic"], "/messages")["body"]["messages"][0]["content"][1]
    assert block == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}


# ---------------------------------------------------------------- embeddings and completions


@pytest.mark.parametrize("model", ["openai:text-embedding-3-small", "google:text-embedding-004"])
async def test_embeddings_where_the_provider_has_them(client, model) -> None:
    result = await client.embeddings.create(model=model, input=["alpha", "beta gamma"])
    assert [len(e.embedding) for e in result.data] == [8, 8] and result.usage.prompt_tokens == 3
    encoded = await client.embeddings.create(model=model, input="alpha", encoding_format="base64")
    packed = base64.b64decode(encoded.data[0].embedding)  # base64 little-endian float32, as the provider sent it
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == result.data[0].embedding


async def test_embeddings_on_anthropic_are_refused_before_any_call(client, fakes) -> None:
    before = len(fakes["anthropic"].requests)
    with pytest.raises(openai.BadRequestError) as error:
        await client.embeddings.create(model=ANTHROPIC, input="x")
    assert error.value.code == "unsupported_capability" and "embeddings" in error.value.message
    assert len(fakes["anthropic"].requests) == before


async def test_legacy_completions_pass_through_to_openai(client) -> None:
    answer = await client.completions.create(model="openai:gpt-4o-mini", prompt="say this")
    assert answer.choices[0].text == " echo: say this" and answer.usage.total_tokens == 5


# ---------------------------------------------------------------- errors


async def test_provider_errors_keep_the_providers_status_in_openai_shape(client) -> None:
    with pytest.raises(openai.NotFoundError) as error:  # OpenAI: the model does not exist there
        await client.chat.completions.create(model="openai:gpt-9", messages=[{"role": "user", "content": "x"}])
    assert error.value.code == "model_not_found" and "gpt-9" in error.value.message
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="openai:rate-limited", messages=[{"role": "user", "content": "x"}])
    assert limited.value.status_code == 429
    with pytest.raises(openai.NotFoundError) as missing:  # Anthropic's error body
        await client.chat.completions.create(model="anthropic:claude-0", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["type"] == "not_found_error" and "claude-0" in missing.value.message
    with pytest.raises(openai.NotFoundError) as google:  # Google's, wrapped in a list
        await client.chat.completions.create(model="google:gemini-0", messages=[{"role": "user", "content": "x"}])
    assert "gemini-0" in google.value.message and google.value.body["message"].startswith("google: ")


async def test_a_streamed_error_event_ends_the_stream_with_an_openai_error(client, gateway) -> None:
    stream = await client.chat.completions.with_raw_response.create(
        model="anthropic:claude-overloaded", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError) as error:
        async for _ in stream.parse():
            pass
    assert "Overloaded" in error.value.message
    record = await history_of(gateway, stream.headers["x-request-id"], "anthropic:claude-overloaded")
    assert record.status_code == 529 and "Overloaded" in record.error


async def test_a_wrong_provider_key_is_the_providers_401_without_the_key(nats_url, fakes) -> None:
    wrong = "sk-wrong-key-that-must-not-leak-42"
    async with serving(nats_url, Clouds(settings(fakes, openai=wrong))) as gateway, sdk(gateway) as client:
        with pytest.raises(openai.AuthenticationError) as error:
            await client.chat.completions.create(model=OPENAI, messages=[{"role": "user", "content": "x"}])
        assert error.value.code == "invalid_api_key" and wrong not in error.value.message
        assert wrong[:10] not in error.value.message  # the fake quotes its start, as OpenAI does
        record = await history_of(gateway, None, OPENAI)
        assert wrong not in codec.encode(record).decode()


async def test_a_missing_key_is_a_401_and_an_unknown_prefix_a_400(nats_url, fakes) -> None:
    async with serving(nats_url, Clouds(settings(fakes, openai=None))) as gateway, sdk(gateway) as client:
        with pytest.raises(openai.AuthenticationError) as error:
            await client.chat.completions.create(model=OPENAI, messages=[{"role": "user", "content": "x"}])
        assert error.value.code == "provider_key_missing" and "OPENAI_API_KEY" in error.value.message
        with pytest.raises(openai.BadRequestError) as unknown:
            await client.chat.completions.create(model="mistral:large", messages=[{"role": "user", "content": "x"}])
        assert unknown.value.code == "unknown_provider" and unknown.value.param == "model"
        with pytest.raises(openai.NotFoundError):  # no prefix, not registered: local, and unknown
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        ids = {m.id for m in (await client.models.list()).data}
        assert not any(i.startswith("openai:") for i in ids)  # no key, no list
        assert any(i.startswith("anthropic:") for i in ids) and any(i.startswith("google:") for i in ids)
        answer = await client.chat.completions.create(
            model="ahtnorpic:claude-3-5-haiku-20241022", messages=[{"role": "user", "content": "alias"}]
        )
        assert answer.choices[0].message.content == "echo: alias"  # the original's typo alias


# ---------------------------------------------------------------- model lists


async def test_models_are_listed_with_their_prefix_and_owner(client) -> None:
    models = {m.id: m for m in (await client.models.list()).data}
    for model in (*CHAT_MODELS, "openai:text-embedding-3-small", "google:text-embedding-004"):
        assert model in models, sorted(models)
        assert models[model].owned_by == model.split(":")[0]
    assert not any(m.startswith("google:models/") for m in models)  # listed as requested
    one = await client.models.retrieve(ANTHROPIC)
    assert one.owned_by == "anthropic"


async def test_a_provider_down_keeps_its_stale_list_and_blocks_nobody(nats_url, fakes) -> None:
    clouds = Clouds(settings(fakes), catalog_retry_s=0.2)
    async with serving(nats_url, clouds) as gateway, sdk(gateway) as client:
        google = fakes["google"]
        await google.stop()
        try:
            clouds.catalog.expire()  # a refresh is due: Google's fails, the others work
            deadline = time.monotonic() + 5
            while clouds.catalog.status()["google"]["error"] is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            ids = {m.id for m in (await client.models.list()).data}
            assert GOOGLE in ids and OPENAI in ids and ANTHROPIC in ids  # Google's list is stale, not gone
            status = (await client._client.get("http://gateway/v0/clouds")).json()["data"]
            google_status = next(s for s in status if s["provider"] == "google")["models"]
            assert google_status["stale"] and google_status["models"] == 2
        finally:
            await google.start()
        deadline = time.monotonic() + 5  # retried every 0.2 s: fresh again once Google is back
        while clouds.catalog.status()["google"]["stale"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_a_hanging_provider_never_delays_the_model_list(nats_url, fakes) -> None:
    """A provider that accepts connections and never answers: its list waits 10 s; ours does not."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    hanging = [
        s if s.name != "anthropic" else ProviderSettings("anthropic", KEYS["anthropic"], url) for s in settings(fakes)
    ]
    clouds = Clouds(hanging)
    gateway = Gateway(nats_url=nats_url, auth=False, clouds=clouds)
    await gateway.start(serve_http=False)
    try:
        async with sdk(gateway) as client:
            deadline = time.monotonic() + 5
            while OPENAI not in {m.id for m in (await client.models.list()).data}:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            started = time.monotonic()
            ids = {m.id for m in (await client.models.list()).data}
            assert time.monotonic() - started < 0.5
            assert GOOGLE in ids and not any(i.startswith("anthropic:") for i in ids)
    finally:
        await gateway.stop()
        silent.close()


# ---------------------------------------------------------------- auth, history, usage and cost


async def history_of(gateway: Gateway, request_id: str | None, model: str) -> HistoryRecord:
    """The HISTORY record of a request (or the last one of ``model``), read from the stream."""
    await gateway.history.flush()
    subject = subjects.history_filter("chat", model)  # the last record of the model, whatever its status
    deadline = time.monotonic() + 5
    while True:
        message = await gateway.js.get_last_msg(storage.HISTORY, subject)
        record = codec.decode(message.data, HistoryRecord)
        if request_id is None or record.id == request_id:
            return record
        assert time.monotonic() < deadline, f"no history record {request_id}"
        await asyncio.sleep(0.05)


async def test_keys_limits_history_usage_and_cost(nats_url, fakes, tmp_path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    clouds = Clouds(settings(fakes), prices=PriceTable.load(prices))
    async with serving(nats_url, clouds, auth=True) as gateway:
        tag = uuid.uuid4().hex[:6]
        alice_secret, alice = new_key(f"alice-{tag}", ["inference"], [], None)
        bob_secret, bob = new_key(f"bob-{tag}", ["inference"], [OPENAI], None)
        admin_secret, admin = new_key(f"admin-{tag}", ["admin"], [], None)
        for key in (alice, bob, admin):
            await gateway.keys.add(key)
        async with sdk(gateway, alice_secret) as as_alice, sdk(gateway, bob_secret) as as_bob:
            ask = [{"role": "user", "content": "a b c"}]  # 3 prompt tokens, 4 completion ("echo: a b c")
            await as_alice.chat.completions.create(model=OPENAI, messages=ask)
            stream = await as_alice.chat.completions.create(model=ANTHROPIC, messages=ask, stream=True)
            await collect(stream)
            raw = await as_bob.chat.completions.with_raw_response.create(model=OPENAI, messages=ask)
            with pytest.raises(openai.PermissionDeniedError) as refused:  # bob may only use OPENAI
                await as_bob.chat.completions.create(model=ANTHROPIC, messages=ask)
            assert refused.value.code == "model_not_allowed"
            with pytest.raises(openai.AuthenticationError):  # the gateway's own key check comes first
                async with sdk(gateway, "sk-llmr-nope") as nobody:
                    await nobody.chat.completions.create(model=OPENAI, messages=ask)

        record = await history_of(gateway, raw.headers["x-request-id"], OPENAI)
        assert (record.provider, record.key_id, record.node_id, record.status_code) == ("openai", bob.id, None, 200)
        assert record.usage.prompt_tokens == 3 and record.cost_usd == pytest.approx((3 * 1.0 + 4 * 2.0) / 1e6)
        assert KEYS["openai"] not in codec.encode(record).decode()

        answer = await httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app)).get(
            "http://gateway/v0/usage", headers={"authorization": f"Bearer {admin_secret}"}
        )
        assert answer.status_code == 200, answer.text
        periods = answer.json()["periods"]
        assert set(periods) == {"day", "week", "month"}
        for period in periods.values():
            rows = {(r["provider"], r["model"], r["key_id"]): r for r in period["rows"]}
            assert rows[("openai", OPENAI, alice.id)]["requests"] == 1
            assert rows[("openai", OPENAI, bob.id)]["cost_usd"] == pytest.approx(11e-6)
            haiku = rows[("anthropic", ANTHROPIC, alice.id)]
            assert (haiku["prompt_tokens"], haiku["completion_tokens"]) == (3, 4)
            assert haiku["cost_usd"] == pytest.approx((3 * 3.0 + 4 * 5.0) / 1e6)
            by_key = {r["key_id"]: r for r in period["by_key"]}
            assert by_key[alice.id]["requests"] == 2 and by_key[bob.id]["requests"] == 1
            by_provider = {r["provider"]: r for r in period["by_provider"]}
            assert by_provider["openai"]["requests"] >= 2 and by_provider["anthropic"]["requests"] >= 1
        only_bob = await httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app)).get(
            f"http://gateway/v0/usage?period=month&key_id={bob.id}", headers={"authorization": f"Bearer {admin_secret}"}
        )
        month = only_bob.json()["periods"]["month"]
        assert list(only_bob.json()["periods"]) == ["month"] and month["totals"]["requests"] == 1
        assert month["totals"]["total_tokens"] == 7

        # The counters live in the usage bucket: another gateway adds them up the same.
        kv = await gateway.js.key_value(storage.KV_USAGE)
        entry = await kv.get(storage.usage_key(periods["day"]["start"], "openai", OPENAI, bob.id))
        assert codec.decode(entry.value, UsageDay).requests == 1
    async with serving(nats_url, Clouds(settings(fakes)), auth=True) as other:
        await other.keys.add(admin)
        again = await httpx.AsyncClient(transport=httpx.ASGITransport(app=other.app)).get(
            f"http://gateway/v0/usage?period=day&key_id={bob.id}", headers={"authorization": f"Bearer {admin_secret}"}
        )
        assert again.json()["periods"]["day"]["totals"]["requests"] == 1


# ---------------------------------------------------------------- no buffering


async def test_a_stream_is_relayed_chunk_by_chunk_not_buffered(nats_url, fakes) -> None:
    """Real sockets: the fake waits 0.3 s between words; the first word must arrive long before the last."""
    slow = FAKES["openai"](delay_s=0.3)
    await slow.start()
    try:
        provider = ProviderSettings("openai", KEYS["openai"], slow.url + "/v1")
        async with serving(nats_url, Clouds([provider]), http=True) as gateway:
            client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            started = time.monotonic()
            stream = await client.chat.completions.create(
                model=OPENAI, messages=[{"role": "user", "content": "w1 w2 w3"}], stream=True
            )
            arrivals = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append(time.monotonic() - started)
            await client.close()
            assert len(arrivals) == 4  # "echo:", " w1", " w2", " w3"
            assert arrivals[0] < 0.6 and arrivals[-1] - arrivals[0] > 0.8, arrivals
    finally:
        await slow.stop()
