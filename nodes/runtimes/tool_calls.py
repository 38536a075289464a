"""Tool calls in the text a model writes: the call formats of the model families we serve,
tools and earlier calls put into the prompt, and calls read back out of the output.

Two formats are known. Hermes / Qwen (and every model whose chat template does not render
tools itself, which is told about them in a system message): each call is
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. Llama 3.x: one JSON object
``{"name": ..., "parameters": {...}}``. A forced call (``required`` or a named function) is
generated under a grammar in the model's format (nodes/runtimes/grammars.py), so
:class:`CallScanner` can split it into OpenAI's streamed fragments as it arrives. With ``auto``
the model writes freely; :func:`parse_calls` recognises either format at the end and anything
else stays plain content. Pure Python: no engine here.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from events.messages import ToolCall, ToolCallDelta
from events.openai import Tool

MAX_PARALLEL_CALLS = 4  # calls in one forced answer when parallel_tool_calls is on


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class CallFormat:
    name: str
    arguments_key: str
    opening: str  # before the call's JSON object
    closing: str  # after it
    separator: str  # between two calls
    parallel: bool  # whether the family writes several calls in one answer

    def wrap(self, function: str) -> tuple[str, str]:
        """The literal text around a call's arguments."""
        return f'{self.opening}{{"name": "{function}", "{self.arguments_key}": ', "}" + self.closing

    def render(self, name: str, arguments: str) -> str:
        """An earlier call, as the model would have written it (for templates that do not render calls)."""
        opening, closing = self.wrap(name)
        return opening + arguments + closing


HERMES = CallFormat("hermes", "arguments", "<tool_call>\n", "\n</tool_call>", "\n", True)
LLAMA3 = CallFormat("llama3", "parameters", "", "", "; ", False)


def template_format(template: str | None) -> tuple[CallFormat, bool]:
    """The call format of a chat template's family, and whether the template renders tools
    and earlier calls itself (else they go into the prompt as text, in the Hermes format)."""
    if template and "tools" in template:
        if "<tool_call>" in template:
            return HERMES, True
        if "<|python_tag|>" in template or "ipython" in template:
            return LLAMA3, True
    return HERMES, False


def tools_system_prompt(tools: list[Tool]) -> str:
    """Hermes' own tool prompt, for templates that do not render tools."""
    listed = "\n".join(json.dumps(_tool_dict(tool), ensure_ascii=False) for tool in tools)
    return (
        "You are a function calling AI model. You may call one or more functions to assist with the user query. "
        "Here are the available tools:\n<tools>\n"
        f"{listed}\n</tools>\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def _tool_dict(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.function.name, "parameters": tool.schema}
    if tool.function.description:
        function["description"] = tool.function.description
    return {"type": "function", "function": function}


def template_tools(tools: list[Tool]) -> list[dict[str, Any]]:
    return [_tool_dict(tool) for tool in tools]


def _arguments_value(arguments: str) -> Any:
    """Templates (as Hugging Face's) expect arguments as an object, not JSON text."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def prompt_messages(messages: list[dict[str, Any]], originals: list[Any], form: CallFormat, native: bool) -> list[dict]:
    """``messages`` (already converted for the template) with earlier tool calls and tool
    results in the shape the template expects: OpenAI's fields for a template that renders
    them, text in ``form`` otherwise (results as user messages in ``<tool_response>`` tags)."""
    out = []
    for message, original in zip(messages, originals, strict=True):
        calls = original.tool_calls or []
        if original.role == "assistant" and calls:
            if native:
                message = dict(message)
                message["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": _arguments_value(call.function.arguments),
                        },
                    }
                    for call in calls
                ]
            else:
                rendered = form.separator.join(form.render(c.function.name, c.function.arguments) for c in calls)
                text = message.get("content") or ""
                message = {"role": "assistant", "content": f"{text}\n{rendered}" if text else rendered}
        elif original.role == "tool":
            if native:
                message = dict(message)
                if original.tool_call_id:
                    message["tool_call_id"] = original.tool_call_id
            else:
                message = {
                    "role": "user",
                    "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>",
                }
        out.append(message)
    return out


def with_tools_prompt(messages: list[dict[str, Any]], tools: list[Tool]) -> list[dict[str, Any]]:
    """The tools' system prompt before the conversation (joined to a leading system message)."""
    prompt = tools_system_prompt(tools)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0], role="system", content=f"{messages[0].get('content') or ''}\n\n{prompt}".strip())
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


