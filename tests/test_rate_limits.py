"""Rate limits per API key on the real gateway app, with a real registry and node (tests/inprocess.py).

Limits are token buckets of a minute's allowance that refill continuously: a key of 60 requests
a minute gets 60 at once, then one a second; a key of 60 tokens a minute is refused once its
answers' usage (2 tokens each from the instant engine) has used them up, and works again as
they refill. The official openai SDK sees OpenAI's 429 (``openai.RateLimitError``).
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import openai
import pytest
from inprocess import minimal_engine, running

from events import codec
from events.messages import ApiKey, RegisterModel
from gateway.auth import new_key

MODEL = "rl-tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
ANSWER_TOKENS = minimal_engine.USAGE.total_tokens


@pytest.fixture(scope="module")
async def stack(nats_url, tiny_gguf, tmp_path_factory):
    async with running(nats_url, tmp_path_factory.mktemp("rate-limits")) as stack:
        reply = await stack.registry.register(RegisterModel(path=str(tiny_gguf), name=MODEL))
        assert reply.ok, reply.message
        await stack.serving(MODEL)
        yield stack
        await stack.registry.delete(MODEL)


def sdk(stack, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key=secret, http_client=stack.client, max_retries=0)


def error_of(answer) -> dict:
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_a_request_limit_refuses_with_openai_429_then_refills(stack) -> None:
    key = await stack.create_key(scopes=["inference"], requests_per_minute=60)
    assert key["requests_per_minute"] == 60 and key["tokens_per_minute"] is None
    headers = stack.bearer(key["key"])
    started, answered = time.monotonic(), 0
    while True:
        answer = await stack.client.get("/v1/models", headers=headers)
        if answer.status_code != 200:
            break
        answered += 1
        assert answer.headers["x-ratelimit-limit-requests"] == "60"
        assert int(answer.headers["x-ratelimit-remaining-requests"]) <= 60 - answered + 1 + (time.monotonic() - started)
        assert "x-ratelimit-limit-tokens" not in answer.headers  # no token limit on this key
        assert answered <= 100, "never refused"
    # The burst is the minute's allowance, plus what refilled while it was spent (one a second).
    assert 60 <= answered <= 61 + (time.monotonic() - started), answered
    assert answer.status_code == 429
    error = error_of(answer)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert key["id"] in error["message"] and "Limit 60" in error["message"]
    assert answer.headers["retry-after"] == "1" and 0 < int(answer.headers["retry-after-ms"]) <= 1000
    assert answer.headers["x-ratelimit-remaining-requests"] == "0"

    with pytest.raises(openai.RateLimitError) as refused:  # what an OpenAI client sees
        await sdk(stack, key["key"]).models.list()
    assert refused.value.status_code == 429 and refused.value.body["type"] == "requests"

    await asyncio.sleep(int(answer.headers["retry-after-ms"]) / 1000 + 0.05)  # one request refilled
    assert (await stack.client.get("/v1/models", headers=headers)).status_code == 200
    assert (await stack.client.get("/v1/models", headers=headers)).status_code == 429  # and only one


async def test_a_token_limit_refuses_once_answers_used_it_up(stack) -> None:
    key = await stack.create_key(scopes=["inference"], tokens_per_minute=60)
    client = sdk(stack, key["key"])
    answered = 0
    started = time.monotonic()
    while True:
        try:
            raw = await client.chat.completions.with_raw_response.create(**CHAT)
        except openai.RateLimitError as exc:
            refused = exc
            break
        completion = raw.parse()
        assert completion.usage.total_tokens == ANSWER_TOKENS
        answered += 1
        # The headers say what was left when the request was let in (before its answer was charged).
        remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
        assert remaining <= 60 - (answered - 1) * ANSWER_TOKENS + (time.monotonic() - started) + 1
        assert answered <= 40, "never refused"
    # 60 tokens at 2 an answer, plus what refilled meanwhile (one token a second).
    assert 30 <= answered <= 30 + (time.monotonic() - started) / ANSWER_TOKENS + 1, answered
    assert refused.status_code == 429
    assert (refused.body["type"], refused.body["code"]) == ("tokens", "rate_limit_exceeded")
    assert "tokens per min (TPM): Limit 60" in refused.body["message"]
    wait_ms = int(refused.response.headers["retry-after-ms"])
    assert refused.response.headers["retry-after"] == str(max(1, -(-wait_ms // 1000)))
    assert refused.response.headers["x-ratelimit-remaining-tokens"] == "0"

    # Reads are not inference: a key out of tokens still lists models.
    assert (await stack.client.get("/v1/models", headers=stack.bearer(key["key"]))).status_code == 200
    await asyncio.sleep(wait_ms / 1000 + 0.05)
    assert (await client.chat.completions.create(**CHAT)).choices[0].message.content == minimal_engine.TEXT

    # A streamed answer is charged too, once its usage is known at the end.
    other = await stack.create_key(scopes=["inference"], tokens_per_minute=1000)
    stream = await sdk(stack, other["key"]).chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True}
    )
    async for _ in stream:
        pass
    budget = stack.gateway.rate_limiter.budgets[other["id"]]
    assert 1000 - ANSWER_TOKENS <= budget.tokens < 1000 - ANSWER_TOKENS + 1


async def test_keys_without_limits_are_not_limited(stack) -> None:
    key = await stack.create_key(scopes=["inference"])
    assert key["requests_per_minute"] is None and key["tokens_per_minute"] is None
    client = sdk(stack, key["key"])
    for _ in range(80):
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
        assert raw.http_response.status_code == 200
        assert not [name for name in raw.headers if name.startswith("x-ratelimit")]
    assert key["id"] not in stack.gateway.rate_limiter.budgets


async def test_limits_are_validated_listed_and_kept_in_the_key_record(stack) -> None:
    for bad in (0, -1, "10", 10**10, 1.5):
        answer = await stack.client.post(
            "/v0/keys", json={"name": "x", "scopes": ["inference"], "requests_per_minute": bad}, headers=stack.bearer()
        )
        assert answer.status_code == 400, (bad, answer.text)
        assert error_of(answer)["param"] == "requests_per_minute"
    key = await stack.create_key(scopes=["inference"], requests_per_minute=5, tokens_per_minute=1000)
    listing = (await stack.client.get("/v0/keys", headers=stack.bearer())).json()["data"]
    listed = next(k for k in listing if k["id"] == key["id"])
    assert (listed["requests_per_minute"], listed["tokens_per_minute"]) == (5, 1000)
    kv = await stack.gateway.js.key_value("keys")
    stored = codec.decode((await kv.get(key["id"])).value, ApiKey)
    assert (stored.requests_per_minute, stored.tokens_per_minute) == (5, 1000)


class ApiKeyBefore(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``ApiKey`` as components before rate limits decode it (events/messages/auth.py then)."""

    id: str
    name: str
    digest: str
    scopes: list[str]
    models: list[str] = []
    created_at: float
    expires_at: float | None = None
    schema: int = 1


