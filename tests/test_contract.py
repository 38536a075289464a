"""The wire contract: readable JSON, tagged replies, bounded storage."""

import json

import msgspec
import pytest

from events import codec, storage, subjects
from events.messages import (
    Failure,
    InferenceRequest,
    ModelEvent,
    ModelRecord,
    ModelSource,
    NodeHeartbeat,
    TextDelta,
    TextDone,
    Usage,
)
from events.openai import ChatCompletionBody, ChatMessage, CompletionBody, EmbeddingBody, validation_param


def test_request_round_trips_as_plain_json() -> None:
    body = ChatCompletionBody(model="m", messages=[ChatMessage(role="user", content="hi")], max_tokens=5)
    request = InferenceRequest(request_id="r1", model="m", capability=subjects.CHAT, params=body, stream=True)
    data = codec.encode(request)
    parsed = json.loads(data)  # what `nats sub` would print is ordinary JSON
    assert parsed["params"]["messages"][0] == {"role": "user", "content": "hi"}
    assert parsed["schema"] == 1
    assert codec.decode(data, codec.REQUEST_TYPES[subjects.CHAT]) == request


@pytest.mark.parametrize(
    "reply",
    [
        TextDelta(request_id="r", node_id="n", text="he"),
        TextDone(request_id="r", node_id="n", finish_reason="stop", usage=Usage(1, 2, 3), text="hey"),
        Failure(request_id="r", node_id="n", status=400, message="bad", param="messages"),
    ],
)
def test_replies_are_a_tagged_union(reply) -> None:
    data = codec.encode(reply)
    assert json.loads(data)["kind"] in ("delta", "done", "error")
    assert codec.decode_reply(data) == reply


def test_unknown_fields_from_newer_writers_are_ignored() -> None:
    data = b'{"kind":"delta","request_id":"r","node_id":"n","text":"x","future_field":1}'
    assert codec.decode_reply(data).text == "x"


def test_heartbeat_serves_only_ready_non_empty_models() -> None:
    beat = codec.decode(
        codec.encode(
            NodeHeartbeat(
                node_id="n1", hostname="h", started_at=0, sent_at=0, interval_s=2,
                models=[
                    {"name": "a", "runtime": "llama_cpp", "capabilities": ["chat"], "artifact_bytes": 10},
                    {"name": "b", "runtime": "llama_cpp", "capabilities": ["chat"], "artifact_bytes": 0},
                ],
            )
        ),
        NodeHeartbeat,
    )
    assert beat.serves("a", "chat")
    assert not beat.serves("a", "embedding")
    assert not beat.serves("b", "chat")


def test_model_event_carries_the_record() -> None:
    record = ModelRecord(name="x", format="gguf", runtime="llama_cpp", capabilities=["chat"],
                         source=ModelSource(kind="path", path="/m/x.gguf"))
    event = json.loads(codec.encode(ModelEvent(event="added", name="x", record=record)))
    assert event["record"]["source"] == {"kind": "path", "path": "/m/x.gguf"}
    assert event["record"]["state"] == "registered"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "messages"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9}', "temperature"),
        (b'{"model": 3, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}', "n"),
    ],
)
def test_validation_errors_name_the_param(body: bytes, param: str) -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        codec.decode(body, ChatCompletionBody)
    assert validation_param(err.value) == param


def test_completion_and_embedding_defaults() -> None:
    assert codec.decode(b'{"model":"m","prompt":"p"}', CompletionBody).token_limit == 16
    assert codec.decode(b'{"model":"m","input":"a"}', EmbeddingBody).inputs == ["a"]
    assert codec.decode(b'{"model":"m","input":["a","b"]}', EmbeddingBody).inputs == ["a", "b"]


def test_every_stream_is_bounded_and_history_keeps_seven_days() -> None:
    for stream in storage.STREAMS:
        assert stream.max_age and stream.max_age > 0, stream.name
        assert stream.max_bytes and stream.max_bytes > 0, stream.name
    history = next(s for s in storage.STREAMS if s.name == storage.HISTORY)
    assert history.max_age == 7 * 24 * 3600
    assert history.subjects == [subjects.HISTORY_ALL]


def test_node_ttl_leaves_room_for_missed_heartbeats() -> None:
    assert storage.NODE_TTL_S >= 3 * storage.HEARTBEAT_INTERVAL_S
    assert storage.NODE_TTL_S < 15


def test_missing_field_names_the_param() -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        codec.decode(b'{"input": "x"}', EmbeddingBody)
    assert validation_param(err.value) == "model"
    with pytest.raises(msgspec.ValidationError) as err:
        codec.decode(b'{"model": "m", "messages": [{"content": "x"}]}', ChatCompletionBody)
    assert validation_param(err.value) == "messages"