# ---------------------------------------------------------------- reading calls back


@dataclass
class _Call:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)

    def done(self) -> ToolCall:
        return ToolCall(id=self.id, name=self.name, arguments="".join(self.arguments))


class CallScanner:
    """Splits forced calls (text in a known :class:`CallFormat`, written under its grammar) into
    fragments as the text arrives: a call's id and name once its name is complete, then its
    arguments piece by piece. Fed the whole text at once it gives the same calls."""

    def __init__(self, form: CallFormat) -> None:
        self.name_key = '"name": "'
        self.arguments_key = f'"{form.arguments_key}": '
        self.state = "seek"
        self.buffer = ""
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.calls: list[_Call] = []

    def feed(self, text: str) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        piece: list[str] = []
        for char in text:
            if self.state == "args":
                piece.append(char)
                if self._closes(char):
                    self._flush(piece, out)
                    self.state, self.buffer = "seek", ""
                continue
            self.buffer += char
            if self.state == "seek" and self.buffer.endswith(self.name_key):
                self.state, self.buffer = "name", ""
            elif self.state == "name" and char == '"':
                call = _Call(call_id(), self.buffer[:-1])
                self.calls.append(call)
                out.append(ToolCallDelta(index=len(self.calls) - 1, id=call.id, name=call.name))
                self.state, self.buffer = "seek_args", ""
            elif self.state == "seek_args" and self.buffer.endswith(self.arguments_key):
                self.state, self.depth, self.in_string, self.escaped = "args", 0, False, False
        if self.state == "args":
            self._flush(piece, out)
        return out

    def _closes(self, char: str) -> bool:
        """Whether ``char`` ends the arguments' JSON value (strings and escapes skipped)."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
            return False
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            return self.depth == 0
        return False

    def _flush(self, piece: list[str], out: list[ToolCallDelta]) -> None:
        if piece and self.calls:
            text = "".join(piece)
            self.calls[-1].arguments.append(text)
            out.append(ToolCallDelta(index=len(self.calls) - 1, arguments=text))
        piece.clear()

    def result(self) -> list[ToolCall]:
        return [call.done() for call in self.calls]


_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
CALL_MARKERS = ("<tool_call>", "<|python_tag|>")


def _as_call(data: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=call_id(), name=data["name"], arguments=json.dumps(arguments, ensure_ascii=False))


def parse_calls(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """The calls in freely written ``text`` (Hermes ``<tool_call>`` blocks, or a Llama 3.x JSON
    call filling the answer) and the content around them; no calls when any part does not
    read as a call to one of ``names``, and then all the text is content."""
    blocks = list(_HERMES_BLOCK.finditer(text))
    if blocks:
        calls = []
        for block in blocks:
            try:
                call = _as_call(json.loads(block.group(1)), names)
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return _HERMES_BLOCK.sub("", text).strip(), calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if body.startswith("{"):
        try:
            call = _as_call(json.loads(body), names)
        except ValueError:
            call = None
        if call is not None:
            return "", [call]
    return text, []


class AutoSplitter:
    """Streams freely written text as content until a call may be starting (a marker, or a
    JSON object opening the answer), and holds the rest back for :func:`parse_calls`."""

    def __init__(self) -> None:
        self.seen = ""
        self.sent = 0
        self.holding = False

    def feed(self, text: str) -> str:
        """The content that is safe to send now."""
        self.seen += text
        if self.holding:
            return ""
        if not self.seen[self.sent :].strip() and not self.seen.strip():
            return ""  # nothing but whitespace yet: it may open a JSON call
        if self.seen.lstrip().startswith("{") and self.sent == 0:
            self.holding = True
            return ""
        for marker in CALL_MARKERS:
            at = self.seen.find(marker, self.sent)
            if at >= 0:
                self.holding = True
                return self._send(at)
        return self._send(len(self.seen) - _partial_marker(self.seen))

    def _send(self, end: int) -> str:
        out, self.sent = self.seen[self.sent : end], max(self.sent, end)
        return out

    def held(self) -> str:
        """What was held back (from the first possible call on)."""
        return self.seen[self.sent :]


def _partial_marker(text: str) -> int:
    """How many trailing characters of ``text`` could begin a call marker."""
    longest = 0
    for marker in CALL_MARKERS:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                longest = max(longest, size)
                break
    return longest
