"""``GET /v0/usage``: tokens and cost per day, week and month, by provider, model and API key.

Added up from the usage meter's mirror of daily counters (gateway/usage.py), never from the
history stream. Periods are UTC: the day of ``date`` (default today), its ISO week (Monday to
Sunday) and its calendar month. ``period`` picks one; ``provider``, ``model`` and ``key_id``
filter.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from events.messages import UsageDay

from .errors import ApiError
from .http import json_response
from .usage import COUNTERS, UsageMeter

PERIODS = ("day", "week", "month")


def period_range(period: str, day: dt.date) -> tuple[dt.date, dt.date]:
    """First and last day of the period that contains ``day``."""
    if period == "day":
        return day, day
    if period == "week":
        start = day - dt.timedelta(days=day.weekday())
        return start, start + dt.timedelta(days=6)
    start = day.replace(day=1)
    following = (start + dt.timedelta(days=32)).replace(day=1)
    return start, following - dt.timedelta(days=1)


def _zero() -> dict[str, Any]:
    return dict.fromkeys(COUNTERS, 0) | {"cost_usd": 0.0}


def _add(total: dict[str, Any], row: UsageDay) -> None:
    for name in COUNTERS:
        total[name] += getattr(row, name)


def _rounded(counters: dict[str, Any]) -> dict[str, Any]:
    return {**counters, "cost_usd": round(counters["cost_usd"], 6)}


def aggregate(rows: list[UsageDay], start: dt.date, end: dt.date) -> dict[str, Any]:
    first, last = start.isoformat(), end.isoformat()
    totals = _zero()
    groups: dict[str, dict[Any, dict[str, Any]]] = {"provider": {}, "model": {}, "key": {}, "rows": {}}
    for row in rows:
        if not first <= row.day <= last:
            continue
        _add(totals, row)
        for group, key in (
            ("provider", row.provider),
            ("model", (row.provider, row.model)),
            ("key", row.key_id),
            ("rows", (row.provider, row.model, row.key_id)),
        ):
            table = groups[group]
            if key not in table:
                table[key] = _zero()
            _add(table[key], row)

    def listing(group: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
        entries = []
        for key, counters in groups[group].items():
            values = key if isinstance(key, tuple) else (key,)
            entries.append(dict(zip(fields, values)) | _rounded(counters))
        return sorted(entries, key=lambda e: (-e["cost_usd"], -e["total_tokens"], str(e)))

    return {
        "start": first,
        "end": last,
        "totals": _rounded(totals),
        "by_provider": listing("provider", ("provider",)),
        "by_model": listing("model", ("provider", "model")),
        "by_key": listing("key", ("key_id",)),
        "rows": listing("rows", ("provider", "model", "key_id")),
    }


class UsageRoutes:
    def __init__(self, meter: UsageMeter) -> None:
        self.meter = meter

    async def usage(self, request: Request) -> Response:
        params = request.query_params
        try:
            day = dt.date.fromisoformat(params["date"]) if "date" in params else dt.datetime.now(dt.UTC).date()
        except ValueError:
            raise ApiError(400, "Invalid 'date': expected YYYY-MM-DD.", param="date") from None
        periods = [params["period"]] if "period" in params else list(PERIODS)
        if any(p not in PERIODS for p in periods):
            raise ApiError(400, f"Invalid 'period': one of {', '.join(PERIODS)}.", param="period")
        await self.meter.flush()  # what this gateway counted is in its answer
        rows = [
            row
            for row in self.meter.days.values()
            if all(
                name not in params or params[name] == value
                for name, value in (("provider", row.provider), ("model", row.model), ("key_id", row.key_id))
            )
        ]
        body = {"object": "usage", "date": day.isoformat(), "currency": "USD"}
        body["periods"] = {p: aggregate(rows, *period_range(p, day)) for p in periods}
        return json_response(body)
