"""OpenAI compatibility in depth, with the official SDK against llama.cpp on tiny random-weight
GGUFs through a real stack (registry, gateway, node processes): structured outputs, tools
(forced, streamed, fed back), logprobs, n, seed, stop, and refusals of what is not supported.

Random weights write junk, so every output that must parse is grammar-constrained, with small
schemas (short strings, integers, enums) and enough max_tokens for the JSON to close. Two
models: one whose ChatML template knows nothing of tools (tools go into a system prompt), one
whose template renders tools and calls itself (Qwen style).
"""

from __future__ import annotations

import json
import math
import threading
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from conftest import Stack, requires_llama
from pydantic import BaseModel, Field
from tool_models import PING, SCHEMAS, WEATHER, refused, sdk_client, serve_chat_models

from events import codec, subjects
from events.json_schema import unenforceable
from events.messages import ToolCall
from events.openai import ChatCompletionBody, ChatMessage
from nodes.runtimes.tool_calls import HERMES, LLAMA3, AutoSplitter, CallScanner, parse_calls, prompt_messages

pytestmark = [pytest.mark.e2e, requires_llama]

PLAIN = "depth-chatml"
NATIVE = "depth-tools"
HI = [{"role": "user", "content": "hi"}]
NO_END = {"2": -100, "4": -100}  # the tiny model's end tokens (</s>, <|im_end|>): it runs to the limit

TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "ping", "parameters": PING}},
]


@pytest.fixture(scope="module")
def stack(nats_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("depth")
    stack = Stack(nats_url, tmp)
    serve_chat_models(stack, tmp, PLAIN, NATIVE)
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return sdk_client(stack)


# ---------------------------------------------------------------- no silent drops


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"function_call": "auto"}, "function_call"),
        ({"verbosity": "low"}, "verbosity"),
    ],
)
def test_output_changing_fields_not_supported_are_400_naming_them(client, extra, param) -> None:
    message = refused(lambda: client.chat.completions.create(model=PLAIN, messages=HI, extra_body=extra), param)
    assert param in message


def test_harmless_metadata_is_accepted(client) -> None:
    out = client.chat.completions.create(
        model=PLAIN, messages=HI, max_tokens=2, user="u1", metadata={"a": "b"}, store=False, service_tier="auto",
        modalities=["text"],
    )  # fmt: skip
    assert out.choices[0].finish_reason in ("stop", "length")


def test_inconsistent_or_unenforceable_requests_are_400(client) -> None:
    chat = client.chat.completions.create
    refused(lambda: chat(model=PLAIN, messages=HI, top_logprobs=3), "top_logprobs", "invalid_value")
    refused(lambda: chat(model=PLAIN, messages=HI, tool_choice="required"), "tool_choice", "invalid_value")
    named = {"type": "function", "function": {"name": "nope"}}
    refused(lambda: chat(model=PLAIN, messages=HI, tools=TOOLS, tool_choice=named), "tool_choice", "invalid_value")
    bounded = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": bounded}}
    message = refused(
        lambda: chat(model=PLAIN, messages=HI, response_format=schema_format), "response_format", "unsupported_schema"
    )
    assert "'minimum'" in message and "$.properties.age" in message
    tool = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"x": {"type": "string", "format": "email"}}},
            },
        }
    ]
    refused(lambda: chat(model=PLAIN, messages=HI, tools=tool), "tools", "unsupported_schema")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
    refused(lambda: chat(model=PLAIN, messages=image, tools=TOOLS), "tools")  # the LLaVA handler has no tools
    refused(lambda: client.completions.create(model=PLAIN, prompt="x", suffix="y"), "suffix")
    refused(lambda: client.completions.create(model=PLAIN, prompt="x", best_of=3), "best_of")
    with pytest.raises(openai.BadRequestError) as err:
        chat(model=PLAIN, messages=HI, n=9)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        chat(model=PLAIN, messages=HI, logprobs=True, top_logprobs=21)
    assert err.value.body["param"] == "top_logprobs"


def test_models_list_their_features(client) -> None:
    entry = client.models.retrieve(PLAIN).model_extra
    assert {"tools", "json_schema", "json_object", "logprobs", "n"} <= set(entry["features"])


# ---------------------------------------------------------------- structured outputs


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("model", [PLAIN, NATIVE])
def test_json_schema_output_validates_streamed_and_not(client, model) -> None:
    for seed in (1, 2):
        out = client.chat.completions.create(
            model=model, messages=HI, max_tokens=120, seed=seed, response_format=_schema_format(WEATHER)
        )
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), WEATHER)
    chunks = client.chat.completions.create(
        model=model, messages=HI, max_tokens=120, seed=3, stream=True, response_format=_schema_format(WEATHER)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), WEATHER)


