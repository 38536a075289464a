"""Responses API answers built from node replies: the response object, its output items
(``message`` with ``output_text``, ``function_call``), and the typed server-sent events of a
streamed one, in the shapes the official SDK parses (``openai.types.responses``).

A streamed answer is a sequence of events, each with a ``sequence_number``: ``response.created``
and ``response.in_progress``; per output item ``response.output_item.added``, its content
(``response.content_part.added``, ``response.output_text.delta``... ``.done``,
``response.content_part.done``; or ``response.function_call_arguments.delta``... ``.done``) and
``response.output_item.done``; then ``response.completed`` (``response.incomplete`` when the
token limit cut it, ``response.failed`` on a failure), whose response holds every item.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec

from events import codec
from events.messages import Choice, TextDelta, TokenLogprob, Usage
from events.responses import ResponsesBody

from .errors import ApiError


def new_id(prefix: str) -> str:
    """Random ids (``resp_``, ``msg_``, ``fc_``): a response id is the key of a stored answer."""
    return f"{prefix}_{secrets.token_hex(16)}"


def usage_dict(usage: Usage | None) -> dict | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def logprob_dicts(entries: list[TokenLogprob] | None) -> list[dict]:
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.utf8),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.utf8)} for t in e.top],
        }
        for e in entries or []
    ]


def text_part(text: str, logprobs: list[dict]) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def message_item(item_id: str, status: str, content: list[dict]) -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, status: str, call_id: str, name: str, arguments: str) -> dict:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _finished(finish_reason: str) -> tuple[str, dict | None]:
    """The response's status and ``incomplete_details`` for a node's finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def output_of(text: str, finish_reason: str, choices: list[Choice] | None) -> list[dict]:
    """The output items of a whole (unstreamed) answer: its text as a message (unless the answer
    is only function calls), then each call."""
    choice = choices[0] if choices else Choice(text=text, finish_reason=finish_reason)
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    items = []
    if choice.text or not choice.tool_calls:
        items.append(message_item(new_id("msg"), status, [text_part(choice.text, logprob_dicts(choice.logprobs))]))
    for call in choice.tool_calls or []:
        items.append(call_item(new_id("fc"), status, call.id, call.name, call.arguments))
    return items


class Envelope:
    """The fields of one response that do not depend on its output: what was asked, echoed."""

    def __init__(self, response_id: str, body: ResponsesBody) -> None:
        self.id = response_id
        self.body = body
        self.created_at = int(time.time())
        text = body.text.format if body.text and body.text.format else None
        self.echo = {
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "model": body.model,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "temperature": body.temperature,
            "text": {"format": msgspec.to_builtins(text) if text else {"type": "text"}},
            "tool_choice": msgspec.to_builtins(body.tool_choice) if body.tool_choice is not None else "auto",
            "tools": msgspec.to_builtins(body.tools or []),
            "top_logprobs": body.top_logprobs or 0,
            "top_p": body.top_p,
            "truncation": "disabled",
            "user": body.user,
        }

    def response(
        self,
        status: str,
        output: list[dict],
        usage: Usage | None = None,
        *,
        stored: bool | None = None,
        incomplete: dict | None = None,
        error: dict | None = None,
    ) -> dict:
        done = status in ("completed", "incomplete", "failed")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if done else None,
            "error": error,
            "incomplete_details": incomplete,
            "output": output,
            "usage": usage_dict(usage),
            "store": self.body.store if stored is None else stored,
            **self.echo,
        }

    def whole(self, text: str, finish_reason: str, usage: Usage, choices: list[Choice] | None) -> dict:
        """The response of an unstreamed answer (``store`` as asked; the route corrects it if storing fails)."""
        status, incomplete = _finished(choices[0].finish_reason if choices else finish_reason)
        return self.response(status, output_of(text, finish_reason, choices), usage, incomplete=incomplete)


def error_dict(error: ApiError) -> dict:
    """A failure as a response's ``error`` (its ``code`` one of those the SDK knows)."""
    code = "rate_limit_exceeded" if error.status == 429 else "invalid_prompt" if error.status == 400 else "server_error"
    return {"code": code, "message": error.message}


