"""The OpenAI Responses API with the official SDK against llama.cpp on tiny random-weight GGUFs
through a real stack (registry, gateway, node processes): plain and streamed responses (every
event checked against the SDK's own types), function tools and their outputs fed back,
``text.format`` json_schema, stored responses (``GET``, ``DELETE``, ``previous_response_id``,
``store: false``), image input items on a vision model, and refusals of what is not supported.

Random weights write junk, so outputs that must parse are grammar-constrained, and streamed and
unstreamed answers are compared at temperature 0 (greedy: the same tokens on one node).
"""

from __future__ import annotations

import base64
import json
from contextlib import asynccontextmanager
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from conftest import Stack, requires_llama
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, Field
from tool_models import PING, SCHEMAS, WEATHER, refused, sdk_client, serve_chat_models

from events import subjects

pytestmark = [pytest.mark.e2e, requires_llama]

PLAIN = "resp-chatml"
NATIVE = "resp-tools"
VISION = "resp-vision"

TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    {"type": "function", "name": "ping", "parameters": PING, "strict": True},
]
PING_FORMAT = {"format": {"type": "json_schema", "name": "answer", "schema": PING, "strict": True}}
EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def stack(nats_url, tmp_path_factory):
    from tiny_models import build_tiny_mmproj

    from nodes.demo_model import write_tiny_gguf

    tmp = tmp_path_factory.mktemp("responses")
    stack = Stack(nats_url, tmp)
    serve_chat_models(stack, tmp, PLAIN, NATIVE)
    vision = tmp / "vision"
    write_tiny_gguf(vision / "tiny-vision.gguf")  # with a projector beside it (llama.cpp's layout)
    build_tiny_mmproj(vision / "mmproj-tiny.gguf")
    stack.serve(vision / "tiny-vision.gguf", VISION)
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return sdk_client(stack)


def _strict(payload: dict) -> Response:
    """The response validated against the SDK's model (the SDK itself parses leniently)."""
    return Response.model_validate(payload)