def test_json_object_is_an_object(client) -> None:
    # Any object may nest without end: a short limit, and a natural end or "length" honestly.
    out = client.chat.completions.create(
        model=PLAIN, messages=HI, max_tokens=300, seed=4, response_format={"type": "json_object"}
    )
    text, finish = out.choices[0].message.content, out.choices[0].finish_reason
    assert text.lstrip().startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and out.usage.completion_tokens == 300


class Forecast(BaseModel):
    city: str = Field(max_length=6)
    unit: Literal["c", "f"]
    days: int
    windy: bool


def test_parse_with_a_pydantic_model_returns_a_parsed_object(client) -> None:
    out = client.chat.completions.parse(model=PLAIN, messages=HI, max_tokens=150, seed=5, response_format=Forecast)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Forecast)
    assert len(parsed.city) <= 6 and parsed.unit in ("c", "f")


def test_length_cut_is_honest(client) -> None:
    out = client.chat.completions.create(
        model=PLAIN, messages=HI, max_tokens=3, response_format=_schema_format(WEATHER)
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


# ---------------------------------------------------------------- tools


def _valid_call(name: str, arguments: str) -> dict:
    assert name in SCHEMAS
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


@pytest.mark.parametrize("model", [PLAIN, NATIVE])
def test_required_and_named_tool_calls_validate(client, model) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, seed in (("required", 1), ("required", 2), (named, 3)):
        out = client.chat.completions.create(
            model=model, messages=HI, tools=TOOLS, tool_choice=choice, max_tokens=300, seed=seed
        )
        answer = out.choices[0]
        assert answer.finish_reason == "tool_calls"
        assert answer.message.tool_calls and answer.message.content is None
        for call in answer.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            _valid_call(call.function.name, call.function.arguments)
        if choice is named:
            assert [c.function.name for c in answer.message.tool_calls] == ["get_weather"]


def test_one_call_when_parallel_calls_are_off(client) -> None:
    for seed in range(3):
        out = client.chat.completions.create(
            model=PLAIN, messages=HI, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            max_tokens=300, seed=seed,
        )  # fmt: skip
        assert len(out.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("model", [PLAIN, NATIVE])
def test_streamed_call_fragments_reassemble_to_the_same_call(client, model) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model=model, messages=HI, tools=TOOLS, tool_choice=named, max_tokens=300, seed=11)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    fragments = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert len(fragments) > 2  # an opening fragment, then the arguments piece by piece
    first = fragments[0]
    assert first.index == 0 and first.id.startswith("call_") and first.function.name == "get_weather"
    assert all(f.id is None and f.function.name is None for f in fragments[1:])
    arguments = "".join(f.function.arguments or "" for f in fragments)
    assert arguments == whole.function.arguments
    _valid_call("get_weather", arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # The SDK's own stream helper puts the fragments back together the same way.
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == whole.function.arguments


@pytest.mark.parametrize("model", [PLAIN, NATIVE])
def test_a_tool_result_round_trips(client, model) -> None:
    first = client.chat.completions.create(
        model=model, messages=HI, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}},
        max_tokens=100, seed=1,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    result = "the weather service says: sunny, 21 degrees, light wind from the west"
    history = [
        *HI,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    again = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=4, seed=2)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The call and its result are in the prompt (the tiny vocabulary: about a token per character).
    grown = again.usage.prompt_tokens - first.usage.prompt_tokens
    assert grown > len(result) // 2 + len(call.function.arguments) // 2


def test_auto_falls_back_to_plain_content(client) -> None:
    out = client.chat.completions.create(model=PLAIN, messages=HI, tools=TOOLS, max_tokens=8, seed=1)
    answer = out.choices[0]
    assert answer.message.tool_calls is None and isinstance(answer.message.content, str)
    assert answer.finish_reason in ("stop", "length")


def test_auto_with_a_response_format_calls_or_answers_in_that_format(client) -> None:
    for seed in range(4):
        out = client.chat.completions.create(
            model=NATIVE, messages=HI, tools=TOOLS, max_tokens=400, seed=seed, response_format=_schema_format(PING)
        )
        answer = out.choices[0]
        if answer.message.tool_calls:
            assert answer.finish_reason == "tool_calls"
            for call in answer.message.tool_calls:
                _valid_call(call.function.name, call.function.arguments)
        else:
            assert answer.finish_reason == "stop"
            jsonschema.validate(json.loads(answer.message.content), PING)


def test_tool_choice_none_is_plain_chat(client) -> None:
    out = client.chat.completions.create(model=NATIVE, messages=HI, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert out.choices[0].message.tool_calls is None


# ---------------------------------------------------------------- logprobs


def _real_logprobs(entries) -> None:
    assert entries
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes is not None
        assert 0 < sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6
        assert len(entry.top_logprobs) == 5
        assert all(a.logprob >= b.logprob for a, b in zip(entry.top_logprobs, entry.top_logprobs[1:]))
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-9


def test_chat_logprobs_streamed_and_not(client) -> None:
    out = client.chat.completions.create(model=PLAIN, messages=HI, max_tokens=6, logprobs=True, top_logprobs=5, seed=1)
    entries = out.choices[0].logprobs.content
    _real_logprobs(entries)
    assert len(entries) == out.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=PLAIN, messages=HI, max_tokens=6, logprobs=True, top_logprobs=5, seed=1, stream=True
        )
    )
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    _real_logprobs(streamed)
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries])
    plain = client.chat.completions.create(model=PLAIN, messages=HI, max_tokens=2, logprobs=True)
    assert plain.choices[0].logprobs.content[0].top_logprobs == []


