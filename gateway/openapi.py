"""The gateway's HTTP API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

Request bodies come from the same msgspec Structs the handlers decode with
(:mod:`events.openai`, :mod:`events.messages`), so the document cannot drift from the
validation. Multipart endpoints are the same Structs with each :class:`Attachment` field as a
file part. ``OPERATIONS`` lists every route of :func:`gateway.app.build_app`; a test checks
that the two agree.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from broker.audit import MAX_ACTOR_CHARS
from events import subjects
from events.messages import (
    ChangePassword,
    CreateKey,
    CreateUser,
    DownloadModel,
    HfQuery,
    Login,
    RegisterModel,
    SetPassword,
)
from events.openai import (
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    ImageEditBody,
    ImageGenerationBody,
    ImageVariationBody,
    SpeechBody,
    TranscriptionBody,
)
from events.responses import ResponsesBody
from events.tokens import MAX_NAME_BYTES, MAX_USERNAME_CHARS, USERNAME_PATTERN

from . import audit_routes, history_query, history_routes, log_routes, query

REF = "#/components/schemas/{name}"
JSON_BODIES = [
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    ResponsesBody,
    ImageGenerationBody,
    SpeechBody,
    RegisterModel,
    DownloadModel,
    CreateKey,
    Login,
    ChangePassword,
    CreateUser,
    SetPassword,
]
MULTIPART_BODIES = {ImageEditBody: {"image", "mask"}, ImageVariationBody: {"image"}, TranscriptionBody: {"file"}}
# Form fields whose OpenAI name carries "[]" (repeated parts make a list; see media_routes._fields).
MULTIPART_ARRAYS = {"timestamp_granularities": "timestamp_granularities[]"}
TAG_FIELD = "operation"  # the tag of image bodies tells nodes which operation; clients never send it

ERROR_SCHEMA = {
    "title": "Error",
    "description": "Every HTTP error of the gateway: OpenAI's error body.",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

OBJECT = {"type": "object"}
BINARY = {"type": "string", "format": "binary"}
JSON = {"application/json": OBJECT}  # what most operations answer


def _param(where: str, name: str, description: str, schema: dict) -> dict:
    """A parameter in the path (always required) or the query (never, here)."""
    return {"name": name, "in": where, "required": where == "path", "description": description, "schema": schema}


def _path(name: str, description: str, **schema: Any) -> dict:
    return _param("path", name, description, {"type": "string", "minLength": 1, **schema})


def _query(name: str, description: str, **schema: Any) -> dict:
    return _param("query", name, description, {"type": "string", **schema})


def _repeated(name: str, description: str, **item: Any) -> dict:
    """A filter that may be given several times (``?model=a&model=b``: either)."""
    schema = {"type": "array", "maxItems": query.MAX_VALUES, "items": {"type": "string", "minLength": 1, **item}}
    return {**_param("query", name, description, schema), "style": "form", "explode": True}


def _time_query(name: str, description: str) -> dict:
    return _query(
        name, description + " Seconds since the epoch, or RFC 3339 (UTC without an offset).", pattern=query.TIME_PATTERN
    )


def _history_filters() -> list[dict]:
    """The filters of the history list and its export (gateway.history_query)."""
    return [
        _repeated("capability", "Only these capabilities.", enum=list(subjects.KNOWN_CAPABILITIES)),
        _repeated("model", "Only these models.", maxLength=MAX_NAME_BYTES),
        _repeated(
            "status", "Only these statuses: a code (503) or a class (5xx).", pattern=history_query.STATUS_PATTERN
        ),
        _repeated("node", "Only what these nodes answered ('-': requests no node saw).", maxLength=MAX_NAME_BYTES),
        _repeated(
            "key_id",
            "Only the requests of these API keys ('-': without a key).",
            maxLength=history_query.KEY_ID_MAX_CHARS,
        ),
        _time_query("since", "Only records stored at or after this time."),
        _time_query("until", "Only records stored before this time."),
        _query(
            "q",
            "Free text anywhere in the record, bodies included (ASCII case-insensitive).",
            minLength=1,
            maxLength=query.MAX_TEXT_CHARS,
        ),
    ]


def _model_path() -> dict:
    return _path("model", "A registered model's name; it may contain '/'.")


def _username_path() -> dict:
    return _path("name", "A username.", maxLength=MAX_USERNAME_CHARS, pattern=USERNAME_PATTERN)


def _body(media: str, name: str, required: bool = True) -> dict:
    return {"required": required, "content": {media: {"schema": {"$ref": REF.format(name=name)}}}}


def _json_body(name: str, *, required: bool = True) -> dict:
    return _body("application/json", name, required)


def _multipart_body(name: str) -> dict:
    return _body("multipart/form-data", name)


def _query_params(kind: type) -> list[dict]:
    """A query Struct's fields as query parameters (the handler converts them with that Struct)."""
    (_,), components = msgspec.json.schema_components([kind], ref_template=REF)
    return [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in components[kind.__name__]["properties"].items()
    ]