def _raw_events(stack, body: dict) -> list[dict]:
    """A streamed response's events as sent, each validated against the SDK's event types."""
    events = []
    with httpx.stream("POST", stack.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in answer.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                assert event["type"] == kind
                EVENTS.validate_python(event)
                events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def _valid_call(item) -> dict:
    assert item.type == "function_call" and item.call_id.startswith("call_") and item.id.startswith("fc_")
    args = json.loads(item.arguments)
    jsonschema.validate(args, SCHEMAS[item.name])
    return args


# ---------------------------------------------------------------- plain and streamed


def test_create_answers_a_response_object(client, stack) -> None:
    out = client.responses.create(model=PLAIN, input="hi", max_output_tokens=6)
    assert out.id.startswith("resp_") and out.object == "response" and out.model == PLAIN
    assert out.status in ("completed", "incomplete")
    if out.status == "incomplete":
        assert out.incomplete_details.reason == "max_output_tokens" and out.usage.output_tokens == 6
    [message] = out.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and out.output_text == message.content[0].text
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    raw = httpx.post(stack.url + "/v1/responses", json={"model": PLAIN, "input": "hi", "max_output_tokens": 2}).json()
    _strict(raw)
    assert raw["store"] is True and raw["tools"] == [] and raw["text"] == {"format": {"type": "text"}}
    # instructions are a system message before the input
    told = client.responses.create(model=PLAIN, input="hi", instructions="Answer in French.", max_output_tokens=2)
    assert told.usage.input_tokens > out.usage.input_tokens + 5 and told.instructions == "Answer in French."


def test_stream_events_parse_and_the_final_response_is_the_streamed_one(client, stack) -> None:
    body = {"model": PLAIN, "input": "hi", "max_output_tokens": 60, "temperature": 0, "text": PING_FORMAT}
    events = _raw_events(stack, body)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert set(kinds[5:-4]) <= {"response.output_text.delta"}
    final = events[-1]["response"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert final["output"][0]["content"][0]["text"] == text
    assert next(e for e in events if e["type"] == "response.output_text.done")["text"] == text
    jsonschema.validate(json.loads(text), PING)

    # The SDK's stream helper rebuilds the same response; the unstreamed one has the same text.
    with client.responses.stream(
        model=PLAIN, input="hi", max_output_tokens=60, temperature=0, text=PING_FORMAT
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        streamed = stream.get_final_response()
    assert streamed.output_text == "".join(deltas) == text and streamed.status == "completed"
    whole = client.responses.create(**body)
    assert whole.output_text == text and whole.usage.output_tokens == streamed.usage.output_tokens
    # What was stored is what the stream ended with.
    assert httpx.get(f"{stack.url}/v1/responses/{final['id']}").json() == final
    assert client.responses.retrieve(streamed.id).output_text == text
    # create(stream=True) iterates the same typed events (as many deltas as the node's batching made)
    seen = [e.type for e in client.responses.create(stream=True, **body)]
    assert _runs(seen) == _runs(kinds)


def _runs(kinds: list[str]) -> list[str]:
    return [kind for i, kind in enumerate(kinds) if i == 0 or kinds[i - 1] != kind]


def test_a_length_cut_stream_ends_incomplete(stack) -> None:
    events = _raw_events(stack, {"model": PLAIN, "input": "hi", "max_output_tokens": 3, "text": PING_FORMAT})
    last = events[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["usage"]["output_tokens"] == 3
    assert last["response"]["output"][0]["status"] == "incomplete"


# ---------------------------------------------------------------- tools


@pytest.mark.parametrize("model", [PLAIN, NATIVE])
def test_required_and_named_function_calls_validate(client, model) -> None:
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        out = client.responses.create(model=model, input="hi", tools=TOOLS, tool_choice=choice, max_output_tokens=300)
        assert out.status == "completed" and out.output
        assert all(item.type == "function_call" for item in out.output)
        for item in out.output:
            _valid_call(item)
        if isinstance(choice, dict):
            assert [item.name for item in out.output] == ["get_weather"]


def test_streamed_call_arguments_reassemble_to_the_same_call(client, stack) -> None:
    body = {
        "model": NATIVE, "input": "hi", "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 300, "temperature": 0,
    }  # fmt: skip
    whole = client.responses.create(**body).output[0]
    for _ in range(3):  # a loaded machine can batch every token into one piece; not three times running
        events = _raw_events(stack, body)
        pieces = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
        if len(pieces) > 1:
            break
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["item"]["type"] for e in added] == ["function_call"] and added[0]["item"]["name"] == "get_weather"
    assert len(pieces) > 1  # the arguments arrive as they are generated
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert "".join(pieces) == done["arguments"] == whole.arguments
    with client.responses.stream(**body) as stream:
        final = stream.get_final_response()
    assert final.output[0].arguments == whole.arguments and final.output[0].call_id.startswith("call_")
    _valid_call(final.output[0])


@pytest.mark.parametrize("model", [PLAIN, NATIVE])
def test_a_function_call_output_round_trips_through_previous_response_id(client, model) -> None:
    first = client.responses.create(
        model=model, input="hi", tools=TOOLS, tool_choice={"type": "function", "name": "ping"}, max_output_tokens=100
    )
    call = first.output[0]
    _valid_call(call)
    result = "the weather service says: sunny, 21 degrees, light wind from the west"
    again = client.responses.create(
        model=model,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}],
        tools=TOOLS,
        max_output_tokens=4,
    )
    assert again.status in ("completed", "incomplete") and again.previous_response_id == first.id
    # The earlier input, the call and its result are in the prompt (about a token per character).
    grown = again.usage.input_tokens - first.usage.input_tokens
    assert grown > len(result) // 2 + len(call.arguments) // 2
    # The same conversation sent whole, without a stored response, is the same prompt.
    sent = client.responses.create(
        model=model,
        input=[
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": result},
        ],
        tools=TOOLS,
        max_output_tokens=4,
        store=False,
    )
    assert sent.usage.input_tokens == again.usage.input_tokens


def test_auto_tools_answer_text_or_calls(client) -> None:
    out = client.responses.create(model=PLAIN, input="hi", tools=TOOLS, max_output_tokens=8)
    assert out.output and all(item.type in ("message", "function_call") for item in out.output)


# ---------------------------------------------------------------- structured output


class Forecast(BaseModel):
    city: str = Field(max_length=6)
    unit: Literal["c", "f"]
    days: int


def test_json_schema_text_format_validates(client) -> None:
    schema_format = {"format": {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}}
    out = client.responses.create(model=NATIVE, input="hi", max_output_tokens=150, text=schema_format)
    assert out.status == "completed"
    jsonschema.validate(json.loads(out.output_text), WEATHER)
    assert out.text.format.type == "json_schema"
    parsed = client.responses.parse(model=PLAIN, input="hi", max_output_tokens=150, text_format=Forecast)
    assert isinstance(parsed.output_parsed, Forecast) and parsed.output_parsed.unit in ("c", "f")
    obj = client.responses.create(
        model=PLAIN, input="hi", max_output_tokens=300, text={"format": {"type": "json_object"}}
    )
    assert obj.output_text.lstrip().startswith("{")


def test_logprobs_when_included(client) -> None:
    out = client.responses.create(
        model=PLAIN, input="hi", max_output_tokens=5, include=["message.output_text.logprobs"], top_logprobs=3
    )
    logprobs = out.output[0].content[0].logprobs
    assert len(logprobs) == out.usage.output_tokens
    assert all(entry.logprob <= 0 and len(entry.top_logprobs) == 3 for entry in logprobs)


# ---------------------------------------------------------------- stored responses


def test_previous_response_id_continues_a_stored_conversation(client) -> None:
    first = client.responses.create(model=PLAIN, input="my name is Ada", max_output_tokens=5)
    second = client.responses.create(
        model=PLAIN, previous_response_id=first.id, input="and yours?", max_output_tokens=3
    )
    assert second.previous_response_id == first.id
    # the whole first turn (its input and its answer) is in the second prompt
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    third = client.responses.create(model=PLAIN, previous_response_id=second.id, input="ok", max_output_tokens=2)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens


def test_get_and_delete_a_stored_response(client, stack) -> None:
    out = client.responses.create(model=PLAIN, input="hi", max_output_tokens=3, metadata={"run": "a"})
    got = client.responses.retrieve(out.id)
    assert got.model_dump() == out.model_dump() and got.metadata == {"run": "a"}
    deleted = httpx.delete(f"{stack.url}/v1/responses/{out.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": out.id, "object": "response", "deleted": True}
    for call in (lambda: client.responses.retrieve(out.id), lambda: client.responses.delete(out.id)):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("not-an-id")


def test_store_false_keeps_nothing(client) -> None:
    out = client.responses.create(model=PLAIN, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(out.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=PLAIN, previous_response_id=out.id, input="again", max_output_tokens=2)
    assert err.value.body["param"] == "previous_response_id"
    assert err.value.body["code"] == "previous_response_not_found"
    streamed = list(client.responses.create(model=PLAIN, input="hi", max_output_tokens=2, store=False, stream=True))
    final = streamed[-1].response
    assert final.model_extra["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(final.id)


def test_a_conversation_too_large_to_store_is_400_naming_store(stack) -> None:
    from events.storage import RESPONSE_MAX_BYTES

    big = {"model": PLAIN, "input": "x" * (RESPONSE_MAX_BYTES + 1)}
    answer = httpx.post(stack.url + "/v1/responses", json=big)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "store", answer.text
    assert "store': false" in answer.json()["error"]["message"]


# ---------------------------------------------------------------- images


def _image_input() -> list[dict]:
    from tiny_models import make_png

    url = "data:image/png;base64," + base64.b64encode(make_png(40, 40)).decode()
    return [
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "what is this?"}, {"type": "input_image", "image_url": url}],
        }
    ]


