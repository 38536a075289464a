"""OpenAI request bodies as msgspec Structs: the gateway validates HTTP input with them and
forwards the same objects to nodes inside :class:`events.messages.InferenceRequest`.

Unknown fields are accepted and ignored (clients send many optional ones); known fields are
type- and range-checked so that bad input fails at the gateway with the offending ``param``.
Known fields that would change the answer but are not supported are declared too, so that a
request using one is refused (:class:`Unsupported`, a 400 ``unsupported_parameter``) rather
than answered as if it had not been sent. Cross-field rules run in ``__post_init__``, which
msgspec calls while decoding.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .json_schema import unenforceable
from .messages import Attachment

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
ModelName = Annotated[str, Meta(min_length=1)]
NonEmpty = Annotated[str, Meta(min_length=1)]
# Token ids (decimal strings, as JSON keys must be) to a bias; OpenAI's range.
LogitBias = dict[Annotated[str, Meta(pattern=r"^[0-9]+$")], Annotated[float, Meta(ge=-100.0, le=100.0)]]

MAX_CHOICES = 8  # n: choices are generated one after another in one slot
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 64
MAX_STOP = 4  # stop sequences, as OpenAI allows
FunctionName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Choices = Annotated[int, Meta(ge=1, le=MAX_CHOICES)]
TopLogprobs = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]
Stop = str | Annotated[list[str], Meta(max_length=MAX_STOP)]


class Unsupported(Exception):
    """A request field the router cannot honour (raised while decoding; the gateway answers 400
    with ``param`` and ``code``). Not a ValueError, so msgspec passes it on unchanged."""

    def __init__(self, message: str, param: str, code: str = "unsupported_parameter") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _refuse_set(body: Struct, names: tuple[str, ...], what: str) -> None:
    for name in names:
        if getattr(body, name) is not None:
            raise Unsupported(f"'{name}' is not supported {what}; leave it out.", name)


class StreamOptions(Struct, omit_defaults=True):
    include_usage: bool = False


class FunctionCall(Struct):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(Struct, kw_only=True):
    """A call an earlier assistant message made (fed back to the model with its result)."""

    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # A string, or a list of content parts ({"type": "text", "text": ...}, image_url, ...).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[MessageToolCall] | None = None


class FunctionDefinition(Struct, omit_defaults=True, kw_only=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of an object; None: no arguments
    strict: bool | None = None  # accepted; arguments are grammar-constrained whenever a call is forced


class Tool(Struct, omit_defaults=True, kw_only=True):
    function: FunctionDefinition
    type: Literal["function"] = "function"

    @property
    def schema(self) -> dict[str, Any]:
        return self.function.parameters or {"type": "object", "properties": {}}


class NamedFunction(Struct):
    name: FunctionName


class NamedToolChoice(Struct, kw_only=True):
    function: NamedFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class TextFormat(Struct, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(Struct, tag_field="type", tag="json_object"):
    pass


class JsonSchemaSpec(Struct, omit_defaults=True, kw_only=True):
    name: FunctionName
    description: str | None = None
    schema: dict[str, Any] | None = None  # None: any JSON object
    strict: bool | None = None  # accepted; the schema is always enforced


class JsonSchemaFormat(Struct, tag_field="type", tag="json_schema"):
    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


def _check_schema(schema: dict[str, Any], param: str, where: str) -> None:
    problem = unenforceable(schema)
    if problem:
        raise Unsupported(
            f"The JSON Schema of {where} cannot be enforced: {problem}. Outputs are constrained by a grammar, "
            "and the router refuses a schema it could not hold the output to.",
            param,
            "unsupported_schema",
        )


class SamplingParams(Struct, omit_defaults=True, kw_only=True):
    """Fields shared by chat and text completions."""

    model: ModelName
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    user: str | None = None
    # Extensions llama.cpp and vLLM servers accept (samplers of their own).
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: TopP | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


CHAT_UNSUPPORTED = (
    "audio",
    "prediction",
    "web_search_options",
    "functions",
    "function_call",
    "reasoning_effort",
    "verbosity",
)


class ChatCompletionBody(SamplingParams, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    modalities: list[str] | None = None  # only ["text"]
    # Declared to be refused (see CHAT_UNSUPPORTED): each changes what the model returns.
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None  # the deprecated form of tools
    function_call: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    def __post_init__(self) -> None:
        # Plain chats (nearly all requests) set none of these: one chain of checks, on the gateway and node.
        if (
            self.tools is None
            and self.tool_choice is None
            and self.response_format is None
            and self.top_logprobs is None
            and self.modalities is None
            and self.audio is None
            and self.prediction is None
            and self.web_search_options is None
            and self.functions is None
            and self.function_call is None
            and self.reasoning_effort is None
            and self.verbosity is None
        ):
            return
        self._check()

    def _check(self) -> None:
        _refuse_set(self, CHAT_UNSUPPORTED, "by this router's chat completions")
        if self.modalities is not None and self.modalities != ["text"]:
            raise Unsupported("Only text output is supported: 'modalities' may only be [\"text\"].", "modalities")
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("'top_logprobs' needs 'logprobs': true.", "top_logprobs", "invalid_value")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise Unsupported("Two tools have the same function name.", "tools", "invalid_value")
        for i, tool in enumerate(self.tools or []):
            schema = tool.schema
            if schema.get("type", "object") != "object":
                raise Unsupported(f"tools[{i}].function.parameters must describe an object.", "tools", "invalid_value")
            _check_schema(schema, "tools", f"tools[{i}] ({tool.function.name})")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise Unsupported("'tool_choice' needs 'tools'.", "tool_choice", "invalid_value")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise Unsupported(
                f"'tool_choice' names the function '{choice.function.name}', which is not in 'tools'.",
                "tool_choice",
                "invalid_value",
            )
        if isinstance(self.response_format, JsonSchemaFormat) and self.response_format.json_schema.schema is not None:
            _check_schema(self.response_format.json_schema.schema, "response_format", "response_format")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def tool_mode(self) -> str:
        """none, auto, required, or "named" (tool_choice names one function)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def shaping_field(self) -> str | None:
        """The first field that makes the answer more than plain text (tools, a response
        format, logprobs, several choices), or None."""
        if self.tools:
            return "tools"
        if self.response_format is not None and not isinstance(self.response_format, TextFormat):
            return "response_format"
        if self.logprobs:
            return "logprobs"
        return "n" if self.n > 1 else None

    @property
    def shapes_output(self) -> bool:
        return self.shaping_field is not None