def _op(
    summary: str,
    ok: dict[str, dict] = JSON,
    *,
    params: list[dict] | None = None,
    body: dict | None = None,
    tag: str = "openai",
    statuses: tuple[str, ...] = ("200",),
) -> dict:
    """One operation: its success responses (media type -> schema) and the error body for every other status."""
    op: dict[str, Any] = {"summary": summary, "tags": [tag]}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    content = {media: {"schema": schema} for media, schema in ok.items()}
    op["responses"] = {status: {"description": "Success.", "content": copy.deepcopy(content)} for status in statuses}
    op["responses"]["default"] = {
        "description": "An error.",
        "content": {"application/json": {"schema": {"$ref": REF.format(name="Error")}}},
    }
    return op


def _admin(summary: str, **kw: Any) -> dict:
    """An operation of the admin API (most ``/v0`` routes)."""
    return _op(summary, tag="admin", **kw)


# A stream is server-sent events: each a JSON chunk (or an error body) as its data, then "[DONE]".
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
TEXT_STREAM = {"application/json": OBJECT, "text/event-stream": SSE_EVENT}
TRANSCRIPT = {
    "application/json": OBJECT,
    "text/plain": {"type": "string"},
    "text/vtt": {"type": "string"},
}  # by response_format

# path -> method -> operation; one entry per Route in gateway.app.build_app.
OPERATIONS: dict[str, dict[str, dict]] = {
    "/openapi.json": {"get": _op("This document.", tag="meta")},
    "/healthz": {
        "get": _op(
            "Gateway health: 200 while connected to NATS, else 503 (the same body).",
            tag="meta",
            statuses=("200", "503"),
        )
    },
    "/metrics": {
        "get": _op(
            "Prometheus metrics of this gateway ('read' scope): requests, latencies, tokens, queues, nodes, GPUs.",
            {"text/plain": {"type": "string"}, "application/openmetrics-text": {"type": "string"}},
            tag="meta",
        )
    },
    "/v1/models": {"get": _op("Models some live node serves.")},
    "/v1/models/{model}": {
        "get": _op("One registered model.", params=[_model_path()]),
        "delete": _op("Delete a registration (OpenAI's delete shape).", params=[_model_path()]),
    },
    "/v1/chat/completions": {
        "post": _op("Chat completion (stream: server-sent events).", TEXT_STREAM, body=_json_body("ChatCompletionBody"))
    },
    "/v1/completions": {
        "post": _op("Text completion (stream: server-sent events).", TEXT_STREAM, body=_json_body("CompletionBody"))
    },
    "/v1/embeddings": {"post": _op("Embeddings.", body=_json_body("EmbeddingBody"))},
    "/v1/responses": {
        "post": _op(
            "A response (OpenAI's Responses API; stream: typed server-sent events).",
            TEXT_STREAM,
            body=_json_body("ResponsesBody"),
        )
    },
    "/v1/responses/{response_id}": {
        "get": _op("A stored response.", params=[_path("response_id", "The response's id (resp_...).")]),
        "delete": _op("Delete a stored response.", params=[_path("response_id", "The response's id (resp_...).")]),
    },
    "/v1/images/generations": {"post": _op("Generate images.", body=_json_body("ImageGenerationBody"))},
    "/v1/images/edits": {"post": _op("Edit an image.", body=_multipart_body("ImageEditBody"))},
    "/v1/images/variations": {"post": _op("Variations of an image.", body=_multipart_body("ImageVariationBody"))},
    "/v1/audio/transcriptions": {"post": _op("Speech to text.", TRANSCRIPT, body=_multipart_body("TranscriptionBody"))},
    "/v1/audio/translations": {
        "post": _op("Speech to English text.", TRANSCRIPT, body=_multipart_body("TranscriptionBody"))
    },
    "/v1/audio/speech": {
        "post": _op("Text to speech: the audio file.", {"audio/*": BINARY}, body=_json_body("SpeechBody"))
    },
    "/v0/files/{name}": {
        "get": _op(
            "A generated file kept for a 'url' answer, until it expires.",
            {"*/*": BINARY},
            params=[_path("name", "The file's name, from the url of an answer.")],
            tag="files",
        )
    },
    "/v0/nodes": {"get": _admin("Nodes heard from, with the dispatch queue.")},
    "/v0/usage": {
        "get": _admin(
            "Tokens and cost per day, week and month (UTC), by provider, model and API key.",
            params=[
                _query("period", "Only this period.", enum=["day", "week", "month"]),
                _query("date", "A day of the periods (default: today).", format="date"),
                _query("provider", "Only this provider ('local' for nodes)."),
                _query("model", "Only this model (as requested, prefix included)."),
                _query("key_id", "Only this API key's requests."),
            ],
        )
    },
    "/v0/clouds": {"get": _admin("The cloud providers: key set or not, and their model lists.")},
    "/v0/nodes/{node_id}/{verb}": {
        "post": _admin(
            "Drain a node, or resume it.",
            params=[_path("node_id", "The node's id."), _path("verb", "What to do.", enum=["drain", "resume"])],
        )
    },
    "/v0/models": {"get": _admin("Every registered model.")},
    "/v0/models/hub": {"get": _admin("The curated catalog.", params=[_query("search", "Substring to filter by.")])},
    "/v0/models/hf": {"get": _admin("Hugging Face GGUF repositories.", params=_query_params(HfQuery))},
    "/v0/models/register": {
        "post": _admin("Register a model (metadata only).", statuses=("201",), body=_json_body("RegisterModel"))
    },
    "/v0/models/blob/{model}": {
        method: _admin(
            "A model's file (or one of its files), with Range requests.",
            ok={"application/octet-stream": BINARY},
            params=[_model_path(), _query("file", "The file's path in the model (default: its artifact).")],
        )
        for method in ("get", "head")
    },
    "/v0/models/{model}/download": {
        "post": _admin(
            "Download a model onto nodes now.",
            statuses=("200", "202"),
            params=[_model_path()],
            body=_json_body("DownloadModel", required=False),
        )
    },
    "/v0/downloads": {
        "get": _admin(
            "Latest download progress of every node.", params=[_query("model", "Only this model's downloads.")]
        )
    },
    "/v0/downloads/{task_id}": {
        "get": _admin(
            "A download task and its progress.", params=[_path("task_id", "The task id a download answer gave.")]
        )
    },
    "/v0/keys": {
        "post": _admin(
            "Create an API key (admin); the secret is in this answer only.",
            statuses=("201",),
            body=_json_body("CreateKey"),
        ),
        "get": _admin("List API keys (admin): names, scopes, models, expiry; never the secrets."),
    },
    "/v0/keys/{key_id}": {
        "delete": _admin(
            "Revoke an API key (admin): refused on every gateway within a second.",
            params=[_path("key_id", "The key's id (key_...).")],
        )
    },
    "/v0/auth/login": {
        "post": _op(
            "Sign in (no key needed): a session token for 'Authorization: Bearer', valid 7 days. "
            "Throttled per username and address (429 with Retry-After).",
            tag="auth",
            body=_json_body("Login"),
        )
    },
    "/v0/auth/logout": {"post": _op("End this session, on every gateway.", tag="auth")},
    "/v0/auth/me": {"get": _op("The signed-in user and this session.", tag="auth")},
    "/v0/auth/password": {
        "post": _op(
            "Change one's own password (the old one first); the user's other sessions end.",
            tag="auth",
            body=_json_body("ChangePassword"),
        )
    },
    "/v0/users": {
        "get": _admin("List dashboard users (admin); never their password hashes."),
        "post": _admin(
            "Create a dashboard user (admin): admin or viewer.", statuses=("201",), body=_json_body("CreateUser")
        ),
    },
    "/v0/users/{name}": {"delete": _admin("Delete a user (admin); their sessions end.", params=[_username_path()])},
    "/v0/users/{name}/password": {
        "put": _admin(
            "Set a user's password (admin); every session of the user ends.",
            params=[_username_path()],
            body=_json_body("SetPassword"),
        )
    },
    "/v0/audit": {
        "get": _admin(
            "The audit log of admin actions (admin), newest first: who, what, when, the result.",
            params=[
                _query(
                    "limit", "Records per page (default 50).", type="integer", minimum=1, maximum=audit_routes.MAX_LIMIT
                ),
                _query(
                    "before",
                    "Only records older than this seq: the next_before of a page.",
                    type="integer",
                    minimum=1,
                    maximum=2**63 - 1,
                ),
                _query(
                    "actor",
                    "Only this actor: a key id, user:<name>, nats, anonymous.",
                    minLength=1,
                    maxLength=MAX_ACTOR_CHARS,
                ),
                _query(
                    "action",
                    "Only this action, noun.verb (model.register, key.revoke...).",
                    pattern=audit_routes.ACTION_PATTERN,
                ),
                _query(
                    "component",
                    "Only what this component recorded: gateway, registry, cli.",
                    pattern=audit_routes.COMPONENT_PATTERN,
                ),
            ],
        )
    },
    "/v0/history": {
        "get": _op(
            "The request history (read), newest first: a page of records without their bodies, an exact total "
            "(null with q), and next_cursor for the next page; after=<seq> reads newer records, oldest first.",
            JSON,
            tag="history",
            params=[
                *_history_filters(),
                _query(
                    "per_page", "Records per page (default 50).", type="integer", enum=list(history_routes.PER_PAGE)
                ),
                _query("cursor", "The next_cursor of the previous page.", pattern=history_routes.CURSOR_PATTERN),
                _query(
                    "after",
                    "Only records after this seq, oldest first (the newest_seq or next_after of a page).",
                    type="integer",
                    minimum=0,
                    maximum=query.SEQ_MAX,
                ),
            ],
        )
    },
    "/v0/history/export": {
        "get": _op(
            "The filtered history, newest first, streamed: JSON lines (whole records) or CSV (no bodies).",
            {"application/x-ndjson": {"type": "string"}, "text/csv": {"type": "string"}},
            tag="history",
            params=[
                *_history_filters(),
                _query("format", "jsonl (default) or csv.", enum=list(history_routes.EXPORTS)),
            ],
        )
    },
    "/v0/history/{record_id}": {
        "get": _op(
            "One request with its request and response bodies (as --history-masking kept them).",
            JSON,
            tag="history",
            params=[_path("record_id", "The record's id (the x-request-id of its answer).", maxLength=MAX_NAME_BYTES)],
        )
    },
    "/v0/logs": {
        "get": _op(
            "Log records of every component (read), newest first; before=<seq> for older ones, "
            "after=<seq> for newer ones, oldest first (following).",
            JSON,
            tag="logs",
            params=[
                _repeated("component", "Only these components.", enum=list(log_routes.COMPONENTS)),
                _repeated("node", "Only the records of these nodes.", maxLength=MAX_NAME_BYTES),
                _query("level", "This level and above.", enum=list(subjects.LOG_LEVELS)),
                _time_query("since", "Only records logged at or after this time."),
                _time_query("until", "Only records logged before this time."),
                _query(
                    "q",
                    "Text in the message or its fields (ASCII case-insensitive).",
                    minLength=1,
                    maxLength=query.MAX_TEXT_CHARS,
                ),
                _query(
                    "regex",
                    "A regular expression the message or its fields match.",
                    minLength=1,
                    maxLength=log_routes.MAX_REGEX_CHARS,
                ),
                _query(
                    "limit",
                    f"Records (default {log_routes.DEFAULT_LIMIT}).",
                    type="integer",
                    minimum=1,
                    maximum=log_routes.MAX_LIMIT,
                ),
                _query("before", "Only records older than this seq.", type="integer", minimum=1, maximum=query.SEQ_MAX),
                _query(
                    "after",
                    "Only records newer than this seq, oldest first.",
                    type="integer",
                    minimum=0,
                    maximum=query.SEQ_MAX,
                ),
            ],
        )
    },
    "/v0/models/{model}": {
        "get": _admin("A registration with what live nodes say about it.", params=[_model_path()]),
        "delete": _admin("Delete a registration.", params=[_model_path()]),
    },
}


