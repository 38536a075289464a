"""The OpenAI Responses API's request body (``POST /v1/responses``) as msgspec Structs, and its
translation into the chat body the nodes already serve.

A Responses request is a chat in other words: ``input`` items (messages with ``input_text`` and
``input_image`` parts, earlier ``function_call`` items and their ``function_call_output``),
``instructions`` as a system message, flat function tools, ``text.format`` for structured output.
:func:`chat_body` turns it into a :class:`~events.openai.ChatCompletionBody`, so tools,
grammars and logprobs work exactly as in chat completions, on the same nodes.

As in :mod:`events.openai`, unknown fields are ignored, and a known field that would change the
answer but cannot be honoured (background runs, reasoning, built-in tools, server-side prompts
and conversations, ...) is refused with :class:`~events.openai.Unsupported` (400
``unsupported_parameter`` naming it). Message items may omit ``type`` (the SDK's "easy" input
messages), so items are one flat Struct checked per type in ``__post_init__`` rather than a
tagged union.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .json_schema import unenforceable
from .openai import (
    MAX_TOOLS,
    ChatCompletionBody,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    FunctionName,
    JsonObjectFormat,
    JsonSchemaFormat,
    JsonSchemaSpec,
    MessageToolCall,
    ModelName,
    NamedFunction,
    NamedToolChoice,
    PositiveInt,
    Temperature,
    TextFormat,
    Tool,
    TopLogprobs,
    TopP,
    Unsupported,
)

MAX_INPUT_ITEMS = 2048  # items in one request's input (the stored conversation is bounded by bytes)
MAX_PARTS = 256  # content parts of one message
MAX_METADATA = 16  # OpenAI's limits: 16 pairs, keys of 64 characters, values of 512
ResponseId = Annotated[str, Meta(min_length=1, max_length=64)]
CallId = Annotated[str, Meta(min_length=1, max_length=128)]
# The ids this router gives responses: "resp_" and 32 random hex digits.
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")

ITEM_TYPES = ("message", "function_call", "function_call_output")
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# ``include`` values that ask for nothing this router could leave out: there are no reasoning items.
HARMLESS_INCLUDES = frozenset({"reasoning.encrypted_content"})


class ContentPart(Struct, kw_only=True, omit_defaults=True):
    """A part of a message's content: text (``input_text``, or ``output_text`` of an earlier
    answer given back), an image by URL (``input_image``: a data: URL or an http(s) one)."""

    type: str
    text: str | None = None
    image_url: str | None = None
    detail: str | None = None
    file_id: str | None = None
    refusal: str | None = None

    def __post_init__(self) -> None:
        kind = self.type
        if kind in ("input_text", "output_text"):
            if self.text is None:
                raise ValueError(f"a '{kind}' part needs 'text'")
        elif kind == "input_image":
            if self.image_url is None:
                if self.file_id is not None:
                    raise Unsupported(
                        "Images by 'file_id' are not supported (there is no Files API): send 'image_url'.", "input"
                    )
                raise ValueError("an 'input_image' part needs 'image_url'")
        elif kind == "refusal":
            if self.refusal is None:
                raise ValueError("a 'refusal' part needs 'refusal'")
        else:
            raise Unsupported(
                f"Content parts of type '{kind}' are not supported (only input_text, input_image, output_text).",
                "input",
            )

    @property
    def plain(self) -> str:
        return self.refusal if self.type == "refusal" else self.text or ""


Parts = Annotated[list[ContentPart], Meta(max_length=MAX_PARTS)]


class InputItem(Struct, kw_only=True, omit_defaults=True):
    """One item of a conversation: a message, a function call the model made, or its output.
    Output items of an earlier response are valid input items (what ``previous_response_id``
    puts back into the conversation); their ids and statuses are ignored."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | Parts | None = None
    call_id: CallId | None = None
    name: FunctionName | None = None
    arguments: str | None = None
    output: str | Parts | None = None

    def __post_init__(self) -> None:
        kind = self.type
        if kind == "message":
            if self.role is None or self.content is None:
                raise ValueError("a message item needs 'role' and 'content'")
        elif kind == "function_call":
            if self.call_id is None or self.name is None or self.arguments is None:
                raise ValueError("a function_call item needs 'call_id', 'name' and 'arguments'")
        elif kind == "function_call_output":
            if self.call_id is None or self.output is None:
                raise ValueError("a function_call_output item needs 'call_id' and 'output'")
            if isinstance(self.output, list) and any(p.type not in ("input_text", "output_text") for p in self.output):
                raise Unsupported("A function_call_output may hold only text parts.", "input")
        else:
            raise Unsupported(
                f"Input items of type '{kind}' are not supported (only {', '.join(ITEM_TYPES)}).", "input"
            )


