"""Appends one record per request to the HISTORY stream, off the request path.

The writing (one background task, acknowledgements on one inbox, retries with ``Nats-Msg-Id``,
a bounded backlog) is :class:`broker.appender.StreamAppender`'s, shared with the audit log;
this says where a record goes (``events.subjects.history``: capability, model, status, node
and key are subject tokens, so the server filters on them), masks its bodies as the deployment
says (:mod:`gateway.masking`, in the background task) and, once JetStream has stored it, notes
its sequence under its id in the ``history-ids`` bucket, for ``GET /v0/history/{id}``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.client import Client

from broker.appender import StreamAppender
from broker.permissions import kv_stream
from events import codec, encode_token, storage, subjects
from events.messages import HistoryRecord

from .masking import MODES, mask


class IndexEntry(msgspec.Struct):
    """A record's place in the HISTORY stream (the value under its id in ``history-ids``)."""

    id: str
    seq: int


class HistoryIndex(StreamAppender):
    stream = kv_stream(storage.KV_HISTORY_IDS)

    def subject(self, entry: IndexEntry) -> str:
        return f"$KV.{storage.KV_HISTORY_IDS}.{encode_token(entry.id)}"


class HistoryWriter(StreamAppender):
    stream = storage.HISTORY

    def __init__(self, nc: Client, *, masking: str = "none", **options: Any) -> None:
        if masking not in MODES:
            raise ValueError(f"history masking must be one of {', '.join(MODES)}, not {masking!r}")
        super().__init__(nc, **options)
        self.masking = masking
        self.index = HistoryIndex(nc)

    def subject(self, record: HistoryRecord) -> str:
        return subjects.history(record.capability, record.model, record.status_code, record.node_id, record.key_id)

    def encode(self, record: HistoryRecord) -> bytes:
        return codec.encode(mask(record, self.masking))

    def stored(self, record: HistoryRecord, seq: int) -> None:
        self.index.append(IndexEntry(record.id, seq))

    async def start(self) -> None:
        await super().start()
        await self.index.start()

    async def stop(self) -> None:
        await super().stop()  # flushes: the last records' index entries are appended by then
        await self.index.stop()