def test_image_input_items(client) -> None:
    out = client.responses.create(model=VISION, input=_image_input(), max_output_tokens=4)
    assert out.output[0].type == "message"
    assert out.usage.input_tokens > 16  # the projector's 16 image tokens, and the text
    message = refused(
        lambda: client.responses.create(model=PLAIN, input=_image_input()), "input", "unsupported_capability"
    )
    assert "does not accept images" in message
    refused(lambda: client.responses.create(model=VISION, input=_image_input(), tools=TOOLS), "tools")
    refused(lambda: client.responses.create(model=VISION, input=_image_input(), text=PING_FORMAT), "text")
    logprobs = ["message.output_text.logprobs"]
    refused(lambda: client.responses.create(model=VISION, input=_image_input(), include=logprobs), "include")
    streamed = list(client.responses.create(model=VISION, input=_image_input(), max_output_tokens=3, stream=True))
    assert streamed[-1].type in ("response.completed", "response.incomplete")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools"),
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"max_tool_calls": 2}, "max_tool_calls"),
        ({"tool_choice": {"type": "web_search_preview"}, "tools": TOOLS}, "tool_choice"),
        ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]}, "input"),
    ],
)
def test_unsupported_fields_are_400_naming_them(stack, extra, param) -> None:
    body = {"model": PLAIN, "input": "hi", **extra}
    answer = httpx.post(stack.url + "/v1/responses", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["code"] == "unsupported_parameter", error


def test_bad_or_unenforceable_requests_are_400(client, stack) -> None:
    bounded = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}
    message = refused(
        lambda: client.responses.create(
            model=PLAIN, input="hi", text={"format": {"type": "json_schema", "name": "p", "schema": bounded}}
        ),
        "text",
        "unsupported_schema",
    )
    assert "'minimum'" in message
    refused(
        lambda: client.responses.create(model=PLAIN, input="hi", tool_choice="required"), "tool_choice", "invalid_value"
    )
    named = {"type": "function", "name": "nope"}
    refused(
        lambda: client.responses.create(model=PLAIN, input="hi", tools=TOOLS, tool_choice=named),
        "tool_choice",
        "invalid_value",
    )
    for body, param in (
        ({"model": PLAIN}, "input"),
        ({"model": PLAIN, "input": [{"role": "user"}]}, "input"),
        ({"model": PLAIN, "input": [{"type": "function_call", "name": "f"}]}, "input"),
        ({"model": PLAIN, "input": "hi", "tools": [{"type": "function"}]}, "tools"),
        ({"model": PLAIN, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": PLAIN, "input": "hi", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"model": "resp-nowhere", "input": "hi"}, "model"),
    ):
        answer = httpx.post(stack.url + "/v1/responses", json=body)
        assert answer.status_code in (400, 404), (body, answer.text)
        assert answer.json()["error"]["param"] == param, (body, answer.text)


def test_harmless_metadata_is_accepted(stack) -> None:
    body = {
        "model": PLAIN, "input": "hi", "max_output_tokens": 2, "user": "u1", "metadata": {"a": "b"},
        "service_tier": "auto", "safety_identifier": "s", "prompt_cache_key": "k", "reasoning": {"effort": None},
        "include": ["reasoning.encrypted_content"], "truncation": "disabled", "background": False,
        "stream_options": {"include_obfuscation": False}, "text": {"verbosity": "medium"},
    }  # fmt: skip
    answer = httpx.post(stack.url + "/v1/responses", json=body)
    assert answer.status_code == 200, answer.text
    _strict(answer.json())


# ---------------------------------------------------------------- keys: one's own responses


@asynccontextmanager
async def _gateway(nats_url: str, **options):
    from gateway import Gateway

    gateway = Gateway(nats_url=nats_url, **options)
    await gateway.start(serve_http=False)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw")
    try:
        yield gateway, client
    finally:
        await client.aclose()
        await gateway.stop()


async def test_a_stored_response_is_its_owners(nats_url) -> None:
    """With keys on: an inference key reads and deletes its own stored responses, another
    inference key gets a 404 for them (as for ids that never existed), an admin key reaches all."""
    import msgspec

    from events.responses import InputItem, StoredResponse
    from gateway.audit import action_of
    from gateway.auth import new_key, required_scope
    from gateway.responses_output import new_id

    assert required_scope("DELETE", "/v1/responses/resp_1") == "inference"
    assert required_scope("DELETE", "/v1/models/m") == "admin"
    assert action_of("DELETE", "/v1/responses/resp_1") is None  # not an admin action
    from broker.permissions import node_rules, observer_rules

    assert "$KV.responses.>" in node_rules("n1").pub_deny  # people's conversations: never a node's
    assert "$KV.responses.>" in observer_rules().sub_deny

    async with _gateway(nats_url) as (gateway, client):
        keys = {}
        for name, scopes in (("mine", ["inference"]), ("theirs", ["inference"]), ("admin", ["admin"])):
            secret, key = new_key(name, scopes, [], None)
            await gateway.keys.add(key)
            keys[name] = (secret, key)
        rid = new_id("resp")
        payload = {"id": rid, "object": "response", "output": []}
        record = StoredResponse(
            owner=keys["mine"][1].id,
            input=[InputItem(role="user", content="hi")],
            response=msgspec.Raw(json.dumps(payload).encode()),
        )
        assert await gateway.response_store.put(rid, record)

        def bearer(name: str) -> dict:
            return {"authorization": f"Bearer {keys[name][0]}"}

        assert (await client.get(f"/v1/responses/{rid}", headers=bearer("theirs"))).status_code == 404
        assert (await client.delete(f"/v1/responses/{rid}", headers=bearer("theirs"))).status_code == 404
        answer = await client.get(f"/v1/responses/{rid}", headers=bearer("mine"))
        assert answer.status_code == 200 and answer.json() == payload
        assert (await client.get(f"/v1/responses/{rid}", headers=bearer("admin"))).status_code == 200
        assert (await client.delete(f"/v1/responses/{rid}", headers=bearer("mine"))).status_code == 200
        assert (await client.get(f"/v1/responses/{rid}", headers=bearer("mine"))).status_code == 404
        assert (await client.get(f"/v1/responses/{rid}")).status_code == 401


def test_auto_tools_streamed_is_the_unstreamed_answer(client) -> None:
    body = dict(model=NATIVE, input="hi", tools=TOOLS, max_output_tokens=40, temperature=0)
    whole = client.responses.create(**body)
    with client.responses.stream(**body) as stream:
        events = list(stream)
    final = events[-1].response
    assert events[-1].type == f"response.{whole.status}"
    assert [(i.type, getattr(i, "arguments", None)) for i in final.output] == [
        (i.type, getattr(i, "arguments", None)) for i in whole.output
    ]
    assert final.output_text == whole.output_text


def test_history_records_a_response_once(client, stack) -> None:
    import asyncio

    import nats
    from conftest import wait_until

    out = client.responses.create(model=PLAIN, input="hi", max_output_tokens=2)

    async def record() -> dict:
        nc = await nats.connect(stack.nats_url)
        try:
            return json.loads(
                (await nc.jetstream().get_last_msg("HISTORY", subjects.history_filter("chat", PLAIN))).data
            )
        finally:
            await nc.close()

    found = wait_until(lambda: (r := asyncio.run(record()))["response"]["id"] == out.id and r, timeout=10)
    assert found["endpoint"] == "/v1/responses" and found["status_code"] == 200
    assert found["request"]["input"] == "hi" and found["usage"]["completion_tokens"] == out.usage.output_tokens


# ---------------------------------------------------------------- the event writer, in process


def test_event_writer_covers_every_item_kind_and_a_failure() -> None:
    """Text, then a call in fragments, then text again, logprobs, an empty answer and a
    failure mid-way: every event is one of the SDK's types, numbered, and the final response
    holds the items as streamed."""
    from events.messages import TextDelta, TokenLogprob, ToolCallDelta, TopLogprob, Usage
    from events.responses import ResponsesBody
    from gateway.errors import ApiError
    from gateway.responses_output import Envelope, EventWriter, new_id

    def events_of(chunks: bytes) -> list[dict]:
        found = [json.loads(line[6:]) for line in chunks.decode().splitlines() if line.startswith("data: ")]
        for event in found:
            EVENTS.validate_python(event)
        return found

    body = ResponsesBody(model="m", input="hi", include=["message.output_text.logprobs"], top_logprobs=1)
    writer = EventWriter(Envelope(new_id("resp"), body))
    top = [TopLogprob(token="a", logprob=-0.1, utf8=b"a")]
    lp = [TokenLogprob(token="a", logprob=-0.1, utf8=b"a", top=top)]
    out = writer.opening()
    out += writer.delta(TextDelta(text="Let me look. ", logprobs=lp))
    out += writer.delta(TextDelta(text="", tool_calls=[ToolCallDelta(index=0, id="call_1", name="ping")]))
    out += writer.delta(TextDelta(text="", tool_calls=[ToolCallDelta(index=0, arguments='{"ok": ')]))
    out += writer.delta(TextDelta(text="", tool_calls=[ToolCallDelta(index=0, arguments="true}")]))
    out += writer.delta(TextDelta(text="Done."))
    closing, final = writer.closing("stop", Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8))
    events = events_of(out + closing + writer.final(final))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "message"]
    assert final["output"][1]["arguments"] == '{"ok": true}' and final["output"][1]["call_id"] == "call_1"
    assert final["output"][0]["content"][0]["logprobs"][0]["token"] == "a"
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2]
    _strict(final)

    empty = EventWriter(Envelope(new_id("resp"), ResponsesBody(model="m", input="hi")))
    closing, final = empty.closing("length", Usage())
    events_of(empty.opening() + closing + empty.final(final))
    assert final["status"] == "incomplete" and final["output"][0]["status"] == "incomplete"

    failing = EventWriter(Envelope(new_id("resp"), ResponsesBody(model="m", input="hi")))
    out = failing.opening() + failing.delta(TextDelta(text="par"))
    failed, response = failing.failed(ApiError(503, "The node serving this request went away."))
    [*_, last] = events_of(out + failed)
    assert last["type"] == "response.failed" and response["error"]["code"] == "server_error"
    assert response["output"][0]["content"][0]["text"] == "par" and response["store"] is False


async def test_a_cloud_providers_model_is_501(nats_url) -> None:
    """Responses are made from the router's own engines: a cloud model gets 501 (the spec's answer
    for a backend without the Responses API), before anything is sent anywhere."""
    from gateway.providers import Clouds, ProviderSettings

    clouds = Clouds([ProviderSettings("openai", "sk-test", "http://127.0.0.1:9/v1")])  # never reached
    async with _gateway(nats_url, auth=False, clouds=clouds) as (_, client):
        answer = await client.post("/v1/responses", json={"model": "openai:gpt-4o-mini", "input": "hi"})
    assert answer.status_code == 501, answer.text
    assert answer.json()["error"]["param"] == "model" and answer.json()["error"]["code"] == "responses_not_supported"
