"""An existing OpenAI-compatible server (vLLM, Ollama, llama.cpp's server, LM Studio, …) as
the engine of a node: ``llm-router node --upstream URL [--upstream-key K]``.

:class:`UpstreamServer` is one pooled client to the server (outbound/http.py); each model the server
lists gets an :class:`UpstreamEngine`, which the node serves on the usual subjects like any
engine, so dispatch, queueing, failover and history apply unchanged. The engine is async (it
waits on the network, not on a CPU): the runners await it in the event loop instead of
handing it a worker thread. The key goes only into the ``Authorization`` header, and error
text from the server is scrubbed of it; it is never logged, announced or stored.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Struct

from events import codec, subjects
from events.messages import Usage
from outbound.http import HttpError, Timeout, client_for
from outbound.redact import redact
from outbound.sse import sse_batches

from .runtimes.base import Cancellation, EngineError, TextOutcome

RUNTIME = "upstream"
CAPABILITIES = [subjects.CHAT, subjects.COMPLETION, subjects.EMBEDDING]  # a model list does not say more
CONNECT_TIMEOUT_S = 5.0
JSON = {"content-type": "application/json"}

AsyncDelta = Callable[[str], Awaitable[None]]


def api_base(url: str) -> str:
    """The server's OpenAI API root: ``http://host:8000`` → ``http://host:8000/v1``."""
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--upstream must be an http(s) URL, not {url!r}")
    return url + "/v1" if parts.path in ("", "/") else url


def safe_url(url: str) -> str:
    """``url`` without credentials or query: what logs and heartbeats may show."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _ModelList(Struct):
    data: list[dict[str, Any]] = []


class _Message(Struct):
    content: str | None = None


class _Choice(Struct):
    message: _Message | None = None
    delta: _Message | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Answer(Struct):
    choices: list[_Choice] = []
    usage: Usage | None = None
    data: list[dict[str, Any]] | None = None  # embeddings
    error: Any = None


_answer = msgspec.json.Decoder(_Answer).decode


def _usage(usage: Usage | None) -> Usage:
    if usage is None:
        return Usage()
    if not usage.total_tokens:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return usage


class UpstreamServer:
    """The server: its model list, and requests on behalf of the node's engines."""

    def __init__(self, url: str, key: str | None = None, *, request_timeout: float = 600.0) -> None:
        self.base = api_base(url)
        self.shown = safe_url(self.base)
        self.key = key or None
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.client = client_for(self.base, headers=headers, timeout=request_timeout, connect_timeout=CONNECT_TIMEOUT_S)

    def scrub(self, text: str) -> str:
        return redact(text, self.key)

    async def models(self, timeout: float) -> list[str]:
        """The ids the server lists (``GET /v1/models``): also its health check."""
        response = await self.client.get("/models", timeout=timeout)
        if not response.is_success:
            raise EngineError(self._message(response.status, response.content), status=502)
        listed = msgspec.json.decode(response.content, type=_ModelList).data
        return [m["id"] for m in listed if isinstance(m.get("id"), str) and m["id"]]

    def _message(self, status: int, content: bytes) -> str:
        try:
            body = msgspec.json.decode(content)
        except msgspec.DecodeError:
            body = content.decode("utf-8", "replace")[:300]
        error = body.get("error", body) if isinstance(body, dict) else body
        detail = error.get("message", error) if isinstance(error, dict) else error
        return self.scrub(f"upstream {self.shown} answered {status}: {detail}")

    def failure(self, status: int, content: bytes) -> EngineError:
        return EngineError(self._message(status, content), status=status, code="upstream_error")

    def unreachable(self, exc: HttpError) -> EngineError:
        if isinstance(exc, Timeout):
            return EngineError(f"upstream {self.shown} did not answer in time", status=504, code="upstream_timeout")
        reason = self.scrub(str(exc) or type(exc).__name__)
        return EngineError(f"upstream {self.shown} is unreachable: {reason}", status=502, code="upstream_unavailable")

    async def post(self, path: str, payload: dict[str, Any], cancelled: threading.Event) -> _Answer:
        """One whole answer; a client that left meanwhile ends the wait (and the upstream request)."""
        task = asyncio.current_task()
        waiting = True

        def stop() -> None:
            if waiting:  # a callback that comes after the answer must not cancel what follows it
                task.cancel()

        remove = cancelled.on_set(stop) if isinstance(cancelled, Cancellation) else None
        try:
            response = await self.client.request("POST", path, codec.encode(payload), headers=JSON)
        except asyncio.CancelledError:
            if not cancelled.is_set():
                raise
            task.uncancel()
            raise EngineError("cancelled: the client left", status=499, code="cancelled") from None
        except HttpError as exc:
            raise self.unreachable(exc) from None
        finally:
            waiting = False
            if remove is not None:
                remove()
        if not response.is_success:
            raise self.failure(response.status, response.content)
        try:
            return _answer(response.content)
        except msgspec.DecodeError:
            raise EngineError(f"upstream {self.shown} sent an answer that is not JSON", status=502) from None

    async def stream(
        self, path: str, payload: dict[str, Any], on_delta: AsyncDelta, cancelled: threading.Event
    ) -> tuple[str | None, Usage]:
        """Relay a stream's text pieces as they come; (finish reason, usage) at its end. A server
        that reports no usage in streams (llama-cpp-python) gets its pieces counted as tokens
        (servers send one a token) and its prompt tokens left at 0."""
        finish, usage, pieces = None, None, 0
        try:
            response = await self.client.request("POST", path, codec.encode(payload), headers=JSON, stream=True)
        except HttpError as exc:
            raise self.unreachable(exc) from None
        try:
            if not response.is_success:
                raise self.failure(response.status, await response.read())
            async for batch in sse_batches(response.iter_bytes()):
                text = []  # the pieces of one network read go out as one delta
                ended = False
                for _, data in batch:
                    if data == b"[DONE]":
                        ended = True
                        break
                    try:
                        chunk = _answer(data)
                    except msgspec.DecodeError:
                        continue
                    if chunk.error is not None:
                        raise EngineError(self.scrub(f"upstream {self.shown}: {chunk.error}"), status=502)
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices[:1]:
                        piece = choice.delta.content if choice.delta is not None else choice.text
                        if piece:
                            pieces += 1
                            text.append(piece)
                        if choice.finish_reason:
                            finish = choice.finish_reason
                if text:
                    await on_delta("".join(text))
                if ended or cancelled.is_set():
                    break
        except HttpError as exc:
            raise self.unreachable(exc) from None
        finally:
            await response.aclose()
        return finish, _usage(usage) if usage is not None else Usage(0, pieces, pieces)

    async def aclose(self) -> None:
        await self.client.aclose()


