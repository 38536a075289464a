"""``GET /v0/history``, ``/v0/history/{id}`` and ``/v0/history/export``: the request history, read
back from the HISTORY stream (scope ``read``; a key limited to some models sees only theirs).

A page is newest first: ``per_page`` 10, 25, 50 or 100 (default 50), filters of
:mod:`gateway.history_query`, and ``cursor`` (the ``next_cursor`` of the previous page) for the
next one. The server selects the matches (subject filters) and counts them exactly (consumer
pending counts, :mod:`broker.windows`), so a page costs a handful of JetStream requests whatever
the stream holds, and its ``total`` is exact; with free text (``q``) the total is null and a
page reads at most :data:`MAX_SCAN` records (a short page then still has a ``next_cursor``).
``after=<seq>`` reads forward instead, oldest first, from the newest seq a client has seen:
how ``llm-router history --follow`` (and a live dashboard) keeps up.

A page's cursor also holds the sequence its first page started from, so the total and the pages
after it stay those of the same set of records while new ones arrive.
"""

from __future__ import annotations

import csv
import datetime
import io
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from broker.windows import Bounds, Stored, WindowError, Windows
from events import codec, encode_token, name_error, storage
from events.messages import HistoryRecord

from . import paging, query
from .errors import ApiError
from .history_query import HistoryQuery, parse, visible
from .http import json_response

log = structlog.get_logger("gateway.history")

PER_PAGE = (10, 25, 50, 100)
DEFAULT_PER_PAGE = 50
MAX_SCAN = 20_000  # records one page with free text reads at most
TEXT_CHUNK = 500  # records read at a time when free text is matched
EXPORT_CHUNK = 500
CURSOR_PATTERN = r"^[0-9]{1,19}\.[0-9]{1,19}$"
_CURSOR = re.compile(CURSOR_PATTERN)
SUMMARY_FIELDS = tuple(
    name for name in HistoryRecord.__struct_fields__ if name not in ("request", "response", "schema")
)
CSV_COLUMNS = (
    "seq",
    "id",
    "recorded_at",
    "started_at",
    "capability",
    "endpoint",
    "model",
    "status_code",
    "node_id",
    "key_id",
    "duration_ms",
    "first_byte_ms",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "error",
    "masking",
)
EXPORTS = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def _decode(msg: Stored) -> HistoryRecord | None:
    try:
        return codec.decode(msg.data, HistoryRecord)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("undecodable history record", seq=msg.seq, subject=msg.subject[:200])
        return None


def summary(msg: Stored, record: HistoryRecord) -> dict[str, Any]:
    """A record without its bodies, with its place in the stream: one row of a page."""
    row: dict[str, Any] = {"object": "history_record", "seq": msg.seq, "recorded_at": msg.time}
    for name in SUMMARY_FIELDS:
        row[name] = getattr(record, name)
    return row


def full(msg: Stored, record: HistoryRecord) -> dict[str, Any]:
    return {**summary(msg, record), "request": record.request, "response": record.response}


def _iso(when: float | None) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat() if when is not None else ""


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def csv_row(msg: Stored, record: HistoryRecord) -> list[Any]:
    usage = record.usage
    values = {
        **{name: getattr(record, name) for name in SUMMARY_FIELDS},
        "seq": msg.seq,
        "recorded_at": _iso(msg.time),
        "started_at": _iso(record.started_at),
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "total_tokens": usage.total_tokens if usage else None,
    }
    return [_cell(values[column]) for column in CSV_COLUMNS]


def _cursor(request: Request) -> tuple[int, int] | None:
    raw = request.query_params.get("cursor")
    if raw is None:
        return None
    if not _CURSOR.fullmatch(raw):
        raise ApiError(400, "'cursor' must be the next_cursor of a page.", param="cursor")
    before, top = (int(part) for part in raw.split("."))
    if not 1 <= before <= query.SEQ_MAX or top > query.SEQ_MAX:
        raise ApiError(400, "'cursor' must be the next_cursor of a page.", param="cursor")
    return before, top


def _unavailable(exc: Exception) -> ApiError:
    return ApiError(503, f"Cannot read the request history: {exc}", code="history_unavailable")


