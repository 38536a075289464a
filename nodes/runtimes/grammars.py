"""llama.cpp grammars (GBNF) for structured outputs and forced tool calls.

A JSON Schema becomes grammar rules through llama-cpp-python's converter
(``llama_cpp.llama_grammar.SchemaConverter``); the gateway has already refused schemas with
keywords the converter would ignore (events/json_schema.py). Tool calls are the converter's
rules for each function's parameters inside the literal text of the model family's call format
(nodes/runtimes/tool_calls.py), so the model can only write a call to one of the tools whose
arguments match that tool's schema.
"""

from __future__ import annotations

import json
from typing import Any

from events.openai import Tool

from .base import EngineError
from .tool_calls import CallFormat

# The converter's string character admits raw control characters, which JSON forbids in
# strings (json.loads refuses them): the same rule without them, as llama.cpp's own has.
_CHAR_LOOSE = 'char ::= [^"\\\\] |'
_CHAR_STRICT = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


class _Rules:
    """One converter: every schema visited adds its rules under its own prefix."""

    def __init__(self) -> None:
        from llama_cpp.llama_grammar import SchemaConverter

        self.converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def schema(self, schema: dict[str, Any], name: str, param: str) -> str:
        """The rule name of ``schema``; refs resolve within it (``name`` namespaces them)."""
        try:
            resolved = self.converter.resolve_refs(json.loads(json.dumps(schema)), name)
            return self.converter.visit(resolved, name)
        except Exception as exc:  # the converter's asserts and lookups: each says what in the schema failed
            raise EngineError(f"the JSON Schema cannot be turned into a grammar: {exc}", param=param) from None

    def literal(self, text: str) -> str:
        return self.converter._format_literal(text)

    def add(self, name: str, rule: str) -> str:
        return self.converter._add_rule(name, rule)

    def text(self) -> str:
        grammar = self.converter.format_grammar()
        return grammar.replace(_CHAR_LOOSE, _CHAR_STRICT)


def json_grammar(schema: dict[str, Any] | None, param: str = "response_format") -> str:
    """Output that is one JSON value valid against ``schema`` (None: any JSON object)."""
    rules = _Rules()
    rules.schema(schema if schema is not None else {"type": "object"}, "", param)
    return rules.text()


def _calls_rule(rules: _Rules, tools: list[Tool], form: CallFormat, *, named: str | None, parallel: int) -> str:
    """The rule for one or more calls (at most ``parallel``) in ``form``."""
    alternatives = []
    for i, tool in enumerate(tools):
        if named is not None and tool.function.name != named:
            continue
        arguments = rules.schema(tool.schema, f"tool{i}-args", "tools")
        opening, closing = form.wrap(tool.function.name)
        alternatives.append(
            rules.add(f"tool{i}-call", f"{rules.literal(opening)} {arguments} {rules.literal(closing)}")
        )
    call = rules.add("call", " | ".join(alternatives))
    more = max(0, parallel - 1)
    if more == 0:
        return call
    separator = rules.literal(form.separator)
    return rules.add("calls", call + "".join(f" ({separator} {call}" for _ in range(more)) + ")?" * more)


def tool_grammar(
    tools: list[Tool],
    form: CallFormat,
    *,
    named: str | None = None,
    parallel: int = 1,
    otherwise: dict[str, Any] | None | bool = False,
) -> str:
    """Output that is one or more calls to ``tools`` (only ``named`` when given). ``otherwise``:
    a JSON Schema (or None: any object) the output may follow instead of calling (a response
    format alongside ``tool_choice: auto``); False: it must call."""
    rules = _Rules()
    calls = _calls_rule(rules, tools, form, named=named, parallel=parallel)
    if otherwise is False:
        rules.add("root", calls)
    else:
        answer = rules.schema(
            otherwise if isinstance(otherwise, dict) else {"type": "object"}, "answer", "response_format"
        )
        rules.add("root", f"{calls} | {answer}")
    return rules.text()
