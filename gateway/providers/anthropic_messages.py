"""OpenAI chat completions to and from Anthropic's Messages API (``POST /v1/messages``).

Pure translation, no I/O. Requests: system and developer messages become ``system``; tool
calls and tool results become ``tool_use`` and ``tool_result`` blocks; images become image
blocks; ``tools``, ``tool_choice``, ``stop`` and ``user`` map to their Anthropic fields.
A ``response_format`` with a JSON schema becomes a forced tool whose input is the answer
(Anthropic has no JSON mode), read back as the message content. Fields with no Anthropic
counterpart (``seed``, penalties, ``logit_bias``) are left out. Answers and streamed events
become chat completions and ``chat.completion.chunk`` events.
"""

from __future__ import annotations

from typing import Any

import msgspec

from events import codec
from events.messages import Usage

from ..errors import ApiError
from ..formatting import SSE_DONE
from .base import sse

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI's default is "as many as fit"
STRUCTURED_TOOL = "json_response"  # the forced tool that carries a response_format answer

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic's error types (in error events and bodies) and the status each comes with.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def _invalid(message: str, param: str = "messages") -> ApiError:
    return ApiError(400, message, param=param, code="unsupported_by_provider")


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _image_block(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise _invalid("An image_url content part has no url.")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0] or "image/png"
        if ";base64" not in header:
            raise _invalid("A data: image_url must be base64-encoded for Anthropic.")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content or ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "input_image"):
            blocks.append(_image_block(part))
        else:
            raise _invalid(f"Anthropic models do not take '{kind}' content parts.")
    return blocks


def _arguments(arguments: Any) -> Any:
    """A tool call's JSON arguments as the object Anthropic wants as ``input``."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = msgspec.json.decode(arguments.encode() if isinstance(arguments, str) else arguments)
    except (msgspec.DecodeError, AttributeError):
        raise _invalid("A tool call's arguments are not a JSON object.") from None
    return value if isinstance(value, dict) else {"value": value}


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Consecutive messages of one role become one (tool results follow one another as one user turn)."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = []
    for tool in body.get("tools") or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function" or not function.get("name"):
            raise _invalid("Only function tools can go to Anthropic models.", param="tools")
        entry: dict[str, Any] = {
            "name": function["name"],
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            entry["description"] = function["description"]
        tools.append(entry)
    return tools


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        mapped = None
    elif choice == "auto":
        mapped = {"type": "auto"}
    elif choice == "required":
        mapped = {"type": "any"}
    elif choice == "none":
        mapped = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        mapped = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise _invalid("Unsupported tool_choice for an Anthropic model.", param="tool_choice")
    if parallel is False:
        mapped = {**(mapped or {"type": "auto"}), "disable_parallel_tool_use": True}
    return mapped


def _structured(body: dict[str, Any]) -> dict[str, Any] | None:
    """The forced tool for a ``response_format`` of type json_schema or json_object, if any."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        schema: Any = {"type": "object"}
    elif fmt["type"] == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        schema = fmt["json_schema"].get("schema") or {"type": "object"}
    else:
        raise _invalid("Unsupported response_format for an Anthropic model.", param="response_format")
    return {"name": STRUCTURED_TOOL, "description": "Answer with this JSON.", "input_schema": schema}


def messages_request(body: dict[str, Any], model: str, *, stream: bool) -> tuple[dict[str, Any], bool]:
    """The Messages API request for an OpenAI chat body; and whether the answer is a structured
    output (read from the forced tool)."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in body.get("messages") or ():
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            if _text_of(content):
                system.append(_text_of(content))
        elif role == "user":
            _append(messages, "user", _user_blocks(content))
        elif role == "assistant":
            text = _text_of(content)
            blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": function.get("name"),
                        "input": _arguments(function.get("arguments")),
                    }
                )
            _append(messages, "assistant", blocks)
        elif role in ("tool", "function"):
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id") or message.get("name"),
                "content": _text_of(content),
            }
            _append(messages, "user", [result])
    request: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS,
    }
    if system:
        request["system"] = "\n\n".join(system)
    for field in ("temperature", "top_p", "top_k"):
        if body.get(field) is not None:
            request[field] = body[field]
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        request["metadata"] = {"user_id": body["user"]}
    tools = _tools(body)
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    forced = _structured(body)
    if forced is not None:
        tools.append(forced)
        choice = {"type": "any"} if len(tools) > 1 else {"type": "tool", "name": STRUCTURED_TOOL}
    if tools:
        request["tools"] = tools
    if choice is not None and (tools or choice["type"] == "none"):
        request["tool_choice"] = choice
    if stream:
        request["stream"] = True
    return request, forced is not None


def usage_of(usage: Any, prompt: int = 0, completion: int = 0) -> Usage:
    """OpenAI token counts from an Anthropic ``usage`` (cached input counts as prompt)."""
    if isinstance(usage, dict):
        read = sum(
            usage.get(k) or 0 for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        prompt = read or prompt
        completion = usage.get("output_tokens") or completion
    return Usage(prompt, completion, prompt + completion)


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def chat_completion(message: dict[str, Any], cid: str, created: int, model: str, structured: bool) -> dict[str, Any]:
    """The chat completion for a Messages API answer."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    finish = FINISH_REASONS.get(message.get("stop_reason") or "", "stop")
    for block in message.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            text.append(block.get("text", ""))
        elif kind == "tool_use" and structured and block.get("name") == STRUCTURED_TOOL:
            text.append(codec.encode(block.get("input", {})).decode())
            finish = "stop"
        elif kind == "tool_use":
            arguments = codec.encode(block.get("input", {})).decode()
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None, "refusal": None}
    if calls:
        reply["tool_calls"] = calls
    usage = usage_of(message.get("usage"))
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}],
        "usage": usage_dict(usage),
        "system_fingerprint": None,
    }


