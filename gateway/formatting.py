"""OpenAI response bodies and SSE chunks, built from node replies."""

from __future__ import annotations

import base64
import struct
from typing import Any

from events import codec
from events.messages import DownloadProgress, Usage

CHAT_OBJECT = "chat.completion"
CHAT_CHUNK_OBJECT = "chat.completion.chunk"
TEXT_OBJECT = "text_completion"

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: Any) -> bytes:
    return b"data: " + codec.encode(payload) + b"\n\n"


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def client_finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length", "tool_calls", "content_filter") else "stop"


def chat_completion(cid: str, created: int, model: str, text: str, finish_reason: str, usage: Usage) -> dict:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": client_finish_reason(finish_reason),
    }
    return _completion(CHAT_OBJECT, cid, created, model, choice, usage)


def text_completion(cid: str, created: int, model: str, text: str, finish_reason: str, usage: Usage) -> dict:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": client_finish_reason(finish_reason)}
    return _completion(TEXT_OBJECT, cid, created, model, choice, usage)


def _completion(obj: str, cid: str, created: int, model: str, choice: dict, usage: Usage) -> dict:
    """The envelope both non-streamed completions share (the key order is the bytes clients see)."""
    return {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_dict(usage),
        "system_fingerprint": None,
    }


class ChunkWriter:
    """SSE chunks of one streamed answer, chat or legacy completion shaped."""

    def __init__(self, chat: bool, cid: str, created: int, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.base = {
            "id": cid,
            "object": CHAT_CHUNK_OBJECT if chat else TEXT_OBJECT,
            "created": created,
            "model": model,
        }
        self.include_usage = include_usage
        if chat:
            self.base["system_fingerprint"] = None

    def _chunk(self, choice: dict) -> bytes:
        chunk = dict(self.base, choices=[choice])
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def opening(self) -> bytes:
        if not self.chat:
            return b""
        return self._chunk(
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        )

    def delta(self, text: str) -> bytes:
        if self.chat:
            return self._chunk({"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None})
        return self._chunk({"text": text, "index": 0, "logprobs": None, "finish_reason": None})

    def closing(self, finish_reason: str, usage: Usage) -> bytes:
        reason = client_finish_reason(finish_reason)
        if self.chat:
            out = self._chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason})
        else:
            out = self._chunk({"text": "", "index": 0, "logprobs": None, "finish_reason": reason})
        if self.include_usage:
            out += sse(dict(self.base, choices=[], usage=usage_dict(usage)))
        return out + SSE_DONE


def embedding_list(model: str, vectors: list[list[float]], usage: Usage, encoding_format: str) -> dict:
    data = []
    for index, vector in enumerate(vectors):
        value: Any = vector
        if encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens},
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress_text(progress: DownloadProgress | None) -> str:
    """``42%, 1.2 GB of 2.9 GB, 35 MB/s, about 48 s left`` (parts unknown are left out)."""
    if progress is None:
        return ""
    parts = []
    if progress.fraction is not None:
        parts.append(f"{progress.fraction:.0%}, {_size(progress.bytes_done)} of {_size(progress.bytes_total)}")
    elif progress.bytes_done:
        parts.append(f"{_size(progress.bytes_done)} so far")
    if progress.speed_bps > 0:
        parts.append(f"{_size(progress.speed_bps)}/s")
    if progress.eta_s is not None:
        parts.append(f"about {progress.eta_s:.0f} s left")
    return ", ".join(parts)