class EventWriter:
    """The events of one streamed answer, numbered, and the output items they make."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.sequence = 0
        self.output: list[dict] = []  # finished items
        self.item: dict | None = None  # the item being written
        self.parts: list[str] = []  # its text (a message) or arguments (a call)
        self.logprobs: list[dict] = []

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + codec.encode(payload) + b"\n\n"

    def opening(self) -> bytes:
        response = self.envelope.response("in_progress", [])
        return self.event("response.created", response=response) + self.event("response.in_progress", response=response)

    @property
    def _index(self) -> int:
        return len(self.output)

    def _where(self) -> dict:
        assert self.item is not None
        return {"item_id": self.item["id"], "output_index": self._index}

    def _open_message(self) -> bytes:
        self.item = message_item(new_id("msg"), "in_progress", [])
        self.parts, self.logprobs = [], []
        return self.event("response.output_item.added", output_index=self._index, item=self.item) + self.event(
            "response.content_part.added", **self._where(), content_index=0, part=text_part("", [])
        )

    def _open_call(self, call_id: str, name: str) -> bytes:
        self.item = call_item(new_id("fc"), "in_progress", call_id, name, "")
        self.parts = []
        return self.event("response.output_item.added", output_index=self._index, item=self.item)

    def _current(self, status: str) -> dict:
        """The item being written, with what it holds so far."""
        item = self.item
        assert item is not None
        joined = "".join(self.parts)
        if item["type"] == "message":
            return message_item(item["id"], status, [text_part(joined, self.logprobs)])
        return call_item(item["id"], status, item["call_id"], item["name"], joined)

    def _close(self, status: str = "completed") -> bytes:
        if self.item is None:
            return b""
        done = self._current(status)
        where = self._where()
        if done["type"] == "message":
            part = done["content"][0]
            out = self.event(
                "response.output_text.done", **where, content_index=0, text=part["text"], logprobs=part["logprobs"]
            )
            out += self.event("response.content_part.done", **where, content_index=0, part=part)
        else:
            out = self.event("response.function_call_arguments.done", **where, arguments=done["arguments"])
        out += self.event("response.output_item.done", output_index=self._index, item=done)
        self.output.append(done)
        self.item = None
        return out

    def delta(self, reply: TextDelta) -> bytes:
        """The events of one node delta: text for the message, fragments of function calls."""
        out = b""
        logprobs = logprob_dicts(reply.logprobs)
        if reply.text or (logprobs and self.item is not None and self.item["type"] == "message"):
            if self.item is None or self.item["type"] != "message":
                out += self._close() + self._open_message()
            self.parts.append(reply.text)
            self.logprobs.extend(logprobs)
            out += self.event(
                "response.output_text.delta", **self._where(), content_index=0, delta=reply.text, logprobs=logprobs
            )
        for call in reply.tool_calls or []:
            if call.id is not None:
                out += self._close() + self._open_call(call.id, call.name or "")
            if call.arguments and self.item is not None and self.item["type"] == "function_call":
                self.parts.append(call.arguments)
                out += self.event("response.function_call_arguments.delta", **self._where(), delta=call.arguments)
        return out

    def closing(self, finish_reason: str, usage: Usage) -> tuple[bytes, dict]:
        """The events that end the answer (the last item's, the response's; the response
        event itself comes from :meth:`final`), and the final response."""
        status, incomplete = _finished(finish_reason)
        out = self._close("incomplete" if status == "incomplete" else "completed")
        if not self.output:  # nothing at all was generated: an empty message, as unstreamed
            out += self._open_message() + self._close("incomplete" if status == "incomplete" else "completed")
        return out, self.envelope.response(status, self.output, usage, incomplete=incomplete)

    def final(self, response: dict) -> bytes:
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return self.event(kind, response=response)

    def partial(self, status: str = "cancelled", error: dict | None = None) -> dict:
        """The response as far as it got (a failure, a client that left): never stored."""
        output = [*self.output, *([self._current("incomplete")] if self.item is not None else [])]
        return self.envelope.response(status, output, error=error, stored=False)

    def failed(self, error: ApiError) -> tuple[bytes, dict]:
        response = self.partial("failed", error_dict(error))
        return self.event("response.failed", response=response), response
