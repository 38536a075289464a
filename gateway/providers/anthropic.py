"""Anthropic through its native Messages API (its OpenAI-compatibility layer is documented as
not meant for production): chat completions, streamed and not, tool use and structured output,
translated by gateway/providers/anthropic_messages.py. Anthropic has no embeddings API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import msgspec

from events import codec, subjects
from outbound.http import HttpError, Response
from outbound.sse import sse_batches

from ..errors import ApiError
from . import anthropic_messages as am
from .answers import Answer, Stream, Transcript
from .base import MODELS_TIMEOUT_S, CloudModel, Provider, sse

API_VERSION = "2023-06-01"
JSON = {"content-type": "application/json"}
MAX_MODEL_PAGES = 10  # 1000 models a page: far more than Anthropic lists


def _epoch(created_at: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(created_at).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


class AnthropicProvider(Provider):
    capabilities = frozenset({subjects.CHAT})

    def client_base(self) -> str:
        return self.base_url.removesuffix("/v1")  # ANTHROPIC_API_BASE_URL may be given with or without it

    def auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self.settings.key or "", "anthropic-version": API_VERSION}

    async def models(self) -> list[CloudModel]:
        models: list[CloudModel] = []
        params: dict[str, Any] = {"limit": 1000}
        for _ in range(MAX_MODEL_PAGES):
            response = await self.send("GET", "/v1/models?" + urlencode(params), timeout=MODELS_TIMEOUT_S)
            page = msgspec.json.decode(response.content)
            for entry in page.get("data") or ():
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    models.append(CloudModel(entry["id"], _epoch(entry.get("created_at")), [subjects.CHAT]))
            if not page.get("has_more") or not page.get("last_id"):
                break
            params["after_id"] = page["last_id"]
        return models

    async def complete(self, capability: str, payload: dict[str, Any], meta: Any) -> Answer:
        request, structured = am.messages_request(payload, payload["model"], stream=False)
        response = await self.send("POST", "/v1/messages", codec.encode(request), headers=JSON)
        try:
            message = msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            raise ApiError(502, "anthropic sent an answer that is not JSON.", code="provider_error") from None
        completion = am.chat_completion(message, meta.cid, meta.created, meta.model, structured)
        body = codec.encode(completion)
        usage = am.usage_of(message.get("usage"))
        return Answer(body, usage, msgspec.Raw(body))

    async def stream(self, capability: str, payload: dict[str, Any], meta: Any, *, client_wants_usage: bool) -> Stream:
        request, structured = am.messages_request(payload, payload["model"], stream=True)
        response = await self.send("POST", "/v1/messages", codec.encode(request), headers=JSON, stream=True)
        translator = am.StreamTranslator(
            meta.cid, meta.created, meta.model, include_usage=client_wants_usage, structured=structured
        )
        transcript = Transcript()
        return Stream(self._relay(response, translator, transcript), transcript, response.aclose)

    def _translate(self, event: str, data: bytes, translator: am.StreamTranslator, t: Transcript) -> bytes:
        if translator.done or translator.error is not None:
            return b""  # what follows the end is not relayed
        try:
            decoded = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return b""  # not an event this code can read; Anthropic sends only JSON
        if not isinstance(decoded, dict):
            return b""
        out, delta = translator.feed(event, decoded)
        if delta is not None:
            if delta.get("content"):
                t.text.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                t.tool_delta(call["index"], call.get("id"), function.get("name"), function.get("arguments"))
        t.usage, t.finish_reason = translator.usage, translator.finish_reason
        if translator.error is not None:
            t.error = (translator.error[0], self.scrub(translator.error[1]))
        return out

    async def _relay(self, response: Response, translator: am.StreamTranslator, t: Transcript) -> AsyncIterator[bytes]:
        """Each network read's events translated and passed on in one write, as soon as they arrive."""
        try:
            async for batch in sse_batches(response.iter_bytes()):
                out = b"".join(self._translate(event, data, translator, t) for event, data in batch)
                if out:
                    yield out
                if translator.done or translator.error is not None:
                    t.done = translator.done
                    return
            t.error = (502, "anthropic ended the stream before the answer was complete")
            yield sse(ApiError(502, t.error[1], type="server_error", code="provider_error").body()) + am.SSE_DONE
        except HttpError as exc:
            error = self.unreachable(exc)
            t.error = (error.status, error.message)
            yield sse(error.body()) + am.SSE_DONE
