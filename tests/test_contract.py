"""The wire contract: readable JSON, tagged replies, bounded storage."""

import json

import msgspec
import pytest
from tiny_models import model_record

from events import codec, storage, subjects
from events.messages import (
    FINAL_REPLIES,
    Accepted,
    Failure,
    GpuInfo,
    HistoryRecord,
    InferenceRequest,
    LoadedModel,
    ModelEvent,
    ModelFile,
    ModelRecord,
    ModelSource,
    NodeHeartbeat,
    NodeReply,
    RuntimeStatus,
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
                node_id="n1",
                hostname="h",
                started_at=0,
                sent_at=0,
                interval_s=2,
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
    record = model_record("x", "/m/x.gguf")
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
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 9}', "n"),
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


# JSON as the single-module events/messages.py encoded it (before the split into one module per
# area with a shared reply base): writers of that contract must still be read the same way.
OLD_WIRE = {
    "delta": b'{"kind":"delta","request_id":"r1","node_id":"n1","text":"he","index":1}',
    "done": (
        b'{"kind":"done","request_id":"r1","node_id":"n1","finish_reason":"stop",'
        b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"text":"hey","index":0}'
    ),
    "error": (
        b'{"kind":"error","request_id":"r1","node_id":"n1","status":429,"message":"busy",'
        b'"type":"rate_limit_error","code":"node_busy","param":null}'
    ),
    "heartbeat": (
        b'{"node_id":"n1","hostname":"h1","started_at":100.0,"sent_at":101.5,"interval_s":2.0,'
        b'"runtimes":[{"name":"llama_cpp","available":true,"version":"0.3.16","error":null,'
        b'"capabilities":["chat"],"models":["m"]}],"models":[{"name":"m","runtime":"llama_cpp",'
        b'"capabilities":["chat","completion"],"state":"ready","artifact_path":"/c/m.gguf",'
        b'"artifact_bytes":10,"active_requests":0,"parallel":2,"error":null}],"gpus":[{"index":0,'
        b'"name":"H200","memory_total_bytes":100,"memory_used_bytes":5,"utilization_percent":null}],'
        b'"cpu_percent":12.5,"memory_total_bytes":1000,"memory_used_bytes":400,"active_requests":1,'
        b'"queue_depth":0,"max_parallel":2,"state":"online","requests":["r1"],"schema":1}'
    ),
    "model": (
        b'{"name":"m","format":"gguf","runtime":"llama_cpp","capabilities":["chat"],"source":{"kind":"hf",'
        b'"repo":"o/r","filename":"m.gguf","revision":"main","files":[{"path":"m.gguf","size":10,'
        b'"sha256":"ab"}]},"state":"ready","size_bytes":10,"required_memory_bytes":20,"sha256":null,'
        b'"quantization":"Q4_K_M","catalog_id":null,"description":"","tags":["t"],"labels":{"a":"b"},'
        b'"warnings":[],"error":null,"download":null,"predownload":false,"created_at":1.0,'
        b'"updated_at":2.0,"schema":1}'
    ),
    "history": (
        b'{"id":"r1","capability":"chat","endpoint":"/v1/chat/completions","model":"m","status_code":200,'
        b'"started_at":1.0,"duration_ms":12.5,"stream":true,"node_id":"n1","first_byte_ms":3.0,'
        b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3},"error":null,'
        b'"request":{"model":"m"},"response":{"text":"hey"},"schema":1}'
    ),
}


