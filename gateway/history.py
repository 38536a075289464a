"""Appends one record per request to the HISTORY stream, off the request path.

Records are queued and published by one background task, a batch at a time with their acks
awaited together, so a slow JetStream write never adds latency to an answer. The queue is
bounded: under overload the oldest pending records are counted as dropped and logged,
rather than growing memory without limit.
"""

from __future__ import annotations

import asyncio

import structlog
from nats.js import JetStreamContext

from events import codec, subjects
from events.messages import HistoryRecord

log = structlog.get_logger("gateway.history")


class HistoryWriter:
    def __init__(self, js: JetStreamContext, *, max_pending: int = 10_000, batch: int = 128) -> None:
        self.js = js
        self.batch = batch
        self.dropped = 0
        self._queue: asyncio.Queue[HistoryRecord] = asyncio.Queue(max_pending)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="history-writer")

    def append(self, record: HistoryRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("history backlog full, records dropped", dropped=self.dropped)

    async def _publish(self, record: HistoryRecord) -> None:
        await self.js.publish(subjects.history(record.capability, record.model), codec.encode(record))

    async def _run(self) -> None:
        while True:
            records = [await self._queue.get()]
            while len(records) < self.batch and not self._queue.empty():
                records.append(self._queue.get_nowait())
            results = await asyncio.gather(*(self._publish(r) for r in records), return_exceptions=True)
            for record, result in zip(records, results):
                if isinstance(result, Exception):
                    log.error("history record not stored", id=record.id, error=str(result))
            for _ in records:
                self._queue.task_done()

    async def flush(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except asyncio.TimeoutError:
            log.warning("history not fully flushed", pending=self._queue.qsize())

    async def stop(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
