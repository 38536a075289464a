"""``GET /v0/logs``: the log records of every component, from the LOGS stream (scope ``read``).

Newest first, ``limit`` 1 to 1000 (default 200), ``before=<seq>`` (the ``next_before`` of the
previous page) for older ones, or ``after=<seq>`` for newer ones, oldest first (how
``llm-router logs -f`` follows). ``component``, ``node`` and ``level`` (that level and above)
are subject filters the server applies; ``since``/``until``, sequence lookups; ``q`` (text,
ASCII case-insensitive) and ``regex`` are matched here on each record's line (its message and
its key=value fields), at most :data:`MAX_SCAN` records a request. The regular expression runs
with the ``regex`` module's timeout, within :data:`REGEX_BUDGET_S` a request: a pattern that
backtracks forever is refused, not run forever.

A key limited to some models may not read logs: they are not the records of some models.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
import regex
import structlog
from nats.aio.client import Client
from starlette.requests import Request
from starlette.responses import Response

from broker.windows import Stored, WindowError, Windows
from events import codec, storage, subjects
from events.messages import LogRecord

from . import paging, query
from .auth import key_of
from .errors import ApiError
from .http import json_response

log = structlog.get_logger("gateway.logs")

DEFAULT_LIMIT, MAX_LIMIT = 200, 1000
COMPONENTS = ("up", "gateway", "registry", "node")
COMPONENT_PATTERN = "^(?:" + "|".join(COMPONENTS) + ")$"
MAX_REGEX_CHARS = 200
MAX_SCAN = 50_000
SCAN_CHUNK = 1000
REGEX_TIMEOUT_S = 0.05  # one record
REGEX_BUDGET_S = 1.0  # one request
MAX_FILTERS = 256
_COMPONENT = re.compile(COMPONENT_PATTERN)


def line(record: LogRecord) -> str:
    """What ``q`` and ``regex`` are matched on: the message and its fields, as the console shows them."""
    parts = [record.event, *(f"{key}={value}" for key, value in record.fields.items())]
    for key in ("request_id", "node_id", "logger"):
        value = getattr(record, key)
        if value:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _filters(request: Request) -> list[str]:
    components = query.values(request, "component", _COMPONENT, "component")
    nodes = query.values(request, "node", what="node id")
    level = request.query_params.get("level")
    if level is not None and level not in subjects.LOG_LEVELS:
        raise ApiError(400, f"'level' is one of {', '.join(subjects.LOG_LEVELS)}.", param="level")
    levels = list(subjects.LOG_LEVELS[subjects.LOG_LEVELS.index(level) :]) if level else []
    if nodes:
        if components and "node" not in components:
            raise ApiError(400, "'node' picks records of nodes: with it, 'component' must include node.", param="node")
        pairs = [("node", node) for node in nodes] + [(c, None) for c in components if c != "node"]
    else:
        pairs = [(component, None) for component in components]
    if len(pairs or [0]) * len(levels or [0]) > MAX_FILTERS:
        raise ApiError(400, f"The filters make more than {MAX_FILTERS} combinations.")
    filters = [
        subjects.logs_filter(component, instance, lvl)
        for (component, instance), lvl in itertools.product(pairs or [(None, None)], levels or [None])
    ]
    return [] if filters == [subjects.logs_filter()] else filters


def _matcher(request: Request) -> Callable[[str], bool] | None:
    """The record test of ``q`` and ``regex`` together (None: every record passes)."""
    text = query.text(request, "q")
    pattern = query.text(request, "regex", MAX_REGEX_CHARS)
    needle = text.lower() if text else None
    compiled = None
    if pattern is not None:
        try:
            compiled = regex.compile(pattern)
        except (regex.error, OverflowError, RecursionError) as exc:
            raise ApiError(400, f"'regex' does not compile: {exc}.", param="regex") from None
    if needle is None and compiled is None:
        return None
    deadline = time.monotonic() + REGEX_BUDGET_S

    def matches(text_: str) -> bool:
        if needle is not None and needle not in text_.lower():
            return False
        if compiled is None:
            return True
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return compiled.search(text_, timeout=min(REGEX_TIMEOUT_S, left)) is not None
        except TimeoutError:
            raise ApiError(400, "'regex' takes too long to match; simplify it.", param="regex") from None

    return matches


def _row(msg: Stored) -> tuple[dict[str, Any], LogRecord] | None:
    try:
        record = codec.decode(msg.data, LogRecord)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # not ours (someone published on logs.>): skipped, not an error of this request
    return {"object": "log_record", "seq": msg.seq, **msgspec.structs.asdict(record)}, record


class LogRoutes:
    def __init__(self, nc: Client) -> None:
        self.windows = Windows(nc, storage.LOGS)

    async def page(self, request: Request) -> Response:
        key = key_of(request.scope)
        if key is not None and key.models:
            raise ApiError(403, f"API key {key.id} is limited to some models; logs are not.", code="insufficient_scope")
        limit = query.integer(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        before = query.integer(request, "before", None, 1, query.SEQ_MAX)
        after = query.integer(request, "after", None, 0, query.SEQ_MAX)
        if before is not None and after is not None:
            raise ApiError(400, "Send 'before' (older records) or 'after' (newer ones), not both.", param="after")
        filters = _filters(request)
        since, until = query.time_range(request)
        matches = _matcher(request)
        try:
            bounds = await self.windows.bounds()
            lo, hi = bounds.first, bounds.last
            if since is not None:
                lo = max(lo, await self.windows.seq_at(since))
            if until is not None:
                hi = min(hi, await self.windows.seq_at(until) - 1)
            if after is not None:
                return json_response(await self._forward(filters, lo, hi, after, limit, matches))
            if before is not None:
                hi = min(hi, before - 1)
            return json_response(await self._backward(filters, lo, hi, bounds, limit, matches))
        except WindowError as exc:
            raise ApiError(503, f"Cannot read the logs: {exc}", code="logs_unavailable") from None

    def _scan(self, filters: list[str], matches: Callable[[str], bool] | None) -> paging.Scan:
        """The log stream through ``filters``; with a regular expression, only the lines it matches."""

        def row(msg: Stored) -> dict[str, Any] | None:
            made = _row(msg)
            return made[0] if made is not None and (matches is None or matches(line(made[1]))) else None

        return paging.Scan(self.windows, filters, row, MAX_SCAN, None if matches is None else SCAN_CHUNK)

    async def _backward(self, filters, lo, hi, bounds, limit, matches) -> dict[str, Any]:
        page = await paging.backward(self._scan(filters, matches), lo, hi, limit=limit, bounds=bounds)
        return {
            "object": "list",
            "data": page.rows,
            "has_more": page.more,
            "next_before": page.edge if page.more else None,
        }

    async def _forward(self, filters, lo, hi, after, limit, matches) -> dict[str, Any]:
        page = await paging.forward(self._scan(filters, matches), after, lo, hi, limit=limit)
        return {"object": "list", "data": page.rows, "has_more": page.more, "next_after": page.edge}
