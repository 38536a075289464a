"""What a provider hands back to the routes: a whole answer, or a stream and what it said.

Both carry what the history record and the usage counters need (tokens, the text, tool calls,
the finish reason) besides the bytes the client gets, so the routes never parse a provider's
format themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from events.messages import Usage


@dataclass
class Answer:
    """A non-streamed answer: ``body`` (JSON) as the client gets it, ``record`` as history keeps it."""

    body: bytes
    usage: Usage | None
    record: Any


@dataclass
class Transcript:
    """What a streamed answer said so far, assembled from its chunks (for the history record)."""

    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage | None = None
    done: bool = False  # the provider ended the stream properly
    error: tuple[int, str] | None = None  # (status, message) when it ended with an error

    def tool_delta(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> None:
        entry = self.tool_calls.setdefault(index, {"id": None, "type": "function", "name": "", "arguments": ""})
        if call_id:
            entry["id"] = call_id
        if name:
            entry["name"] += name
        if arguments:
            entry["arguments"] += arguments

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for _, c in sorted(self.tool_calls.items())
            ]
        return message

    def summary(self, model: str) -> dict[str, Any]:
        """The streamed answer as one chat completion, for the history record."""
        return {
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": self.message(), "finish_reason": self.finish_reason}],
            "usage": None
            if self.usage is None
            else {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "total_tokens": self.usage.total_tokens,
            },
        }


@dataclass
class Stream:
    """A streamed answer: ``chunks`` (SSE bytes for the client, ``[DONE]`` included) fills
    ``transcript`` as it goes; ``close`` ends the provider's response however it stopped."""

    chunks: AsyncIterator[bytes]
    transcript: Transcript
    close: Callable[[], Awaitable[None]]