SECURITY = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key, sk-llmr-..., or a session token from POST /v0/auth/login",
    }
}


def _open_meta(paths: dict) -> dict:
    """The meta operations (health, this document) and login need no key: gateway.auth.required_scope."""
    for path in ("/healthz", "/openapi.json", "/v0/auth/login"):
        for operation in paths[path].values():
            operation["security"] = []
    return paths


def _without_tag(schema: dict) -> dict:
    schema = copy.deepcopy(schema)
    schema.get("properties", {}).pop(TAG_FIELD, None)
    if TAG_FIELD in schema.get("required", []):
        schema["required"] = [name for name in schema["required"] if name != TAG_FIELD]
    return schema


def _not_null(schema: dict) -> dict:
    """A form field cannot be null: absent is how it says "no value"."""
    options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    if len(options) == 1:
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
        return {**options[0], **rest}
    return {k: v for k, v in schema.items() if k != "default" or v is not None}


def _as_form(schema: dict, files: set[str]) -> dict:
    """A body Struct's schema as a multipart form: file fields are binary parts, the rest text fields."""
    schema = _without_tag(schema)
    properties = {}
    for name, prop in schema["properties"].items():
        prop = BINARY if name in files else _not_null(prop)
        properties[MULTIPART_ARRAYS.get(name, name)] = prop
    schema["properties"] = properties
    schema["required"] = [MULTIPART_ARRAYS.get(name, name) for name in schema.get("required", [])]
    return schema