class HistoryRoutes:
    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self.windows = Windows(nc, storage.HISTORY)
        self.js = js
        self._ids: KeyValue | None = None  # the history-ids bucket, bound on first use

    async def _range(self, q: HistoryQuery) -> tuple[Bounds, int, int]:
        """The stream's bounds and the sequences ``since`` and ``until`` make of them (inclusive)."""
        bounds = await self.windows.bounds()
        lo, hi = bounds.first, bounds.last
        if q.since is not None:
            lo = max(lo, await self.windows.seq_at(q.since))
        if q.until is not None:
            hi = min(hi, await self.windows.seq_at(q.until) - 1)
        return bounds, lo, hi

    async def page(self, request: Request) -> Response:
        q = parse(request)
        per_page = query.choice(request, "per_page", DEFAULT_PER_PAGE, PER_PAGE)
        cursor = _cursor(request)
        after = query.integer(request, "after", None, 0, query.SEQ_MAX)
        if cursor is not None and after is not None:
            raise ApiError(400, "Send 'cursor' (older records) or 'after' (newer ones), not both.", param="after")
        try:
            bounds, lo, hi = await self._range(q)
            if after is not None:
                return json_response(await self._forward(q, bounds, lo, hi, after, per_page))
            return json_response(await self._backward(q, bounds, lo, hi, cursor, per_page))
        except WindowError as exc:
            raise _unavailable(exc) from None

    def _scan(self, q: HistoryQuery) -> paging.Scan:
        """The history stream through ``q``'s filters; with free text, only the records it matches."""

        def row(msg: Stored) -> dict[str, Any] | None:
            record = _decode(msg) if q.matches_text(msg.data) else None
            return summary(msg, record) if record is not None else None

        return paging.Scan(self.windows, q.filters, row, MAX_SCAN, None if q.needle is None else TEXT_CHUNK)

    async def _backward(
        self, q: HistoryQuery, bounds: Bounds, lo: int, hi: int, cursor: tuple[int, int] | None, per_page: int
    ) -> dict[str, Any]:
        top = hi if cursor is None else min(cursor[1], hi)
        upper = top if cursor is None else min(cursor[0] - 1, top)
        span = await self.windows.span(q.filters, lo, upper, bounds)
        total: int | None = None
        if q.needle is None:
            total = span[1] if upper == top else (await self.windows.span(q.filters, lo, top, bounds))[1]
        page = await paging.backward(self._scan(q), lo, upper, limit=per_page, bounds=bounds, span=span)
        return {
            "object": "list",
            "data": page.rows,
            "per_page": per_page,
            "total": total,
            "has_more": page.more,
            "next_cursor": f"{page.edge}.{top}" if page.more else None,
            "newest_seq": top if top >= lo else None,
        }

    async def _forward(
        self, q: HistoryQuery, bounds: Bounds, lo: int, hi: int, after: int, per_page: int
    ) -> dict[str, Any]:
        """Records after ``after``, oldest first; ``has_more``: stopped by the page size (or the
        scan limit) before the newest record, so asking again at once gets more."""
        page = await paging.forward(self._scan(q), after, lo, hi, limit=per_page)
        return {
            "object": "list",
            "data": page.rows,
            "per_page": per_page,
            "has_more": page.more,
            "next_after": page.edge,
        }

    async def detail(self, request: Request) -> Response:
        record_id = request.path_params["record_id"]
        if name_error(record_id, "record id"):
            raise ApiError(404, f"No history record {record_id[:80]!r}.", code="record_not_found")
        try:
            if self._ids is None:
                self._ids = await self.js.key_value(storage.KV_HISTORY_IDS)
            value = (await self._ids.get(encode_token(record_id))).value or b""
            msg = await self.windows.get(int(value)) if value.isdigit() else None
        except (KeyNotFoundError, NotFoundError):  # no entry; or no bucket yet (a gateway older than it made them)
            msg = None
        except WindowError as exc:
            raise _unavailable(exc) from None
        record = _decode(msg) if msg is not None else None
        if record is None or record.id != record_id or not visible(request, record):
            raise ApiError(404, f"No history record {record_id[:80]!r}.", code="record_not_found")
        return json_response(full(msg, record))

    async def export(self, request: Request) -> Response:
        """The filtered range, newest first as the pages, as JSON lines (whole records) or CSV
        (no bodies), streamed a window at a time."""
        kind = request.query_params.get("format", "jsonl")
        if kind not in EXPORTS:
            raise ApiError(400, "'format' is jsonl or csv.", param="format")
        q = parse(request)
        try:
            bounds, lo, hi = await self._range(q)
            span = await self.windows.span(q.filters, lo, hi, bounds)
        except WindowError as exc:
            raise _unavailable(exc) from None
        body = self._lines(q, bounds, lo, hi, span, kind)
        headers = {"content-disposition": f'attachment; filename="history.{kind}"'}
        return StreamingResponse(body, media_type=EXPORTS[kind], headers=headers)

    async def _lines(
        self, q: HistoryQuery, bounds: Bounds, lo: int, hi: int, span: tuple[int, int], kind: str
    ) -> AsyncIterator[bytes]:
        out = io.StringIO()
        writer = csv.writer(out)
        if kind == "csv":
            writer.writerow(CSV_COLUMNS)
            yield out.getvalue().encode()
        windows = self.windows.newest_first(q.filters, lo, hi, chunk=EXPORT_CHUNK, bounds=bounds, span=span)
        async with aclosing(windows) as found:
            async for window in found:
                records = [(msg, _decode(msg)) for msg in window if q.matches_text(msg.data)]
                records = [(msg, record) for msg, record in records if record is not None]
                if kind == "jsonl":
                    yield b"".join(codec.encode(full(msg, record)) + b"\n" for msg, record in records)
                    continue
                out.seek(0)
                out.truncate()
                writer.writerows(csv_row(msg, record) for msg, record in records)
                yield out.getvalue().encode()
