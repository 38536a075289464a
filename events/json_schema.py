"""Which JSON Schemas a grammar can enforce, checked before anything is generated.

Structured outputs and forced tool calls turn a JSON Schema into a llama.cpp grammar
(nodes/runtimes/grammars.py, through llama-cpp-python's converter). The converter enforces
some keywords and silently ignores the rest, so a schema with one it ignores would give text
that parses but does not validate. :func:`unenforceable` names the first such keyword, so the
gateway refuses the request (400) instead; it needs no llama.cpp, and bounds the schema's size.

Each schema node is read the way the converter reads it (``$ref``, then ``anyOf``, a type list,
``const``, ``enum``, an object's properties, an array's items, a string's pattern, format or
length), and may hold only the keywords that reading enforces, plus annotations.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 16
MAX_NODES = 2000
MAX_ENUM = 500

ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated"})
DEFINITIONS = ("$defs", "definitions")
TYPES = frozenset({"string", "number", "integer", "boolean", "null", "array", "object"})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})


class _Walk:
    def __init__(self, root: dict) -> None:
        self.root = root
        self.nodes = 0

    def refuse(self, path: str, message: str) -> str:
        return f"{message} at {path}"

    def check(self, schema: Any, path: str, depth: int) -> str | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            return f"the schema has more than {MAX_NODES} subschemas"
        if depth > MAX_DEPTH:
            return self.refuse(path, f"the schema nests deeper than {MAX_DEPTH} levels")
        if not isinstance(schema, dict):
            return self.refuse(path, "a subschema must be a JSON object")
        for key in DEFINITIONS:
            if key in schema:
                defs = schema[key]
                if not isinstance(defs, dict):
                    return self.refuse(f"{path}.{key}", f"'{key}' must be an object")
                for name, sub in defs.items():
                    if error := self.check(sub, f"{path}.{key}.{name}", depth + 1):
                        return error
        keys = {k for k in schema if k not in ANNOTATIONS and k not in DEFINITIONS}
        allowed, children = self._reading(schema, path)
        if isinstance(allowed, str):
            return allowed  # a refusal
        extra = sorted(keys - allowed)
        if extra:
            return self.refuse(path, f"the keyword '{extra[0]}' cannot be enforced here")
        for child_path, child in children:
            if error := self.check(child, child_path, depth + 1):
                return error
        return None

    def _reading(self, schema: dict, path: str) -> tuple[set[str] | str, list[tuple[str, Any]]]:
        """The keywords the converter enforces for this node, and the subschemas to check."""
        kind = schema.get("type")
        if "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#/"):
                return self.refuse(path, "only local '$ref's ('#/...') are supported"), []
            target: Any = self.root
            for part in ref[2:].split("/"):
                if not isinstance(target, dict) or part not in target:
                    return self.refuse(path, f"the '$ref' {ref!r} points nowhere"), []
                target = target[part]
            return {"$ref"}, []  # the target is checked where it is defined
        if "oneOf" in schema:
            return self.refuse(path, "the keyword 'oneOf' cannot be enforced (use 'anyOf')"), []
        if "allOf" in schema:
            return self.refuse(path, "the keyword 'allOf' cannot be enforced"), []
        if "anyOf" in schema:
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                return self.refuse(path, "'anyOf' must be a non-empty list"), []
            return {"anyOf"}, [(f"{path}.anyOf[{i}]", option) for i, option in enumerate(options)]
        if isinstance(kind, list):
            if not kind or any(k not in TYPES for k in kind):
                return self.refuse(path, f"unknown type in {kind!r}"), []
            return {"type"}, []
        if kind is not None and kind not in TYPES:
            return self.refuse(path, f"unknown type {kind!r}"), []
        if "const" in schema:
            return {"const", "type"}, []
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values or len(values) > MAX_ENUM:
                return self.refuse(path, f"'enum' must list 1 to {MAX_ENUM} values"), []
            return {"enum", "type"}, []
        additional = schema.get("additionalProperties")
        if kind in (None, "object") and (
            "properties" in schema or ("additionalProperties" in schema and additional is not True)
        ):
            properties = schema.get("properties", {})
            if not isinstance(properties, dict):
                return self.refuse(path, "'properties' must be an object"), []
            required = schema.get("required", [])
            if not isinstance(required, list) or any(name not in properties for name in required):
                missing = [name for name in required if name not in properties] if isinstance(required, list) else []
                return self.refuse(path, f"'required' names {missing[:1] or 'something'} not in 'properties'"), []
            children = [(f"{path}.properties.{name}", sub) for name, sub in properties.items()]
            if isinstance(additional, dict):
                children.append((f"{path}.additionalProperties", additional))
            elif additional not in (None, True, False):
                return self.refuse(path, "'additionalProperties' must be a boolean or a schema"), []
            return {"type", "properties", "required", "additionalProperties"}, children
        if kind in (None, "array") and ("items" in schema or "prefixItems" in schema):
            items = schema.get("items") if "items" in schema else schema["prefixItems"]
            if isinstance(items, list):  # a tuple: exactly these items
                return {"type", "items", "prefixItems"}, [(f"{path}.items[{i}]", s) for i, s in enumerate(items)]
            if "prefixItems" in schema:
                return self.refuse(path, "'prefixItems' with 'items' cannot be enforced"), []
            low, high = schema.get("minItems", 0), schema.get("maxItems")
            if not isinstance(low, int) or (high is not None and (not isinstance(high, int) or high < low)):
                return self.refuse(path, "'minItems'/'maxItems' must be integers, min <= max"), []
            return {"type", "items", "minItems", "maxItems"}, [(f"{path}.items", items)]
        if kind in (None, "string") and "pattern" in schema:
            return {"type", "pattern"}, []
        if kind in (None, "string") and "format" in schema:
            if schema["format"] not in FORMATS:
                return self.refuse(path, f"the format {schema['format']!r} cannot be enforced"), []
            return {"type", "format"}, []
        if kind == "string" and ("minLength" in schema or "maxLength" in schema):
            low, high = schema.get("minLength", 0), schema.get("maxLength")
            if not isinstance(low, int) or (high is not None and (not isinstance(high, int) or high < low)):
                return self.refuse(path, "'minLength'/'maxLength' must be integers, min <= max"), []
            return {"type", "minLength", "maxLength"}, []
        if kind == "object" or kind is None:
            return {"type", "additionalProperties"}, []  # any object / any value
        return {"type"}, []


def unenforceable(schema: Any) -> str | None:
    """Why a grammar cannot enforce ``schema`` (the first keyword it would ignore, with its
    path), or None when every keyword in it is enforced."""
    if not isinstance(schema, dict):
        return "the schema must be a JSON object"
    return _Walk(schema).check(schema, "$", 0)
