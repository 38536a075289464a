"""What messages of several areas share: the schema version, timestamps, token usage, the
admin answer, and the base of every node reply (each names its request and its node)."""

from __future__ import annotations

import time

from msgspec import Struct

SCHEMA_VERSION = 1


def now() -> float:
    return time.time()


class Usage(Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Answer(Struct, kw_only=True):
    """What every admin answer starts with; ``status`` follows HTTP so the gateway can pass it on."""

    ok: bool
    status: int = 200
    message: str = ""


class NodeReply(Struct, kw_only=True, tag_field="kind"):
    """Base of the tagged replies a node sends on a request's inbox: the gateway routes each
    by ``request_id`` and counts it against ``node_id``. Subclasses inherit the tag field
    ``kind`` and set their ``tag`` (and ``kw_only=True``, which msgspec does not inherit)."""

    request_id: str = ""  # stamped by the node's Responder (nodes/responder.py)
    node_id: str = ""
