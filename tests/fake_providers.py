"""Fakes of three cloud providers, each speaking its real HTTP protocol, for tests and benches.

- OpenAI: ``/v1/models``, ``/v1/chat/completions`` (SSE streaming with ``stream_options``,
  tool calls, ``response_format``), ``/v1/completions``, ``/v1/embeddings``; Bearer keys; errors
  in OpenAI's body shape (401 ``invalid_api_key``, 404 ``model_not_found``, 429 for the model
  ``rate-limited``).
- Anthropic: ``/v1/models`` (paged), ``/v1/messages`` with ``x-api-key`` and
  ``anthropic-version``, the Messages API's validation (``max_tokens`` required, no ``system``
  role in messages), ``tool_use`` blocks, and its SSE event types (``message_start``,
  ``content_block_start``, ``ping``, ``content_block_delta`` with ``text_delta`` or
  ``input_json_delta``, ``content_block_stop``, ``message_delta``, ``message_stop``, and an
  ``error`` event for the model ``claude-overloaded``).
- Google: the OpenAI-compatible endpoint under ``/v1beta/openai`` (models listed as
  ``models/…``), errors wrapped in a list as Google sends them.

Answers are deterministic: the text echoes the last user message; a request with tools calls
the first (or the forced) tool with arguments made from its JSON schema, and once a tool result
is in the conversation the answer quotes it. Token counts are word counts. Every request is
kept in ``FakeProvider.requests`` for assertions. ``python tests/fake_providers.py openai
--port 0`` serves one fake on its own (the benches run it so).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import struct
import time
import uuid
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

OPENAI_MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "rate-limited"]
ANTHROPIC_MODELS = ["claude-3-5-haiku-20241022", "claude-sonnet-4-20250514", "claude-overloaded"]
GOOGLE_MODELS = ["gemini-2.0-flash", "text-embedding-004"]
KEYS = {"openai": "sk-fake-openai-0123456789", "anthropic": "sk-ant-fake-0123456789", "google": "AIza-fake-0123456789"}
DIMENSIONS = 8


# ---------------------------------------------------------------- the shared "model"


def words(text: str) -> int:
    return len(text.split())


def sample(schema: Any) -> Any:
    """A value that fits a JSON schema (enough of JSON Schema for tool parameters)."""
    if not isinstance(schema, dict):
        return "x"
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {name: sample(sub) for name, sub in props.items()}
    if kind == "array":
        return [sample(schema.get("items") or {})]
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    return "Paris"


def decide(turns: list[tuple[str, str]], tools: list[tuple[str, dict]], forced: str | None) -> tuple[str, Any]:
    """("text", str) or ("tool", (name, arguments)) for a conversation of (role, text) turns."""
    last_user = next((text for role, text in reversed(turns) if role == "user"), "")
    last_role = turns[-1][0] if turns else "user"
    if tools and last_role != "tool":
        name, schema = next(((n, s) for n, s in tools if n == forced), tools[0])
        return "tool", (name, sample(schema))
    if last_role == "tool":
        return "text", f"The tool said: {turns[-1][1]}"
    return "text", f"echo: {last_user}"


def vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255.0, 4) for b in digest[:DIMENSIONS]]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    out = []
    for part in content or ():
        if isinstance(part, dict) and part.get("type") == "text":
            out.append(part.get("text", ""))
        elif isinstance(part, dict) and part.get("type") == "tool_result":
            out.append(_text(part.get("content")))
    return " ".join(out)


class FakeProvider:
    """One fake provider's Starlette app, served by uvicorn on a free local port."""

    name = ""
    models: list[str] = []

    def __init__(self, key: str | None = None, *, delay_s: float = 0.0) -> None:
        self.key = key or KEYS[self.name]
        self.delay_s = delay_s  # between streamed chunks
        self.requests: list[dict[str, Any]] = []
        self.app = Starlette(routes=self.routes())
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task | None = None
        self.port = 0

    def routes(self) -> list[Route]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> FakeProvider:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port or self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        """Stop serving (the port is kept: ``start()`` again serves on the same one)."""
        if self.server is not None:
            self.server.should_exit = True
            await self.task
            self.server = None

    async def _body(self, request: Request) -> dict[str, Any]:
        body = json.loads(await request.body() or b"{}")
        self.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        return body


# ---------------------------------------------------------------- OpenAI (and Google's compatible endpoint)