def test_completion_logprobs(client) -> None:
    out = client.completions.create(model=PLAIN, prompt="hello", max_tokens=5, logprobs=3, seed=2, logit_bias=NO_END)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) <= 3 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-6 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    streamed = list(
        client.completions.create(
            model=PLAIN, prompt="hello", max_tokens=5, logprobs=3, seed=2, stream=True, logit_bias=NO_END
        )
    )
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == logprobs.tokens


# ---------------------------------------------------------------- n, seed, stop, limits


def test_n_gives_that_many_choices_with_usage_summed(client) -> None:
    one = client.chat.completions.create(model=PLAIN, messages=HI, max_tokens=5, logit_bias=NO_END)
    out = client.chat.completions.create(model=PLAIN, messages=HI, max_tokens=5, n=3, logit_bias=NO_END)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert out.usage.completion_tokens == 15
    chunks = list(client.chat.completions.create(model=PLAIN, messages=HI, max_tokens=4, n=2, stream=True))
    finals = {
        c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    }
    assert set(finals) == {0, 1}
    completions = client.completions.create(model=PLAIN, prompt="a", max_tokens=3, n=2)
    assert [c.index for c in completions.choices] == [0, 1]


def test_seed_reproduces_on_one_node(client) -> None:
    kwargs = dict(model=PLAIN, messages=HI, max_tokens=16, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    client.chat.completions.create(model=PLAIN, messages=[{"role": "user", "content": "something else"}], max_tokens=8)
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first
    seeded_n = client.chat.completions.create(n=2, **kwargs)
    assert seeded_n.choices[0].message.content == first  # choice i uses seed + i


def test_stop_strings_and_max_completion_tokens(client) -> None:
    base = dict(model=PLAIN, messages=HI, temperature=1.0, seed=7, logit_bias=NO_END)
    text = client.chat.completions.create(max_completion_tokens=40, **base).choices[0].message.content
    limited = client.chat.completions.create(max_completion_tokens=5, **base)
    assert limited.usage.completion_tokens == 5 and limited.choices[0].finish_reason == "length"
    stop = next((text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip(f"the seeded text {text!r} has nothing to stop at")
    for given in (stop, [stop, "\u2603never"]):
        out = client.chat.completions.create(max_completion_tokens=40, stop=given, **base)
        assert out.choices[0].finish_reason == "stop"
        assert out.choices[0].message.content == text[: text.index(stop)]
        streamed = client.chat.completions.create(max_completion_tokens=40, stop=given, stream=True, **base)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_history_records_the_choices_of_a_streamed_answer(client, stack) -> None:
    import asyncio

    import nats

    chunks = list(
        client.chat.completions.create(
            model=PLAIN, messages=HI, tools=TOOLS, tool_choice="required", max_tokens=700, seed=8, stream=True
        )
    )
    rid = chunks[0].id.removeprefix("chatcmpl-")

    async def record() -> dict | None:
        nc = await nats.connect(stack.nats_url)
        try:
            js = nc.jetstream()
            msg = await js.get_last_msg("HISTORY", subjects.history_filter("chat", PLAIN))
            return json.loads(msg.data)
        finally:
            await nc.close()

    from conftest import wait_until

    found = wait_until(lambda: (r := asyncio.run(record())) and r["id"] == rid and r, timeout=10, message="record")
    choice = found["response"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"]


def test_plain_chat_answer_is_unchanged(stack) -> None:
    body = {"model": PLAIN, "messages": HI, "max_tokens": 3}
    answer = httpx.post(stack.url + "/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["logprobs"] is None and "tool_calls" not in answer["choices"][0]["message"]


# ---------------------------------------------------------------- the parts, in process


@pytest.mark.parametrize(
    "schema, problem",
    [
        (WEATHER, None),
        (Forecast.model_json_schema(), None),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"type": "string"}}}, None),
        ({"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]}, None),
        ({"type": "integer", "maximum": 3}, "'maximum'"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "'maxLength'"),
        ({"type": "array", "minItems": 2}, "'minItems'"),
        ({"oneOf": [{"type": "string"}]}, "oneOf"),
        ({"type": "object", "required": ["x"]}, "'required'"),
        ({"type": "object", "properties": {}, "required": ["x"]}, "not in 'properties'"),
        ({"$ref": "https://example.com/s.json"}, "local"),
        ({"type": "string", "format": "email"}, "email"),
        ({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"uniqueItems": True}}}}}, "$.properties.a.properties.b"),
    ],
)  # fmt: skip
def test_schema_keywords_a_grammar_cannot_enforce_are_named(schema, problem) -> None:
    found = unenforceable(schema)
    assert (found is None) if problem is None else (problem in found), found