def test_key_records_with_and_without_limits_decode_both_ways() -> None:
    _, limited = new_key("new", ["inference"], [], None, requests_per_minute=10, tokens_per_minute=500)
    older = msgspec.json.decode(codec.encode(limited), type=ApiKeyBefore)  # an older gateway reads a new record
    assert (older.id, older.digest, older.scopes) == (limited.id, limited.digest, ["inference"])
    _, plain = new_key("old", ["read"], [], 7)
    assert b"per_minute" not in codec.encode(plain)  # omitted when unset: such records are as before
    encoded = msgspec.json.encode(msgspec.json.decode(codec.encode(plain), type=ApiKeyBefore))  # an old record
    again = codec.decode(encoded, ApiKey)
    assert again.requests_per_minute is None and again.tokens_per_minute is None and again.id == plain.id


@pytest.mark.e2e
def test_the_keys_cli_creates_keys_with_limits(nats_url) -> None:
    from conftest import Proc

    made = Proc(
        ["keys", "--nats-url", nats_url, "create", "limited", "--scope", "inference", "--rpm", "7", "--tpm", "900"]
    )
    assert made.popen.wait(30) == 0, made.output()
    created = msgspec.json.decode(made.output()[: made.output().rindex("}") + 1])
    assert (created["requests_per_minute"], created["tokens_per_minute"]) == (7, 900)
    listed = Proc(["keys", "--nats-url", nats_url, "ls"])
    assert listed.popen.wait(30) == 0
    line = next(line for line in listed.output().splitlines() if created["id"] in line)
    assert "7/min requests" in line and "900/min tokens" in line
    refused = Proc(["keys", "--nats-url", nats_url, "create", "x", "--scope", "read", "--rpm", "0"])
    assert refused.popen.wait(30) == 2 and "1 to 1000000000" in refused.output()
    assert Proc(["keys", "--nats-url", nats_url, "rm", created["id"]]).popen.wait(30) == 0
