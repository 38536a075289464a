"""OpenAI response bodies and SSE chunks, built from node replies.

A plain answer (one choice of text) keeps its short path; an answer with ``choices`` (n > 1,
tool calls, logprobs; events.messages.Choice) is built choice by choice. The pieces
(:func:`tool_call_dicts`, :func:`chat_logprobs`, :func:`completion_logprobs`,
:class:`Choices`) do not depend on the chat route, for other response shapes to reuse.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from events import codec
from events.messages import Choice, DownloadProgress, TextDelta, TokenLogprob, ToolCall, ToolCallDelta, Usage

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


def tool_call_dicts(calls: list[ToolCall]) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def _tool_call_fragment(call: ToolCallDelta) -> dict:
    if call.id is not None:
        return {
            "index": call.index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
    return {"index": call.index, "function": {"arguments": call.arguments}}


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's chat ``logprobs`` object: each token with its bytes and its alternatives."""
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.utf8),
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.utf8)} for t in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """The legacy completions ``logprobs`` object; ``offset``: where the first token's text starts."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat_message(choice: Choice) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.tool_calls:
        message["content"] = choice.text or None
        message["tool_calls"] = tool_call_dicts(choice.tool_calls)
    return message


def chat_completion(
    cid: str, created: int, model: str, text: str, finish_reason: str, usage: Usage, choices: list[Choice] | None = None
) -> dict:
    items = [
        {
            "index": c.index,
            "message": chat_message(c),
            "logprobs": chat_logprobs(c.logprobs),
            "finish_reason": client_finish_reason(c.finish_reason),
        }
        for c in _or_plain(choices, text, finish_reason)
    ]
    return _completion(CHAT_OBJECT, cid, created, model, items, usage)


def text_completion(
    cid: str, created: int, model: str, text: str, finish_reason: str, usage: Usage, choices: list[Choice] | None = None
) -> dict:
    items = [
        {
            "text": c.text,
            "index": c.index,
            "logprobs": completion_logprobs(c.logprobs),
            "finish_reason": client_finish_reason(c.finish_reason),
        }
        for c in _or_plain(choices, text, finish_reason)
    ]
    return _completion(TEXT_OBJECT, cid, created, model, items, usage)


def _or_plain(choices: list[Choice] | None, text: str, finish_reason: str) -> list[Choice]:
    """``choices``, or the one plain-text choice an answer without them is (no calls, no logprobs)."""
    return [Choice(text=text, finish_reason=finish_reason)] if choices is None else choices


def _completion(obj: str, cid: str, created: int, model: str, choices: list[dict], usage: Usage) -> dict:
    """The envelope both non-streamed completions share (the key order is the bytes clients see)."""
    return {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_dict(usage),
        "system_fingerprint": None,
    }


class Choices:
    """Every choice of a streamed answer put back together from its deltas (for the history
    record, and for response shapes that need the whole answer at its end)."""

    def __init__(self) -> None:
        self.texts: dict[int, list[str]] = {}
        self.calls: dict[int, list[list[str]]] = {}  # per choice: [id, name, arguments...]
        self.logprobs: dict[int, list[TokenLogprob]] = {}

    def add(self, delta: TextDelta) -> None:
        self.texts.setdefault(delta.index, []).append(delta.text)
        if delta.logprobs:
            self.logprobs.setdefault(delta.index, []).extend(delta.logprobs)
        for call in delta.tool_calls or []:
            calls = self.calls.setdefault(delta.index, [])
            if call.id is not None:
                calls.append([call.id, call.name or "", call.arguments])
            elif calls:
                calls[-1].append(call.arguments)

    def result(self, finals: list[Choice]) -> list[Choice]:
        return [
            Choice(
                index=final.index,
                text="".join(self.texts.get(final.index, [])),
                finish_reason=final.finish_reason,
                tool_calls=[ToolCall(id=c[0], name=c[1], arguments="".join(c[2:])) for c in self.calls[final.index]]
                if final.index in self.calls
                else None,
                logprobs=self.logprobs.get(final.index),
            )
            for final in finals
        ]


class ChunkWriter:
    """SSE chunks of one streamed answer, chat or legacy completion shaped."""

    def __init__(self, chat: bool, cid: str, created: int, model: str, include_usage: bool, n: int = 1) -> None:
        self.chat = chat
        self.n = n
        self.base = {
            "id": cid,
            "object": CHAT_CHUNK_OBJECT if chat else TEXT_OBJECT,
            "created": created,
            "model": model,
        }
        self.include_usage = include_usage
        self.offsets: dict[int, int] = {}  # completions: text_offset of each choice's next token
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
        return b"".join(
            self._chunk(
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            )
            for i in range(self.n)
        )

    def delta(self, text: str) -> bytes:
        if self.chat:
            return self._chunk({"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None})
        return self._chunk({"text": text, "index": 0, "logprobs": None, "finish_reason": None})

    def rich(self, reply: TextDelta) -> bytes:
        """A delta with more than choice 0's text: another choice, logprobs, tool call fragments."""
        if not self.chat:
            offset = self.offsets.get(reply.index, 0)
            self.offsets[reply.index] = offset + len(reply.text)
            logprobs = completion_logprobs(reply.logprobs, offset)
            return self._chunk({"text": reply.text, "index": reply.index, "logprobs": logprobs, "finish_reason": None})
        delta: dict[str, Any] = {}
        if reply.text or not reply.tool_calls:
            delta["content"] = reply.text
        if reply.tool_calls:
            delta["tool_calls"] = [_tool_call_fragment(call) for call in reply.tool_calls]
        return self._chunk(
            {"index": reply.index, "delta": delta, "logprobs": chat_logprobs(reply.logprobs), "finish_reason": None}
        )

    def closing(self, finish_reason: str, usage: Usage, choices: list[Choice] | None = None) -> bytes:
        ends = [(c.index, c.finish_reason) for c in choices] if choices else [(0, finish_reason)]
        out = b""
        for index, reason in ends:
            reason = client_finish_reason(reason)
            if self.chat:
                out += self._chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
            else:
                out += self._chunk({"text": "", "index": index, "logprobs": None, "finish_reason": reason})
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
