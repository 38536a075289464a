"""Appends one record per request to the HISTORY stream, off the request path.

The writing (one background task, acknowledgements on one inbox, retries with ``Nats-Msg-Id``,
a bounded backlog) is :class:`broker.appender.StreamAppender`'s, shared with the audit log;
this says where a record goes (``events.subjects.history``: capability, model, status, node
and key are subject tokens, so the server filters on them), masks its bodies as the deployment
says (:mod:`gateway.masking`, in the background task) and, once JetStream has stored it, notes
its sequence under its id in the ``history-ids`` bucket, for ``GET /v0/history/{id}``.

The index entry is a plain publish, not acknowledged: with an acknowledgement and retries it
doubled what each request costs the gateway in history writes (8 µs more a record, as much as
the record itself; as a plain publish, 4 µs), for an entry that only speeds up one lookup. An
entry lost with a broker restart makes that record's ``/v0/history/{id}`` a 404; it stays in
every list and export.

Observers (``observe``) see every record once, as it is appended and before it is written: the
usage meter counts tokens and adds the cost there (gateway/usage.py), and the metrics count every request (gateway/metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from nats.aio.client import Client

from broker.appender import StreamAppender
from events import codec, encode_token, storage, subjects
from events.messages import HistoryRecord

from .masking import MODES, mask

log = structlog.get_logger("gateway.history")


def index_subject(record_id: str) -> str:
    return f"$KV.{storage.KV_HISTORY_IDS}.{encode_token(record_id)}"


class HistoryWriter(StreamAppender):
    stream = storage.HISTORY

    def __init__(self, nc: Client, *, masking: str = "none", **options: Any) -> None:
        if masking not in MODES:
            raise ValueError(f"history masking must be one of {', '.join(MODES)}, not {masking!r}")
        super().__init__(nc, **options)
        self.masking = masking
        self.unindexed = 0  # index entries not sent (the link dropped, an id no subject holds)
        self._observers: list[Callable[[HistoryRecord], None]] = []

    def observe(self, observer: Callable[[HistoryRecord], None]) -> None:
        """Call ``observer(record)`` for every record appended (it may complete the record, e.g. its cost)."""
        self._observers.append(observer)

    def append(self, record: HistoryRecord) -> None:
        for observer in self._observers:
            try:
                observer(record)
            except Exception:  # an observer's bug must not lose the record
                log.exception("history observer failed", observer=getattr(observer, "__qualname__", repr(observer)))
        super().append(record)

    def subject(self, record: HistoryRecord) -> str:
        return subjects.history(record.capability, record.model, record.status_code, record.node_id, record.key_id)

    def encode(self, record: HistoryRecord) -> bytes:
        return codec.encode(mask(record, self.masking))

    async def flush(self, timeout: float = 5.0) -> None:
        """Every record stored, and its index entry sent."""
        await super().flush(timeout)
        if self.nc.is_connected:
            await self.nc.flush(timeout)

    async def stored(self, record: HistoryRecord, seq: int) -> None:
        try:
            await self.nc.publish(index_subject(record.id), b"%d" % seq)  # the value: the sequence, in digits
        except Exception:  # the link dropped, or an id no subject can hold: only its lookup by id is lost
            self.unindexed += 1