class CompletionBody(SamplingParams, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]  # one prompt: no batches
    echo: bool = False
    suffix: str | None = None  # declared to be refused: no infill
    logprobs: TopLogprobs | None = None  # alternatives per token, 0-20 (OpenAI allows 5)
    best_of: Annotated[int, Meta(ge=1)] | None = None

    def __post_init__(self) -> None:
        _refuse_set(self, ("suffix",), "(no fill-in-the-middle)")
        if self.best_of is not None and self.best_of != self.n:
            raise Unsupported("'best_of' is not supported (only best_of equal to n); leave it out.", "best_of")
        if self.echo and self.logprobs is not None:
            raise Unsupported("'logprobs' with 'echo' (logprobs of the prompt) is not supported.", "echo")

    @property
    def token_limit(self) -> int:
        # OpenAI's legacy completions default to 16 tokens.
        return self.max_tokens or 16

    @property
    def shapes_output(self) -> bool:
        """Whether the answer is more than one plain text: logprobs or several choices."""
        return self.logprobs is not None or self.n > 1

    @property
    def text_prompt(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingBody(Struct, omit_defaults=True, kw_only=True):
    model: ModelName
    input: NonEmpty | Annotated[list[NonEmpty], Meta(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ---------------------------------------------------------------- images, audio
#
# Image and audio bodies follow the OpenAI API reference. Multipart endpoints (image edits and
# variations, transcriptions) are converted by the gateway from form fields into these Structs,
# with each uploaded file as an Attachment (claim check), so nodes see one shape per operation.

NonBlank = Annotated[str, Meta(pattern=r"\S")]
ImageCount = Annotated[int, Meta(ge=1, le=10)]
ImageSize = Annotated[str, Meta(pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$")]
ImageFormat = Literal["b64_json", "url"]


class _ImageOptions(Struct, omit_defaults=True, kw_only=True):
    model: ModelName
    n: ImageCount = 1
    size: ImageSize | None = None  # "WIDTHxHEIGHT"; None or "auto": the model's (or source image's) size
    response_format: ImageFormat = "url"
    seed: int | None = None  # extension: reproducible images
    steps: PositiveInt | None = None  # extension: denoising steps
    user: str | None = None

    @property
    def dimensions(self) -> tuple[int, int] | None:
        if self.size is None or self.size == "auto":
            return None
        width, height = self.size.split("x")
        return int(width), int(height)


class ImageGenerationBody(_ImageOptions, kw_only=True, tag_field="operation", tag="generate"):
    """``POST /v1/images/generations`` (JSON)."""

    prompt: NonBlank
    negative_prompt: str | None = None  # extension


class ImageEditBody(_ImageOptions, kw_only=True, tag_field="operation", tag="edit"):
    """``POST /v1/images/edits`` (multipart: image, optional mask, prompt)."""

    prompt: NonBlank
    image: Attachment
    mask: Attachment | None = None


class ImageVariationBody(_ImageOptions, kw_only=True, tag_field="operation", tag="variation"):
    """``POST /v1/images/variations`` (multipart: image)."""

    image: Attachment


ImageBody = ImageGenerationBody | ImageEditBody | ImageVariationBody

TranscriptFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
TRANSCRIPT_CONTENT_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "text/plain; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


class TranscriptionBody(Struct, omit_defaults=True, kw_only=True):
    """``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` (multipart: file).

    The capability (transcription or translation) says which task; translations ignore
    ``language`` (the output is English).
    """

    model: ModelName
    file: Attachment
    language: str | None = None
    prompt: str | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    response_format: TranscriptFormat = "json"
    timestamp_granularities: list[Literal["word", "segment"]] = msgspec.field(default_factory=lambda: ["segment"])


SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
SPEECH_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


class SpeechBody(Struct, omit_defaults=True, kw_only=True):
    """``POST /v1/audio/speech`` (JSON); the answer is the audio file itself."""

    model: ModelName
    input: Annotated[str, Meta(pattern=r"\S", max_length=4096)]
    voice: str | None = None  # a speaker of a multi-speaker voice; otherwise the model is the voice
    response_format: SpeechFormat = "mp3"
    speed: Annotated[float, Meta(ge=0.25, le=4.0)] = 1.0
    instructions: str | None = None  # accepted for compatibility; Piper voices have no style control


def has_image_parts(body: ChatCompletionBody) -> bool:
    """Whether any chat message carries an ``image_url`` content part (a vision request)."""
    for message in body.messages:  # a loop, not nested generators: it runs on every chat request
        content = message.content
        if content.__class__ is list:
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image_url", "input_image"):
                    return True
    return False


def validation_param(error: msgspec.ValidationError) -> str | None:
    """The top-level field a msgspec validation error points at (``$.messages[0].role`` -> ``messages``;
    a dict key's error reads "at `key` in `$.logit_bias`")."""
    text = str(error)
    path = re.search(r"`\$\.([^`.\[]+)", text)
    if path:
        return path.group(1)
    missing = re.search(r"missing required field `([^`]+)`", text)
    return missing.group(1) if missing else None


# What a llama.cpp model's text chats and completions offer beyond plain text (``/v1/models``
# ``features``; docs/openai.md). Chats with images go through the LLaVA handler, which has none.
TEXT_FEATURES = ("tools", "json_object", "json_schema", "logprobs", "n", "seed", "stop")


def model_features(capabilities: list[str]) -> list[str]:
    if "vision" in capabilities or not ({"chat", "completion"} & set(capabilities)):
        return []
    return list(TEXT_FEATURES)