class StreamTranslator:
    """Anthropic stream events in, OpenAI SSE chunks out (bytes, ``[DONE]`` at the end).

    Each text block's deltas become ``content`` deltas; each ``tool_use`` block becomes one
    tool call (its id and name first, then its ``input_json_delta`` pieces as ``arguments``);
    the forced structured-output tool's JSON becomes ``content``. ``message_delta`` gives the
    finish reason, ``message_stop`` the usage chunk (when asked) and ``[DONE]``."""

    def __init__(self, cid: str, created: int, model: str, *, include_usage: bool, structured: bool) -> None:
        self.base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self.include_usage = include_usage
        self.structured = structured
        self.blocks: dict[int, tuple[str, int]] = {}  # Anthropic block index -> (kind, tool call index)
        self.tool_calls = 0
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.done = False
        self.error: tuple[int, str] | None = None

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = dict(self.base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def feed(self, event: str, data: dict[str, Any]) -> tuple[bytes, dict[str, Any] | None]:
        """The client's bytes for one event, and the delta it carried (for the transcript)."""
        kind = data.get("type", event)
        if kind == "message_start":
            message = data.get("message") or {}
            self.usage = usage_of(message.get("usage"))
            return self._chunk({"role": "assistant", "content": ""}), None
        if kind == "content_block_start":
            return self._block_start(data.get("index", 0), data.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(data.get("index", 0), data.get("delta") or {})
        if kind == "message_delta":
            delta = data.get("delta") or {}
            self.usage = usage_of(data.get("usage"), self.usage.prompt_tokens, self.usage.completion_tokens)
            if delta.get("stop_reason"):
                finish = FINISH_REASONS.get(delta["stop_reason"], "stop")
                if finish == "tool_calls" and self.structured and not self.tool_calls:
                    finish = "stop"  # only the structured answer was "called"
                self.finish_reason = finish
                return self._chunk({}, finish), None
            return b"", None
        if kind == "message_stop":
            self.done = True
            out = sse(dict(self.base, choices=[], usage=usage_dict(self.usage))) if self.include_usage else b""
            return out + SSE_DONE, None
        if kind == "error":
            error = data.get("error") or {}
            status = ERROR_STATUS.get(error.get("type", ""), 502)
            message = f"anthropic: {error.get('message') or 'stream error'}"
            self.error = (status, message)
            body = ApiError(status, message, type=error.get("type") or "server_error", code="provider_error").body()
            return sse(body) + SSE_DONE, None
        return b"", None  # ping, and event types newer than this code

    def _block_start(self, index: int, block: dict[str, Any]) -> tuple[bytes, dict[str, Any] | None]:
        kind = block.get("type")
        if kind == "text":
            self.blocks[index] = ("text", -1)
            text = block.get("text") or ""
            return (self._chunk({"content": text}), {"content": text}) if text else (b"", None)
        if kind == "tool_use" and self.structured and block.get("name") == STRUCTURED_TOOL:
            self.blocks[index] = ("structured", -1)
            return b"", None
        if kind == "tool_use":
            call = self.tool_calls
            self.tool_calls += 1
            self.blocks[index] = ("tool", call)
            start = {
                "index": call,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return self._chunk({"tool_calls": [start]}), {"tool_calls": [start]}
        self.blocks[index] = ("other", -1)  # thinking and server-side tool blocks are not relayed
        return b"", None

    def _block_delta(self, index: int, delta: dict[str, Any]) -> tuple[bytes, dict[str, Any] | None]:
        kind, call = self.blocks.get(index, ("other", -1))
        if delta.get("type") == "text_delta" and kind == "text":
            out = {"content": delta.get("text", "")}
        elif delta.get("type") == "input_json_delta" and kind == "structured":
            out = {"content": delta.get("partial_json", "")}
        elif delta.get("type") == "input_json_delta" and kind == "tool":
            out = {"tool_calls": [{"index": call, "function": {"arguments": delta.get("partial_json", "")}}]}
        else:
            return b"", None
        return self._chunk(out), out
