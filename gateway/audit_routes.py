"""``GET /v0/audit``: the audit log, newest first, a page at a time (admin only).

``?limit=`` (1 to 500, default 50), ``?before=<seq>`` (the ``next_before`` of the previous
page), and filters ``?actor=``, ``?action=``, ``?component=`` that become one subject filter, so
the server picks the matching records (``broker.direct.newest_first``), not this gateway.
"""

from __future__ import annotations

import re

import msgspec
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from starlette.requests import Request
from starlette.responses import Response

from broker.audit import MAX_ACTOR_CHARS
from broker.direct import DirectGetError, newest_first
from events import codec, storage, subjects
from events.messages import AuditRecord

from . import query
from .errors import ApiError
from .http import json_response

log = structlog.get_logger("gateway.audit")

DEFAULT_LIMIT, MAX_LIMIT = 50, 500
ACTION_PATTERN = r"^[a-z][a-z0-9_-]{0,31}\.[a-z][a-z0-9_-]{0,31}$"  # noun.verb (the OpenAPI document says so too)
COMPONENT_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
_ACTION, _COMPONENT = re.compile(ACTION_PATTERN), re.compile(COMPONENT_PATTERN)


def _filter(request: Request) -> str | None:
    actor = query.text(request, "actor", MAX_ACTOR_CHARS)
    action, component = request.query_params.get("action"), request.query_params.get("component")
    if action is not None and not _ACTION.fullmatch(action):
        raise ApiError(400, "'action' is noun.verb, e.g. model.register or key.revoke.", param="action")
    if component is not None and not _COMPONENT.fullmatch(component):
        raise ApiError(400, "'component' is gateway, registry or cli.", param="component")
    if actor is None and action is None and component is None:
        return None
    return subjects.audit_filter(component, action, actor)


class AuditRoutes:
    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js

    async def page(self, request: Request) -> Response:
        limit = query.integer(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        before = query.integer(request, "before", None, 1, query.SEQ_MAX)
        subject = _filter(request)
        try:
            page = await newest_first(self.nc, self.js, storage.AUDIT, limit=limit, before=before, subject=subject)
        except DirectGetError as exc:
            raise ApiError(502, f"Cannot read the audit log: {exc}", code="audit_unavailable") from None
        data = []
        for msg in page.messages:
            try:
                record = codec.decode(msg.data, AuditRecord)
            except msgspec.DecodeError:
                log.warning("undecodable audit record", seq=msg.seq, subject=msg.subject)
                continue
            data.append({"object": "audit_record", "seq": msg.seq, **msgspec.structs.asdict(record)})
        return json_response(
            {"object": "list", "data": data, "next_before": page.next_before, "has_more": page.next_before is not None}
        )