@functools.cache
def document(auth: bool = True) -> dict:
    """The OpenAPI document, built once per process; ``auth``: whether this gateway wants keys
    (a gateway run with --no-auth says so, rather than document a header it ignores)."""
    kinds = [*JSON_BODIES, *MULTIPART_BODIES]
    _, components = msgspec.json.schema_components(kinds, ref_template=REF)
    schemas = {name: _without_tag(schema) for name, schema in components.items()}
    for kind, files in MULTIPART_BODIES.items():
        schemas[kind.__name__] = _as_form(components[kind.__name__], files)
    if REF.format(name="Attachment") not in str(schemas):
        schemas.pop("Attachment", None)  # only the node-facing (claim check) shape used it
    schemas["Error"] = ERROR_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "LLM Router gateway",
            "version": "0.1.0",
            "description": "OpenAI-compatible endpoints (/v1) and the router's own (/v0). Every error is OpenAI's error body.",
        },
        "paths": _open_meta(copy.deepcopy(OPERATIONS)),
        "components": {"schemas": schemas, **({"securitySchemes": SECURITY} if auth else {})},
        **({"security": [{"bearer": []}]} if auth else {}),
    }


@functools.cache
def _encoded(auth: bool) -> bytes:
    return msgspec.json.encode(document(auth))


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json``."""
    return Response(_encoded(getattr(request.app.state, "auth", True)), media_type="application/json")
