"""What a ``/v0/history`` request asks for: its filters as HISTORY subject filters, its time range
and its free text, for the list, the export and the CLI alike.

Capability, model, status (a code or a class such as ``5xx``), node and key id are tokens of a
record's subject (:func:`events.subjects.history`), so each combination of the values asked for
is one subject filter the server applies; a key limited to some models only ever gets filters
naming those models. Free text is matched on the stored bytes of the records the filters select.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import msgspec
from starlette.requests import Request

from events import subjects
from events.messages import HistoryRecord

from . import query
from .auth import key_of
from .errors import ApiError

STATUS_PATTERN = r"^[1-5](?:[0-9]{2}|xx)$"
CAPABILITY_PATTERN = "^(?:" + "|".join(subjects.KNOWN_CAPABILITIES) + ")$"
KEY_ID_MAX_CHARS = 128
MAX_FILTERS = 256  # subject filters of one request (the product of the values asked for)
_STATUS, _CAPABILITY = re.compile(STATUS_PATTERN), re.compile(CAPABILITY_PATTERN)


@dataclass(frozen=True)
class HistoryQuery:
    filters: list[str]  # subject filters; empty: every record
    since: float | None
    until: float | None
    needle: bytes | None  # free text, as it appears in a record's JSON (lower-cased ASCII)

    def matches_text(self, data: bytes) -> bool:
        return self.needle is None or self.needle in data.lower()


def visible(request: Request, record: HistoryRecord) -> bool:
    """Whether the caller's key may see ``record`` (a key limited to some models sees only theirs)."""
    key = key_of(request.scope)
    return key is None or not key.models or record.model in key.models


def _statuses(values: list[str]) -> list[str]:
    """Distinct statuses, without the codes a class also given covers (their filters would overlap)."""
    classes = {value for value in values if value.endswith("xx")}
    return [value for value in values if value in classes or f"{value[0]}xx" not in classes]


def needle(text: str) -> bytes:
    return msgspec.json.encode(text)[1:-1].lower()  # JSON-escaped as stored: quotes, backslashes


def parse(request: Request) -> HistoryQuery:
    """The query of a history request, refused (400, or 403 for a model the key may not use) when
    out of bounds."""
    capabilities = query.values(request, "capability", _CAPABILITY, "capability")
    models = query.values(request, "model", what="model name")
    statuses = _statuses(query.values(request, "status", _STATUS, "status"))
    nodes = query.values(request, "node", what="node id")
    keys = query.values(request, "key_id", what="key id")
    if any(len(key) > KEY_ID_MAX_CHARS for key in keys):
        raise ApiError(400, f"A key id has at most {KEY_ID_MAX_CHARS} characters.", param="key_id")
    key = key_of(request.scope)
    allowed = frozenset(key.models) if key is not None and key.models else None
    if allowed is not None:
        refused = [model for model in models if model not in allowed]
        if refused:
            raise ApiError(
                403, f"API key {key.id} may not see the model '{refused[0]}'.", param="model", code="model_not_allowed"
            )
        models = models or sorted(allowed)
    combinations = len(capabilities or [0]) * len(models or [0]) * len(statuses or [0])
    combinations *= len(nodes or [0]) * len(keys or [0])
    if combinations > MAX_FILTERS:
        raise ApiError(400, f"The filters make {combinations} combinations; at most {MAX_FILTERS}.")
    filters = [
        subjects.history_filter(*combination)
        for combination in itertools.product(
            capabilities or [None], models or [None], statuses or [None], nodes or [None], keys or [None]
        )
    ]
    if filters == [subjects.history_filter()]:
        filters = []  # everything: no filter at all (counts then need no consumer)
    since, until = query.time_range(request)
    text = query.text(request, "q")
    return HistoryQuery(filters, since, until, needle(text) if text else None)
