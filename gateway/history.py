"""Appends one record per request to the HISTORY stream, off the request path.

Records are queued and published by one background task, a batch at a time with their acks
awaited together, so a slow JetStream write never adds latency to an answer. A record whose
write fails (the broker is restarting, a cluster is electing a leader) is kept and written
again once the connection is back; each carries its id as ``Nats-Msg-Id``, so a retry after
a lost ack is stored once (the stream's duplicate window). The backlog is bounded: when it is
full the oldest records are counted as dropped and logged, rather than growing memory without
limit.
"""

from __future__ import annotations

import asyncio
from collections import deque

import structlog
from nats.aio.client import Client

from events import codec, subjects
from events.messages import HistoryRecord

log = structlog.get_logger("gateway.history")

RETRY_S = 0.5  # between attempts while writes fail


class HistoryWriter:
    def __init__(self, nc: Client, *, max_pending: int = 10_000, batch: int = 128, timeout: float = 5.0) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=timeout)
        self.batch = batch
        self.max_pending = max_pending
        self.dropped = 0
        self.retried = 0
        self._pending: deque[HistoryRecord] = deque()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="history-writer")

    def append(self, record: HistoryRecord) -> None:
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("history backlog full, oldest records dropped", dropped=self.dropped)
        self._pending.append(record)
        self._idle.clear()
        self._ready.set()

    async def _publish(self, record: HistoryRecord) -> None:
        await self.js.publish(subjects.history(record.capability, record.model), codec.encode(record),
                              headers={"Nats-Msg-Id": record.id})

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._idle.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            if not self.nc.is_connected:
                await asyncio.sleep(RETRY_S / 5)
                continue
            records = [self._pending.popleft() for _ in range(min(self.batch, len(self._pending)))]
            results = await asyncio.gather(*(self._publish(r) for r in records), return_exceptions=True)
            failed = [record for record, result in zip(records, results) if isinstance(result, Exception)]
            if failed:
                self.retried += len(failed)
                log.warning("history records not stored yet, retrying", count=len(failed),
                            error=str(next(r for r in results if isinstance(r, Exception))))
                self._pending.extendleft(reversed(failed))  # first in, first written
                while len(self._pending) > self.max_pending:
                    self._pending.popleft()
                    self.dropped += 1
                await asyncio.sleep(RETRY_S)

    async def flush(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("history not fully flushed", pending=len(self._pending))

    async def stop(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
