"""Appends one record per request to the HISTORY stream, off the request path.

Records are queued and published by one background task. Each is a plain publish whose
reply subject is one of ours: JetStream's acknowledgement comes back on one wildcard
subscription, so a record costs one message out and one in, with no future, timer or task of
its own (``js.publish`` would make each a request with its own timeout), and a slow JetStream
write never adds latency to an answer.

A record whose write fails or is not acknowledged in time (the broker is restarting, a cluster
is electing a leader) is kept and written again once the connection is back; each carries its
id as ``Nats-Msg-Id``, so a retry after a lost acknowledgement is stored once (the stream's
duplicate window). The backlog is bounded: when it is full the oldest records are counted as
dropped and logged, rather than growing memory without limit.

Observers (``observe``) see every record once, as it is appended and before it is written: the
usage meter counts tokens and adds the cost there (gateway/usage.py); metrics can hook in the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from events import codec, subjects
from events.messages import HistoryRecord

log = structlog.get_logger("gateway.history")

RETRY_S = 0.5  # pause after a failed write before the next attempt
MAX_UNACKED = 2048  # records sent and not acknowledged yet; more wait in the backlog


class HistoryWriter:
    def __init__(self, nc: Client, *, max_pending: int = 10_000, ack_timeout: float = 5.0) -> None:
        self.nc = nc
        self.max_pending = max_pending
        self.ack_timeout = ack_timeout
        self.dropped = 0
        self.retried = 0
        self._pending: deque[HistoryRecord] = deque()
        self._unacked: dict[str, tuple[HistoryRecord, float]] = {}
        self._inbox = nc.new_inbox()
        self._seq = itertools.count()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task] = []
        self._sub = None
        self._pause_until = 0.0  # after refused writes, the next attempt waits until then
        self._observers: list[Callable[[HistoryRecord], None]] = []

    def observe(self, observer: Callable[[HistoryRecord], None]) -> None:
        """Call ``observer(record)`` for every record appended (it may complete the record, e.g. its cost)."""
        self._observers.append(observer)

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._unacked)

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        self._tasks = [
            asyncio.create_task(self._run(), name="history-writer"),
            asyncio.create_task(self._expire(), name="history-acks"),
        ]

    def append(self, record: HistoryRecord) -> None:
        for observer in self._observers:
            try:
                observer(record)
            except Exception:  # an observer's bug must not lose the record
                log.exception("history observer failed", observer=getattr(observer, "__qualname__", repr(observer)))
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("history backlog full, oldest records dropped", dropped=self.dropped)
        self._pending.append(record)
        self._idle.clear()
        self._ready.set()

    async def _run(self) -> None:
        while True:
            if not self._pending or len(self._unacked) >= MAX_UNACKED:
                self._settle()
                self._ready.clear()
                await self._ready.wait()
                continue
            if not self.nc.is_connected:
                await asyncio.sleep(RETRY_S / 5)
                continue
            pause = self._pause_until - time.monotonic()
            if pause > 0:  # writes were refused a moment ago: do not spin on them
                await asyncio.sleep(pause)
                continue
            record = self._pending.popleft()
            seq = next(self._seq)
            if seq % 64 == 0:
                await asyncio.sleep(0)  # a long backlog must not starve the requests being served
            reply = f"{self._inbox}.{seq}"
            self._unacked[reply] = (record, time.monotonic())
            try:
                await self.nc.publish(
                    subjects.history(record.capability, record.model),
                    codec.encode(record),
                    reply=reply,
                    headers={"Nats-Msg-Id": record.id},
                )
            except Exception as exc:  # the link dropped under us: keep the record, try again
                self._unacked.pop(reply, None)
                self._retry([record], str(exc))

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._unacked.pop(msg.subject, None)
        if entry is None:
            return  # acknowledged after it was given up on: it was retried, and stored once
        failed = (msg.headers and msg.headers.get("Status") == "503") or b'"error"' in msg.data
        if failed:
            self._retry([entry[0]], msg.data.decode(errors="replace") or "no responders (no HISTORY stream)")
        self._wake()

    async def _expire(self) -> None:
        """Records not acknowledged within ``ack_timeout`` go back to the backlog."""
        while True:
            await asyncio.sleep(1.0)
            cutoff = time.monotonic() - self.ack_timeout
            late = [reply for reply, (_, sent) in self._unacked.items() if sent < cutoff]
            if late:
                self._retry([self._unacked.pop(reply)[0] for reply in late], "not acknowledged in time")
                self._wake()

    def _retry(self, records: list[HistoryRecord], error: str) -> None:
        self.retried += len(records)
        now = time.monotonic()
        if now >= self._pause_until:  # one warning per pause, not one per refused record
            log.warning("history records not stored yet, retrying", count=len(records), error=error[:200])
        self._pause_until = now + RETRY_S
        self._pending.extendleft(reversed(records))  # first in, first written
        while len(self._pending) > self.max_pending:
            self._pending.popleft()
            self.dropped += 1

    def _wake(self) -> None:
        if self._pending:
            self._ready.set()
        else:
            self._settle()

    def _settle(self) -> None:
        if not self._pending and not self._unacked:
            self._idle.set()

    async def flush(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("history not fully flushed", pending=self.pending)

    async def stop(self) -> None:
        await self.flush()
        for task in self._tasks:
            task.cancel()
        if self._sub is not None:
            await self._sub.unsubscribe()
