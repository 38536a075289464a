"""Appends one record per request to the HISTORY stream, off the request path.

The writing (one background task, acknowledgements on one inbox, retries with ``Nats-Msg-Id``,
a bounded backlog) is :class:`broker.appender.StreamAppender`'s, shared with the audit log;
this says only where a history record goes: ``history.<capability>.<model>``.
"""

from __future__ import annotations

from broker.appender import StreamAppender
from events import subjects
from events.messages import HistoryRecord


class HistoryWriter(StreamAppender):
    stream = "HISTORY"

    def subject(self, record: HistoryRecord) -> str:
        return subjects.history(record.capability, record.model)