class FakeOpenAI(FakeProvider):
    name = "openai"
    models = OPENAI_MODELS
    prefix = "/v1"

    def routes(self) -> list[Route]:
        p = self.prefix
        return [
            Route(f"{p}/models", self.list_models, methods=["GET"]),
            Route(f"{p}/chat/completions", self.chat, methods=["POST"]),
            Route(f"{p}/completions", self.completions, methods=["POST"]),
            Route(f"{p}/embeddings", self.embeddings, methods=["POST"]),
        ]

    def error(self, status: int, message: str, kind: str, code: str | None, param: str | None = None) -> Response:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    def refused(self, request: Request, body: dict | None = None) -> Response | None:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token != self.key:
            shown = f"{token[:10]}...{token[-4:]}" if len(token) > 14 else token  # as OpenAI quotes a wrong key
            return self.error(401, f"Incorrect API key provided: {shown}.", "invalid_request_error", "invalid_api_key")
        if body is not None:
            model = body.get("model")
            if model not in self.listed_ids():
                return self.error(
                    404,
                    f"The model `{model}` does not exist or you do not have access to it.",
                    "invalid_request_error",
                    "model_not_found",
                )
            if model == "rate-limited":
                return self.error(429, "Rate limit reached for requests.", "requests", "rate_limit_exceeded")
        return None

    def listed_ids(self) -> list[str]:
        return self.models

    async def list_models(self, request: Request) -> Response:
        refused = self.refused(request)
        if refused:
            return refused
        return JSONResponse({"object": "list", "data": [self.model_row(m) for m in self.listed_ids()]})

    def model_row(self, model: str) -> dict:
        """One entry of the models list, as this provider writes it."""
        return {"id": model, "object": "model", "created": 1700000000, "owned_by": self.name}

    def _turns(self, messages: list[dict]) -> list[tuple[str, str]]:
        return [(m.get("role", "user"), _text(m.get("content"))) for m in messages]

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        refused = self.refused(request, body)
        if refused:
            return refused
        messages = body.get("messages") or []
        if not messages:
            return self.error(400, "[] is too short - 'messages'", "invalid_request_error", None, "messages")
        turns = self._turns(messages)
        tools = [(t["function"]["name"], t["function"].get("parameters") or {}) for t in body.get("tools") or ()]
        choice = body.get("tool_choice")
        forced = choice["function"]["name"] if isinstance(choice, dict) else None
        if choice == "none":
            tools = []
        kind, answer = decide(turns, tools, forced)
        fmt = body.get("response_format") or {}
        if kind == "text" and fmt.get("type") == "json_schema":
            answer = json.dumps(sample(fmt["json_schema"].get("schema") or {}))
        prompt = sum(words(text) for _, text in turns)
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = body["model"] + "-2024-07-18" if body["model"] == "gpt-4o-mini" else body["model"]
        if kind == "tool":
            name, args = answer
            arguments = json.dumps(args)
            calls = [
                {
                    "id": "call_" + uuid.uuid4().hex[:12],
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ]
            completion, finish = words(arguments), "tool_calls"
        else:
            calls, completion, finish = None, words(answer), "stop"
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": None if calls else answer, "refusal": None}
            if calls:
                message["tool_calls"] = calls
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                    "usage": usage,
                    "system_fingerprint": "fp_fake",
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            out = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                out["usage"] = None
            return b"data: " + json.dumps(out).encode() + b"\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": "" if not calls else None, "refusal": None})
            if calls:
                call = calls[0]
                start = {
                    "index": 0,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""},
                }
                yield chunk({"tool_calls": [start]})
                arguments = call["function"]["arguments"]
                half = len(arguments) // 2
                for piece in (arguments[:half], arguments[half:]):
                    await self._pause()
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            else:
                for i, word in enumerate(answer.split(" ")):
                    await self._pause()
                    yield chunk({"content": word if i == 0 else " " + word})
            yield chunk({}, finish)
            if include_usage:
                yield self._usage_chunk(cid, created, model, usage)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _usage_chunk(self, cid: str, created: int, model: str, usage: dict) -> bytes:
        out = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        return b"data: " + json.dumps(out).encode() + b"\n\n"

    async def _pause(self) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        refused = self.refused(request, body)
        if refused:
            return refused
        prompt = body.get("prompt") or ""
        prompt = prompt if isinstance(prompt, str) else " ".join(prompt)
        text = f" echo: {prompt}"
        usage = {
            "prompt_tokens": words(prompt),
            "completion_tokens": words(text),
            "total_tokens": words(prompt) + words(text),
        }
        return JSONResponse(
            {
                "id": "cmpl-" + uuid.uuid4().hex[:24],
                "object": "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            }
        )

    async def embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        refused = self.refused(request, body)
        if refused:
            return refused
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        data = []
        for index, text in enumerate(inputs):
            value: Any = vector(text)
            if body.get("encoding_format") == "base64":
                import base64

                value = base64.b64encode(struct.pack(f"<{len(value)}f", *value)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(words(t) for t in inputs)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


class FakeGoogle(FakeOpenAI):
    """Gemini's OpenAI-compatible endpoint: the same API under /v1beta/openai, ``models/`` ids,
    errors as a one-element list."""

    name = "google"
    models = GOOGLE_MODELS
    prefix = "/v1beta/openai"

    def model_row(self, model: str) -> dict:
        return {"id": f"models/{model}", "object": "model", "owned_by": "google"}

    def error(self, status: int, message: str, kind: str, code: str | None, param: str | None = None) -> Response:
        statuses = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED"}
        return JSONResponse(
            [{"error": {"code": status, "message": message, "status": statuses.get(status, "INTERNAL")}}], status
        )


# ---------------------------------------------------------------- Anthropic's Messages API


class FakeAnthropic(FakeProvider):
    name = "anthropic"
    models = ANTHROPIC_MODELS

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/messages", self.messages, methods=["POST"]),
        ]

    def error(self, status: int, kind: str, message: str) -> Response:
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status)

    def refused(self, request: Request) -> Response | None:
        if request.headers.get("x-api-key") != self.key:
            return self.error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self.error(400, "invalid_request_error", "anthropic-version: header is required")
        return None

    async def list_models(self, request: Request) -> Response:
        refused = self.refused(request)
        if refused:
            return refused
        limit = int(request.query_params.get("limit", 20))
        after = request.query_params.get("after_id")
        start = self.models.index(after) + 1 if after in self.models else 0
        page = self.models[start : start + limit]
        data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-02-19T00:00:00Z"} for m in page]
        more = start + limit < len(self.models)
        return JSONResponse(
            {
                "data": data,
                "has_more": more,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            }
        )

    async def messages(self, request: Request) -> Response:
        body = await self._body(request)
        refused = self.refused(request)
        if refused:
            return refused
        if body.get("model") not in self.models:
            return self.error(404, "not_found_error", f"model: {body.get('model')}")
        if not isinstance(body.get("max_tokens"), int):
            return self.error(400, "invalid_request_error", "max_tokens: Field required")
        turns: list[tuple[str, str]] = []
        for message in body.get("messages") or ():
            role = message.get("role")
            if role not in ("user", "assistant"):
                return self.error(400, "invalid_request_error", f'messages: Unexpected role "{role}"')
            content = message.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for block in blocks:
                if block.get("type") not in ("text", "image", "tool_use", "tool_result"):
                    return self.error(400, "invalid_request_error", f"unknown content block {block.get('type')}")
            results = [b for b in blocks if b.get("type") == "tool_result"]
            if results:
                turns.append(("tool", _text(results[-1].get("content"))))
            else:
                turns.append((role, _text(blocks)))
        if not turns:
            return self.error(400, "invalid_request_error", "messages: at least one message is required")
        tools = [(t["name"], t.get("input_schema") or {}) for t in body.get("tools") or ()]
        choice = body.get("tool_choice") or {}
        if choice.get("type") == "none":
            tools = []
        kind, answer = decide(turns, tools, choice.get("name") if choice.get("type") == "tool" else None)
        prompt = sum(words(t) for _, t in turns) + words(body.get("system") or "")
        msg_id = "msg_" + uuid.uuid4().hex[:24]
        if kind == "tool":
            name, args = answer
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": "toolu_" + uuid.uuid4().hex[:20],
                "name": name,
                "input": args,
            }
            stop, output = "tool_use", words(json.dumps(args))
        else:
            block, stop, output = {"type": "text", "text": answer}, "end_turn", words(answer)
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [block],
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": prompt,
                        "output_tokens": output,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                }
            )

        def event(name: str, data: dict) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        async def events():
            start = {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": 1},
            }
            yield event("message_start", {"type": "message_start", "message": start})
            if body["model"] == "claude-overloaded":
                yield event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
                return
            if block["type"] == "tool_use":
                head = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                yield event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": head})
                yield event("ping", {"type": "ping"})
                arguments = json.dumps(block["input"])
                half = len(arguments) // 2
                for piece in (arguments[:half], arguments[half:]):
                    await self._pause()
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    yield event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            else:
                head = {"type": "text", "text": ""}
                yield event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": head})
                yield event("ping", {"type": "ping"})
                for i, word in enumerate(block["text"].split(" ")):
                    await self._pause()
                    delta = {"type": "text_delta", "text": word if i == 0 else " " + word}
                    yield event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            final = {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": output},
            }
            yield event("message_delta", final)
            yield event("message_stop", {"type": "message_stop"})

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _pause(self) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)


FAKES: dict[str, type[FakeProvider]] = {"openai": FakeOpenAI, "anthropic": FakeAnthropic, "google": FakeGoogle}


def main() -> None:
    parser = argparse.ArgumentParser(description="serve one fake cloud provider on 127.0.0.1")
    parser.add_argument("provider", choices=sorted(FAKES))
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def serve() -> None:
        fake = await FAKES[args.provider]().start(args.port)
        print(f"ready {fake.url}", flush=True)
        await fake.task

    try:
        import uvloop  # as the gateway runs: the benches compare like with like

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
