"""Property-based fuzzing of the gateway's HTTP API, from the OpenAPI document it serves.

schemathesis generates valid and invalid requests for every operation of ``/openapi.json``
and sends them over HTTP to a real stack (registry, gateway, node running a tiny GGUF on
llama.cpp, the registry's Hugging Face being the local fake Hub). What must hold: no 5xx but
503, every error body is OpenAI's, and afterwards the stack is healthy and still chats.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import openai
import pytest
import schemathesis
from conftest import Stack, requires_llama, wait_until
from fake_hf import FakeHub
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from gateway.app import Gateway
from gateway.openapi import document

pytestmark = requires_llama

MODEL = "fuzz-tiny"
# A short context bounds every generation (near a full 512-token context the tiny model writes
# ~40 tokens/s), and fuzzed prompts overflow it: both real paths. 256: llama.cpp pads a context
# to a multiple of 256, so this one is exactly what the node asks for, as with real models.
CONTEXT_TOKENS = 256
MAX_EXAMPLES = 50  # per operation, valid and invalid requests together
SKIP = {
    # Steered to the registered model (see steered), these would delete what the rest of the run needs.
    ("DELETE", "/v1/models/{model}"),
    ("DELETE", "/v0/models/{model}"),
}
ERROR_FIELDS = {"message", "type", "param", "code"}
# schemathesis' own checks that the answers are what the document says, and invalid input is refused.
DOCUMENT_CHECKS = [content_type_conformance, response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def hub():
    """An empty fake Hub: Hugging Face lookups the fuzzer causes get real answers, offline."""
    hub = FakeHub()
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def stack(nats_url, hub, tmp_path_factory):
    from nodes.demo_model import write_tiny_gguf

    tmp = tmp_path_factory.mktemp("fuzz")
    gguf = write_tiny_gguf(tmp / "fuzz.gguf", context_length=CONTEXT_TOKENS)
    stack = Stack(nats_url, tmp, env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
    reply = stack.register(gguf, MODEL)
    assert reply["ok"], reply
    wait_until(lambda: MODEL in stack.models(), message=f"{MODEL} in /v1/models")
    yield stack
    stack.close()


# ---------------------------------------------------------------- the document


def _operations(paths: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in paths.items() for method in ops}


async def test_document_covers_every_route(nats_url) -> None:
    """Every route of build_app is in the document and nothing else is (Starlette answers HEAD for every GET)."""
    gateway = Gateway(nats_url=nats_url, port=0, auth=False)
    await gateway.start()
    try:
        routes = {
            (method, route.path.replace(":path}", "}"))
            for route in gateway.starlette.routes
            for method in route.methods
        }
    finally:
        await gateway.stop()
    documented = _operations(document()["paths"])
    documented |= {("HEAD", path) for method, path in documented if method == "GET"}
    assert documented == routes


def test_document_is_served(stack) -> None:
    response = httpx.get(stack.url + "/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == json.loads(json.dumps(document(auth=False)))  # the stack runs --no-auth
    assert response.json()["openapi"] == "3.1.0"


# ---------------------------------------------------------------- fuzzing


def steered(case, to_model: bool):
    """Three in four valid cases name the registered model (path parameter or body field) wherever they
    name one: a random string never does, and then nothing would reach the node. (Invalid cases
    are left as they are: their invalid part may be the model.)"""
    if to_model:
        if "model" in (case.path_parameters or {}):
            case.path_parameters["model"] = MODEL
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL
    return case


def error_problem(body: object) -> str | None:
    """What is wrong with an error body, when it is not ``{"error": {message, type, param, code}}``."""
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"not an OpenAI error body: {body!r}"[:500]
    error = body["error"]
    if set(error) != ERROR_FIELDS:
        return f"error fields {sorted(error)} are not {sorted(ERROR_FIELDS)}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return f"error message and type must be non-empty strings: {error!r}"
    if not all(error[key] is None or isinstance(error[key], str) for key in ("param", "code")):
        return f"error param and code must be strings or null: {error!r}"
    return None


def problem_with(method: str, response: schemathesis.Response) -> str | None:
    """Why a response breaks the rules; None when it keeps them."""
    status = response.status_code
    if status >= 500 and status != 503:
        return f"status {status}: {response.text[:500]}"
    content_type = response.headers.get("content-type", [""])[0]  # lower-case keys, list values
    if status >= 400:
        if method == "HEAD":
            return None if content_type.startswith("application/json") else f"HEAD error of type {content_type!r}"
        try:
            body = response.json()
        except ValueError:
            return f"status {status} with a body that is not JSON: {response.text[:300]!r}"
        return error_problem(body)
    if content_type.startswith("text/event-stream"):  # a failure mid-stream is an error event
        for line in response.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    problem = error_problem(event)
                    if problem:
                        return "stream " + problem
    return None


def fuzz_operation(operation, base_url: str) -> Counter:
    """Valid and invalid requests for one operation, derandomized: the same ones every run.

    Returns how many answers of each status it got (the run's log shows what reached a node)."""
    statuses: Counter = Counter()
    valid = st.tuples(operation.as_strategy(GenerationMode.POSITIVE), st.integers(0, 3).map(bool)).map(
        lambda pair: steered(*pair)
    )
    cases = st.one_of(valid, operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @given(case=cases)
    def run(case) -> None:
        response = case.call(base_url=base_url, timeout=60)
        statuses[response.status_code] += 1
        problem = problem_with(case.method, response)
        assert problem is None, f"{problem}\n{case.as_curl_command()}"
        case.validate_response(response, checks=DOCUMENT_CHECKS)

    run()
    return statuses


@pytest.mark.timeout(600)
def test_fuzz_api(stack) -> None:
    schema = schemathesis.openapi.from_dict(httpx.get(stack.url + "/openapi.json").json())
    registered_before = {m["id"] for m in httpx.get(stack.url + "/v0/models").json()["data"]}
    failures, seen = [], {}
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            if (operation.method.upper(), operation.path) in SKIP:
                continue
            started = time.monotonic()
            try:
                statuses = fuzz_operation(operation, stack.url)
                seen[operation.label] = f"{time.monotonic() - started:.1f}s {dict(sorted(statuses.items()))}"
            except (Exception, BaseExceptionGroup) as exc:  # recorded; the other operations go on, the test fails below
                failures.append(f"{operation.label}: {exc}")
    finally:
        # Registrations the fuzzer managed (a 201 is a fine answer) must not leak into other tests.
        for name in {m["id"] for m in httpx.get(stack.url + "/v0/models").json()["data"]} - registered_before:
            stack.admin("delete", {"name": name})
    print("\n".join(f"{label}: {summary}" for label, summary in seen.items()))
    assert not failures, "\n\n".join(failures)

    for proc in (stack.registry, stack.gateway, stack.node):
        assert proc.popen.poll() is None, f"{proc.args[0]} exited:\n{proc.output()[-3000:]}"
    health = httpx.get(stack.url + "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert MODEL in stack.models()
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length") and isinstance(out.choices[0].message.content, str)


# ---------------------------------------------------------------- what the fuzzer found


def test_max_tokens_holds_through_incomplete_utf8(stack) -> None:
    """llama-cpp-python checks max_tokens only after a complete UTF-8 character: a run of lead
    bytes went past the limit to a full context, and llama_decode failed (a 500)."""
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    lead_byte = {str(5 + 0xE2): 100}  # the token of byte 0xE2 (after 5 special tokens): a 3-byte UTF-8 lead
    hi = [{"role": "user", "content": "hi"}]
    for out in (
        client.chat.completions.create(model=MODEL, messages=hi, max_tokens=4, logit_bias=lead_byte),
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, logit_bias=lead_byte),
    ):
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 4
    # No max_tokens: the end of the context is the limit.
    out = client.chat.completions.create(model=MODEL, messages=hi, logit_bias=lead_byte)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == CONTEXT_TOKENS


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v0/models/hf?page=100000000000000000000", None, "page"),  # was a 503 "Hugging Face failed" (islice overflow)
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, "prompt"),  # the engine runs one prompt
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"hello": 1}},
            "logit_bias",
        ),  # keys are token ids
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"4": 1000}},
            "logit_bias",
        ),  # OpenAI's -100..100
        ("/v1/embeddings", {"model": MODEL, "input": [""]}, "input"),
    ],
)
def test_documented_bounds_are_refused_at_the_gateway(stack, path, body, param) -> None:
    """Input the document rules out gets a 400 naming the field, before any node or Hugging Face sees it."""
    response = httpx.post(stack.url + path, json=body) if body is not None else httpx.get(stack.url + path)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
