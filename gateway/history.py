"""Appends one record per request to the HISTORY stream, off the request path.

The writing (one background task, acknowledgements on one inbox, retries with ``Nats-Msg-Id``,
a bounded backlog) is :class:`broker.appender.StreamAppender`'s, shared with the audit log;
this says only where a history record goes: ``history.<capability>.<model>``.

Observers (``observe``) see every record once, as it is appended and before it is written: the
usage meter counts tokens and adds the cost there (gateway/usage.py); metrics can hook in the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from nats.aio.client import Client

from broker.appender import StreamAppender
from events import subjects
from events.messages import HistoryRecord

log = structlog.get_logger("gateway.history")


class HistoryWriter(StreamAppender):
    stream = "HISTORY"

    def __init__(self, nc: Client, **kwargs) -> None:
        super().__init__(nc, **kwargs)
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
        return subjects.history(record.capability, record.model)
