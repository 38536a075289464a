"""What the local chat engines (llama.cpp, exllamav2) read from a chat body the same way: its
messages and tools as their chat template takes them, and the JSON Schema its answer must
follow. Each engine then applies them its own way (a grammar, a generation filter)."""

from __future__ import annotations

from typing import Any

from events.openai import ChatCompletionBody, JsonObjectFormat, JsonSchemaFormat

from .base import EngineError
from .tool_calls import CallFormat, prompt_messages, template_tools, with_tools_prompt


def text_message(message: Any) -> dict[str, Any]:
    """A chat message as a chat template takes it: text parts joined into one string; a part of
    any other type is refused with a 400 (the engine has no way to read it)."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text":
                raise EngineError(
                    f"this model does not accept content parts of type {part.get('type')!r}", param="messages"
                )
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    out: dict[str, Any] = {"role": message.role, "content": content or ""}
    if message.name:
        out["name"] = message.name
    return out


def template_inputs(
    body: ChatCompletionBody, form: CallFormat, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the tools for the chat template (of call format ``form``; ``native``: it
    renders tools and earlier calls itself). A template that does not gets the tools written
    into the messages and None; so does every template when the chat offers no tools."""
    mode, tools = body.tool_mode, body.tools or []
    messages = prompt_messages([text_message(m) for m in body.messages], body.messages, form, native)
    if mode != "none" and not native:
        return with_tools_prompt(messages, tools), None
    return messages, template_tools(tools) if mode != "none" else None


def answer_schema(body: ChatCompletionBody) -> dict[str, Any] | None | bool:
    """The JSON Schema the answer must follow (None: any JSON object), False for free text."""
    form = body.response_format
    if isinstance(form, JsonSchemaFormat):
        return form.json_schema.schema
    if isinstance(form, JsonObjectFormat):
        return None
    return False
