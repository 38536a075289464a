"""Query parameters of the read APIs (history, logs, audit): each one bounded, each refusal an OpenAI error.

The patterns here are the OpenAPI document's too (:mod:`gateway.openapi`), so what the
document calls invalid is exactly what these refuse.
"""

from __future__ import annotations

import datetime
import re

from starlette.requests import Request

from events import name_error

from .errors import ApiError

MAX_VALUES = 20  # repeated values of one filter (?model=a&model=b)
MAX_TEXT_CHARS = 200
# Seconds since the epoch, or an RFC 3339 date or date-time (UTC when it names no offset).
TIME_PATTERN = (
    r"^(?:[0-9]{1,11}(?:\.[0-9]{1,9})?"
    r"|[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[Tt][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})?)?)$"
)
SEQ_MAX = 2**63 - 1
_TIME = re.compile(TIME_PATTERN)
_DIGITS = re.compile(r"[0-9]{1,19}")


def integer(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = int(raw) if _DIGITS.fullmatch(raw) else low - 1  # int() would take " 5", "+5" and "５"
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def choice(request: Request, name: str, default: int, allowed: tuple[int, ...]) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or int(raw) not in allowed:
        raise ApiError(400, f"'{name}' must be one of {', '.join(map(str, allowed))}.", param=name)
    return int(raw)


def text(request: Request, name: str, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not 0 < len(raw) <= max_chars:
        raise ApiError(400, f"'{name}' must be 1 to {max_chars} characters.", param=name)
    return raw


def values(request: Request, name: str, pattern: re.Pattern | None = None, what: str = "name") -> list[str]:
    """Every value of a repeatable parameter, distinct, each a name a subject token can hold
    (and matching ``pattern`` when given)."""
    found = request.query_params.getlist(name)
    if len(found) > MAX_VALUES:
        raise ApiError(400, f"At most {MAX_VALUES} values of '{name}'.", param=name)
    for value in found:
        error = name_error(value, what)
        if error or (pattern is not None and not pattern.fullmatch(value)):
            raise ApiError(400, f"Invalid '{name}' {value[:80]!r}: {error or 'see the API document'}.", param=name)
    return list(dict.fromkeys(found))


def timestamp(request: Request, name: str) -> float | None:
    """Seconds since the epoch, from either form :data:`TIME_PATTERN` allows."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not _TIME.fullmatch(raw):
        raise ApiError(400, f"'{name}' must be seconds since the epoch or an RFC 3339 time.", param=name)
    if "-" not in raw[1:5] and ":" not in raw:
        return float(raw)
    try:
        when = datetime.datetime.fromisoformat(raw.upper().replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"'{name}' is not a valid date or time: {raw!r}.", param=name) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def time_range(request: Request) -> tuple[float | None, float | None]:
    """``since`` (inclusive) and ``until`` (exclusive)."""
    since, until = timestamp(request, "since"), timestamp(request, "until")
    if since is not None and until is not None and since > until:
        raise ApiError(400, "'since' is later than 'until'.", param="since")
    return since, until