def test_json_written_before_the_messages_split_decodes_to_the_same_values() -> None:
    assert codec.decode_reply(OLD_WIRE["delta"]) == TextDelta(request_id="r1", node_id="n1", text="he", index=1)
    assert codec.decode_reply(OLD_WIRE["done"]) == TextDone(
        request_id="r1", node_id="n1", finish_reason="stop", usage=Usage(3, 2, 5), text="hey"
    )
    assert codec.decode_reply(OLD_WIRE["error"]) == Failure(
        request_id="r1", node_id="n1", status=429, message="busy", type="rate_limit_error", code="node_busy"
    )
    assert codec.decode(OLD_WIRE["heartbeat"], NodeHeartbeat) == NodeHeartbeat(
        node_id="n1",
        hostname="h1",
        started_at=100.0,
        sent_at=101.5,
        interval_s=2.0,
        runtimes=[
            RuntimeStatus(name="llama_cpp", available=True, version="0.3.16", capabilities=["chat"], models=["m"])
        ],
        models=[
            LoadedModel(
                name="m",
                runtime="llama_cpp",
                capabilities=["chat", "completion"],
                artifact_path="/c/m.gguf",
                artifact_bytes=10,
                parallel=2,
            )
        ],
        gpus=[GpuInfo(index=0, name="H200", memory_total_bytes=100, memory_used_bytes=5)],
        cpu_percent=12.5,
        memory_total_bytes=1000,
        memory_used_bytes=400,
        active_requests=1,
        max_parallel=2,
        requests=["r1"],
    )
    assert codec.decode(OLD_WIRE["model"], ModelRecord) == ModelRecord(
        name="m",
        format="gguf",
        runtime="llama_cpp",
        capabilities=["chat"],
        source=ModelSource(
            kind="hf",
            repo="o/r",
            filename="m.gguf",
            revision="main",
            files=[ModelFile(path="m.gguf", size=10, sha256="ab")],
        ),
        state="ready",
        size_bytes=10,
        required_memory_bytes=20,
        quantization="Q4_K_M",
        tags=["t"],
        labels={"a": "b"},
        created_at=1.0,
        updated_at=2.0,
    )
    history = codec.decode(OLD_WIRE["history"], HistoryRecord)
    assert history == HistoryRecord(
        id="r1",
        capability="chat",
        endpoint="/v1/chat/completions",
        model="m",
        status_code=200,
        started_at=1.0,
        duration_ms=12.5,
        stream=True,
        node_id="n1",
        first_byte_ms=3.0,
        usage=Usage(1, 2, 3),
        request=msgspec.Raw(b'{"model":"m"}'),
        response={"text": "hey"},
    )


# Fields added since the samples were written (optional, so old JSON still decodes): re-encoding
# adds them with their defaults, and nothing else may change. ``name[]``: in each item of a list.
ADDED_SINCE = {
    "history": {
        "key_id": None,
        "provider": None,
        "cost_usd": None,
        "first_token_ms": None,
        "queue_ms": None,
        "masking": "none",
    },
    "delta": {"logprobs": None, "tool_calls": None},  # logprobs and tool call fragments (issue 14)
    "done": {"choices": None},  # n choices, tool calls, logprobs
    "heartbeat": {
        "memory": [],
        "loadable": [],
        "keep_alive_s": None,
        "placed": None,  # models placed on the node, not loaded yet (redelivery of missed decisions)
        "runtimes[]": {"gpu": False, "backend": None, "device": None},  # gpu: issue 18; backend, device: 15
        "models[]": {
            "origin": "registry",
            "memory_bytes": {},
            "estimate_bytes": {},
            "loaded_at": None,
            "last_used_at": None,
            "load_s": None,
            "pinned": False,
        },
    },
    "model": {"replicas": None},
}


def _pop_added(encoded: dict, added: dict, where: str) -> None:
    for name, default in added.items():
        if name.endswith("[]"):
            for item in encoded[name[:-2]]:
                _pop_added(item, default, f"{where}.{name}")
        else:
            assert encoded.pop(name) == default, (where, name)


def test_old_json_re_encodes_byte_for_byte() -> None:
    """The split kept every field's name and order, so what we write now is what we wrote then."""
    for kind, data in OLD_WIRE.items():
        if kind in ("delta", "done", "error"):
            value = codec.decode_reply(data)
        else:
            value = codec.decode(
                data, {"heartbeat": NodeHeartbeat, "model": ModelRecord, "history": HistoryRecord}[kind]
            )
        encoded = json.loads(codec.encode(value))
        _pop_added(encoded, ADDED_SINCE.get(kind, {}), kind)
        assert json.dumps(encoded) == json.dumps(json.loads(data)), kind


def test_every_reply_names_its_request_and_node_through_one_base() -> None:
    for kind in FINAL_REPLIES + (Accepted, TextDelta):
        assert issubclass(kind, NodeReply), kind
        assert kind.__struct_fields__[:2] == ("request_id", "node_id"), kind