class FunctionToolSpec(Struct, kw_only=True, omit_defaults=True):
    """A Responses function tool: flat (``name`` beside ``type``), unlike a chat tool."""

    type: str
    name: FunctionName | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def __post_init__(self) -> None:
        if self.type != "function":
            raise Unsupported(
                f"Tools of type '{self.type}' are not supported: only function tools (built-in tools such as "
                "web_search, file_search or code_interpreter run on OpenAI's servers).",
                "tools",
            )
        if self.name is None:
            raise ValueError("a function tool needs a 'name'")

    def chat_tool(self) -> Tool:
        assert self.name is not None
        return Tool(
            function=FunctionDefinition(
                name=self.name, description=self.description, parameters=self.parameters, strict=self.strict
            )
        )


class ToolChoiceSpec(Struct, kw_only=True, omit_defaults=True):
    """A forced function: ``{"type": "function", "name": ...}``."""

    type: str
    name: FunctionName | None = None

    def __post_init__(self) -> None:
        if self.type != "function":
            raise Unsupported(
                f"'tool_choice' of type '{self.type}' is not supported (only none, auto, required or a function).",
                "tool_choice",
            )
        if self.name is None:
            raise ValueError("a function tool_choice needs a 'name'")


class TextFormatSpec(Struct, kw_only=True, omit_defaults=True):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` with its fields flat."""

    type: Literal["text", "json_object", "json_schema"]
    name: FunctionName | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None

    def __post_init__(self) -> None:
        if self.type != "json_schema":
            return
        if self.name is None or self.schema is None:
            raise ValueError("a json_schema format needs 'name' and 'schema'")
        problem = unenforceable(self.schema)
        if problem:
            raise Unsupported(
                f"The JSON Schema of text.format cannot be enforced: {problem}. Outputs are constrained by a "
                "grammar, and the router refuses a schema it could not hold the output to.",
                "text",
                "unsupported_schema",
            )

    def chat_format(self) -> TextFormat | JsonObjectFormat | JsonSchemaFormat:
        if self.type == "json_object":
            return JsonObjectFormat()
        if self.type == "json_schema":
            assert self.name is not None
            return JsonSchemaFormat(
                json_schema=JsonSchemaSpec(
                    name=self.name, description=self.description, schema=self.schema, strict=self.strict
                )
            )
        return TextFormat()


class TextConfig(Struct, kw_only=True, omit_defaults=True):
    format: TextFormatSpec | None = None
    verbosity: Any = None

    def __post_init__(self) -> None:
        if self.verbosity not in (None, "medium"):  # medium: the default, what every answer is
            raise Unsupported("'text.verbosity' is not supported; leave it out.", "text.verbosity")


class ReasoningSpec(Struct, kw_only=True, omit_defaults=True):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None

    def __post_init__(self) -> None:
        if self.effort not in (None, "none") or self.summary is not None or self.generate_summary is not None:
            raise Unsupported(
                "'reasoning' is not supported: the models here have no separate reasoning to configure.", "reasoning"
            )


# Declared to be refused whenever set: each changes what is answered, or how.
RESPONSES_UNSUPPORTED = ("background_options", "conversation", "prompt", "context_management", "max_tool_calls")


class ResponsesBody(Struct, kw_only=True, omit_defaults=True):
    """``POST /v1/responses``. ``store`` (default true) keeps the answer for ``GET`` and for a
    later request's ``previous_response_id``; ``store: false`` keeps nothing."""

    model: ModelName
    input: str | Annotated[list[InputItem], Meta(max_length=MAX_INPUT_ITEMS)] | None = None
    instructions: str | None = None
    previous_response_id: ResponseId | None = None
    store: bool = True
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to obfuscate here
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: TopLogprobs | None = None
    include: Annotated[list[str], Meta(max_length=16)] | None = None
    tools: Annotated[list[FunctionToolSpec], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceSpec | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningSpec | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    metadata: (
        Annotated[
            dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]],
            Meta(max_length=MAX_METADATA),
        ]
        | None
    ) = None
    user: str | None = None
    # Declared to be refused (RESPONSES_UNSUPPORTED).
    background_options: Any = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    max_tool_calls: Any = None

    def __post_init__(self) -> None:
        if self.background:
            raise Unsupported("'background' responses are not supported: ask without it (or stream).", "background")
        if self.truncation == "auto":
            raise Unsupported(
                "'truncation: auto' is not supported: a conversation longer than the model's context is refused.",
                "truncation",
            )
        for name in RESPONSES_UNSUPPORTED:
            if getattr(self, name) is not None:
                raise Unsupported(f"'{name}' is not supported by this router's Responses API; leave it out.", name)
        for value in self.include or []:
            if value != LOGPROBS_INCLUDE and value not in HARMLESS_INCLUDES:
                raise Unsupported(f"'include' of '{value}' is not supported (only '{LOGPROBS_INCLUDE}').", "include")
        names = [tool.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise Unsupported("Two tools have the same function name.", "tools", "invalid_value")
        for i, tool in enumerate(self.tools or []):
            schema = tool.parameters or {"type": "object", "properties": {}}
            if schema.get("type", "object") != "object":
                raise Unsupported(f"tools[{i}].parameters must describe an object.", "tools", "invalid_value")
            problem = unenforceable(schema)
            if problem:
                raise Unsupported(
                    f"The JSON Schema of tools[{i}] ({tool.name}) cannot be enforced: {problem}.",
                    "tools",
                    "unsupported_schema",
                )
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise Unsupported("'tool_choice' needs 'tools'.", "tool_choice", "invalid_value")
        if isinstance(choice, ToolChoiceSpec) and choice.name not in names:
            raise Unsupported(
                f"'tool_choice' names the function '{choice.name}', which is not in 'tools'.",
                "tool_choice",
                "invalid_value",
            )

    @property
    def items(self) -> list[InputItem]:
        """``input`` as items (a string is one user message)."""
        if self.input is None:
            return []
        if isinstance(self.input, str):
            return [InputItem(role="user", content=self.input)]
        return self.input

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or []) or self.top_logprobs is not None


class StoredResponse(Struct, kw_only=True):
    """A stored response: who may read it (the key or user that made it; None with keys off),
    the conversation that led to it, and the response object as ``GET`` returns it."""

    owner: str | None
    input: list[InputItem]
    response: msgspec.Raw


class _Output(Struct):
    output: list[InputItem]


def output_items(response: msgspec.Raw) -> list[InputItem]:
    """A stored response's output as input items (messages and function calls)."""
    return msgspec.json.decode(response, type=_Output).output


# ---------------------------------------------------------------- translation into a chat


def _content(parts: str | list[ContentPart]) -> str | list[dict[str, Any]]:
    if isinstance(parts, str):
        return parts
    out: list[dict[str, Any]] = []
    for part in parts:
        if part.type == "input_image":
            image: dict[str, Any] = {"url": part.image_url}
            if part.detail in ("low", "high", "auto"):
                image["detail"] = part.detail
            out.append({"type": "image_url", "image_url": image})
        else:
            out.append({"type": "text", "text": part.plain})
    return out


def _text(parts: str | list[ContentPart]) -> str:
    return parts if isinstance(parts, str) else "".join(part.plain for part in parts)


def chat_messages(items: list[InputItem], instructions: str | None) -> list[ChatMessage]:
    """The conversation as chat messages: function calls join the assistant message before them
    (or open one), their outputs become ``tool`` messages."""
    messages = [ChatMessage(role="system", content=instructions)] if instructions else []
    for item in items:
        if item.type == "message":
            assert item.role is not None and item.content is not None
            messages.append(ChatMessage(role=item.role, content=_content(item.content)))
        elif item.type == "function_call":
            assert item.call_id is not None and item.name is not None and item.arguments is not None
            call = MessageToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
                if isinstance(last.content, list) and not last.content:
                    last.content = None
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        else:
            assert item.output is not None
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=_text(item.output)))
    return messages


def chat_body(body: ResponsesBody, conversation: list[InputItem]) -> ChatCompletionBody:
    """The chat request a node runs for ``body``, whose whole conversation (earlier turns and
    this input) is ``conversation``."""
    messages = chat_messages(conversation, body.instructions)
    if not messages:
        raise Unsupported("'input' is required (there is nothing to answer).", "input", "invalid_value")
    choice = body.tool_choice
    logprobs = body.wants_logprobs
    return ChatCompletionBody(
        model=body.model,
        messages=messages,
        stream=body.stream,
        max_completion_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=[tool.chat_tool() for tool in body.tools] if body.tools else None,
        tool_choice=NamedToolChoice(function=NamedFunction(name=choice.name))
        if isinstance(choice, ToolChoiceSpec) and choice.name is not None
        else choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=body.text.format.chat_format() if body.text and body.text.format else None,
        logprobs=True if logprobs else None,
        top_logprobs=(body.top_logprobs or 0) if logprobs else None,
    )