class UpstreamEngine:
    """One model of the server, served by the node (the Engine protocol, with async methods)."""

    artifact_bytes = 0  # nothing on this node's disk: LoadedModel.origin says "upstream"

    def __init__(self, server: UpstreamServer, model: str, slots: int) -> None:
        self.server = server
        self.model = model  # the server's own name for it
        self.capabilities = list(CAPABILITIES)
        self.slots = slots

    def _payload(self, body: Any) -> dict[str, Any]:
        payload = msgspec.to_builtins(body)
        payload["model"] = self.model
        return payload

    async def _text(self, path: str, body: Any, on_delta: AsyncDelta | None, cancelled: threading.Event, chat: bool):
        payload = self._payload(body)
        if on_delta is None:
            payload["stream"] = False
            answer = await self.server.post(path, payload, cancelled)
            choice = answer.choices[0] if answer.choices else _Choice()
            text = (choice.message.content if chat and choice.message else choice.text) or ""
            return TextOutcome(text, choice.finish_reason or "stop", _usage(answer.usage))
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}  # servers that know it count the tokens
        finish, usage = await self.server.stream(path, payload, on_delta, cancelled)
        return TextOutcome("", finish or "stop", usage)

    async def chat(self, body: Any, on_delta: AsyncDelta | None, cancelled: threading.Event) -> TextOutcome:
        return await self._text("/chat/completions", body, on_delta, cancelled, chat=True)

    async def complete(self, body: Any, on_delta: AsyncDelta | None, cancelled: threading.Event) -> TextOutcome:
        return await self._text("/completions", body, on_delta, cancelled, chat=False)

    async def embed(self, body: Any) -> tuple[list[list[float]], Usage]:
        payload = self._payload(body)
        payload["encoding_format"] = "float"  # the gateway encodes base64 itself
        answer = await self.server.post("/embeddings", payload, threading.Event())
        data = sorted(answer.data or (), key=lambda item: item.get("index", 0))
        vectors = [item.get("embedding") for item in data]
        if not vectors or not all(isinstance(v, list) for v in vectors):
            raise EngineError(f"upstream {self.server.shown} sent no embeddings", status=502)
        return vectors, _usage(answer.usage)

    def close(self) -> None:
        """Nothing to free: the server's client is shared by its models and closed with the link."""
