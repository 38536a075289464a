"""Structured outputs for the exllamav2 runtime: a JSON Schema as an exllamav2 generation filter.

exllamav2 constrains sampling through filters (``ExLlamaV2Filter``: ``begin``, ``feed``,
``next`` returning the allowed token ids). Its own filters only force a prefix or a choice of
strings, so a JSON Schema goes through lm-format-enforcer's ``JsonSchemaParser`` and
``TokenEnforcer`` (the wrapper exllamav2's ``examples/inference_lmfe_wrapper.py`` shows),
installed with the ``exl2`` extra. Only ``response_format`` (``json_object``, ``json_schema``)
is constrained this way; forced tool calls are not (see :func:`refusal`).

UNVERIFIED ON A GPU: written against exllamav2 0.3.2's filter API and lm-format-enforcer's
exllamav2 integration, read from their sources; no CUDA machine has run it yet.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any

from events.openai import ChatCompletionBody

from .base import EngineError
from .chat_inputs import answer_schema

_tokenizer_data: dict[int, Any] = {}  # id(tokenizer) -> lm-format-enforcer's vocabulary tables
_tokenizer_lock = threading.Lock()


def refusal(body: ChatCompletionBody) -> EngineError | None:
    """What this runtime cannot do for ``body``, as the 400 the client gets, or None."""
    mode = body.tool_mode
    if mode in ("required", "named"):
        return EngineError(
            "tool_choice 'required' or a named function is not supported by the exllamav2 runtime "
            "(it cannot force a call's format); use tool_choice 'auto', or a GGUF model on llama.cpp.",
            param="tool_choice",
            code="unsupported_parameter",
        )
    if mode == "auto" and answer_schema(body) is not False:
        return EngineError(
            "'response_format' together with tools is not supported by the exllamav2 runtime.",
            param="response_format",
            code="unsupported_parameter",
        )
    if body.logprobs:
        return EngineError(
            "'logprobs' is not supported by the exllamav2 runtime.", param="logprobs", code="unsupported_parameter"
        )
    if answer_schema(body) is not False and importlib.util.find_spec("lmformatenforcer") is None:
        return EngineError(
            "'response_format' needs lm-format-enforcer on this node (pip install 'llm-router[exl2]').",
            param="response_format",
            code="unsupported_parameter",
        )
    return None


def json_filters(model: Any, tokenizer: Any, schema: dict[str, Any] | None) -> list[Any]:
    """Filters that allow only one JSON value valid against ``schema`` (None: any JSON object)."""
    from exllamav2.generator.filters import ExLlamaV2Filter, ExLlamaV2PrefixFilter
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer

    try:
        parser = JsonSchemaParser(schema if schema is not None else {"type": "object"})
    except Exception as exc:  # lm-format-enforcer's own refusal of a schema it cannot follow
        raise EngineError(f"the JSON Schema cannot be enforced: {exc}", param="response_format") from None

    class SchemaFilter(ExLlamaV2Filter):
        """lm-format-enforcer's allowed tokens after the tokens sampled so far."""

        def __init__(self) -> None:
            super().__init__(model, tokenizer)
            self.enforcer = TokenEnforcer(_data(tokenizer), parser)
            self.sequence: list[int] = []

        def begin(self, prefix_str: str) -> None:
            self.sequence = []

        def feed(self, token: Any) -> None:
            self.sequence.append(int(token[0][0]))

        def next(self) -> tuple[list[int], list[int]]:
            return sorted(self.enforcer.get_allowed_tokens(self.sequence)), []

        def use_background_worker(self) -> bool:
            return True  # CPU work: overlapped with the forward pass

    filters: list[Any] = [SchemaFilter()]
    if schema is None or schema.get("type") == "object":  # start at once, not after free whitespace
        filters.append(ExLlamaV2PrefixFilter(model, tokenizer, ["{", " {"]))
    return filters


def _data(tokenizer: Any) -> Any:
    """lm-format-enforcer's tables of a vocabulary, built once per tokenizer (seconds for 128k tokens)."""
    from lmformatenforcer.integrations.exllamav2 import build_token_enforcer_tokenizer_data

    with _tokenizer_lock:
        data = _tokenizer_data.get(id(tokenizer))
        if data is None:
            data = _tokenizer_data[id(tokenizer)] = build_token_enforcer_tokenizer_data(tokenizer)
        return data