def test_deep_or_huge_schemas_arerefused() -> None:
    deep: dict = {"type": "string"}
    for _ in range(20):
        deep = {"type": "array", "items": deep}
    assert "deeper" in unenforceable(deep)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}
    assert "more than" in unenforceable(wide)


@pytest.mark.parametrize("form", [HERMES, LLAMA3])
def test_scanner_splits_a_forced_call_however_the_text_arrives(form) -> None:
    arguments = '{"city": "a}\\"b{", "tags": [1, {"x": []}], "n": 2}'
    text = form.render("get_weather", arguments) + form.separator + form.render("ping", '{"ok": true}')
    whole = CallScanner(form)
    whole.feed(text)
    pieces = CallScanner(form)
    fragments = [f for i in range(0, len(text), 3) for f in pieces.feed(text[i : i + 3])]
    expected = [("get_weather", arguments), ("ping", '{"ok": true}')]
    assert [(c.name, c.arguments) for c in whole.result()] == expected
    assert [(c.name, c.arguments) for c in pieces.result()] == expected
    assert [f.name for f in fragments if f.id] == ["get_weather", "ping"]
    assert "".join(f.arguments for f in fragments if f.index == 0) == arguments


def test_calls_in_free_text_are_recognised_or_left_as_content() -> None:
    names = {"get_weather"}
    content, calls = parse_calls(
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>', names
    )
    assert content == "Let me look." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Rome"})
    ]
    _, calls = parse_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', names)
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    for text in ('{"name": "other", "arguments": {}}', "<tool_call>{not json</tool_call>", "just words {"):
        assert parse_calls(text, names) == (text, [])
    splitter = AutoSplitter()
    sent = "".join(splitter.feed(piece) for piece in ["Sure", ", <tool", "_call>", '{"name": "get_weather"}'])
    assert sent == "Sure, " and splitter.held().startswith("<tool_call>")
    opening = AutoSplitter()
    assert opening.feed("  ") == "" and opening.feed('{"name"') == "" and opening.held() == '  {"name"'


def test_earlier_calls_and_results_are_given_to_the_template() -> None:
    body = codec.decode(
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                ],
            }
        ).encode(),
        ChatCompletionBody,
    )  # fmt: skip
    converted = [{"role": m.role, "content": m.content or ""} for m in body.messages]
    native = prompt_messages(converted, body.messages, HERMES, True)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert native[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    written = prompt_messages(converted, body.messages, HERMES, False)
    assert written[1]["content"] == HERMES.render("get_weather", '{"city": "Rome"}')
    assert written[2] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    assert isinstance(ChatMessage(role="assistant").tool_calls, type(None))
    assert ToolCall(id="x", name="y", arguments="{}").arguments == "{}"


def test_engine_choices_in_process(tmp_path) -> None:
    """The engine alone: a forced call under its grammar, n choices and logprobs in one outcome."""
    from nodes.demo_model import write_tiny_gguf
    from nodes.runtimes.llama_cpp import LlamaEngine

    engine = LlamaEngine(str(write_tiny_gguf(tmp_path / "t.gguf", context_length=2048)), n_ctx=2048, n_threads=1)
    try:
        body = codec.decode(
            json.dumps(
                {"model": "m", "messages": HI, "tools": TOOLS, "tool_choice": "required", "n": 2, "max_tokens": 300,
                 "logprobs": True, "top_logprobs": 2, "seed": 3}
            ).encode(),
            ChatCompletionBody,
        )  # fmt: skip
        outcome = engine.chat(body, None, threading.Event())
        assert [c.index for c in outcome.choices] == [0, 1]
        for choice in outcome.choices:
            assert choice.finish_reason == "tool_calls" and choice.logprobs
            for call in choice.tool_calls:
                _valid_call(call.name, call.arguments)
        assert outcome.usage.completion_tokens == sum(len(c.logprobs) for c in outcome.choices)
    finally:
        engine.close()
