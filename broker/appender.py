"""Appends records to a JetStream stream off the caller's path: the gateway's history, the audit log.

Records are queued and published by one background task. Each is a plain publish whose
reply subject is one of ours: JetStream's acknowledgement comes back on one wildcard
subscription, so a record costs one message out and one in, with no future, timer or task of
its own (``js.publish`` would make each a request with its own timeout), and a slow JetStream
write never adds latency to whoever appended it.

A record whose write fails or is not acknowledged in time (the broker is restarting, a cluster
is electing a leader) is kept and written again once the connection is back; each carries its
id as ``Nats-Msg-Id``, so a retry after a lost acknowledgement is stored once (the stream's
duplicate window). The backlog is bounded: when it is full the oldest records are counted as
dropped and logged, rather than growing memory without limit.

A subclass says where a record goes (:meth:`StreamAppender.subject`) and what its id is
(:meth:`StreamAppender.msg_id`); it may change what is stored (:meth:`StreamAppender.encode`,
run by the background task, never on the caller's path) and learn each record's sequence once
it is stored (:meth:`StreamAppender.stored`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from events import codec

log = structlog.get_logger("broker.appender")


class _Ack(msgspec.Struct):
    seq: int = 0


RETRY_S = 0.5  # pause after a failed write before the next attempt
MAX_UNACKED = 2048  # records sent and not acknowledged yet; more wait in the backlog


_decode_ack = msgspec.json.Decoder(_Ack).decode


class StreamAppender:
    stream = "a stream"  # for log lines

    def __init__(self, nc: Client, *, max_pending: int = 10_000, ack_timeout: float = 5.0) -> None:
        self.nc = nc
        self.max_pending = max_pending
        self.ack_timeout = ack_timeout
        self.dropped = 0
        self.retried = 0
        self._pending: deque[Any] = deque()
        self._unacked: dict[str, tuple[Any, float]] = {}
        self._inbox = nc.new_inbox()
        self._seq = itertools.count()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task] = []
        self._sub = None
        self._pause_until = 0.0  # after refused writes, the next attempt waits until then
        self._wants_seq = type(self).stored is not StreamAppender.stored

    def subject(self, record: Any) -> str:
        raise NotImplementedError

    def msg_id(self, record: Any) -> str:
        return record.id

    def encode(self, record: Any) -> bytes:
        return codec.encode(record)

    async def stored(self, record: Any, seq: int) -> None:
        """Called with each record's stream sequence once JetStream acknowledged it."""

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._unacked)

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        name = self.stream.lower()
        self._tasks = [
            asyncio.create_task(self._run(), name=f"{name}-writer"),
            asyncio.create_task(self._expire(), name=f"{name}-acks"),
        ]

    def append(self, record: Any) -> None:
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("backlog full, oldest records dropped", stream=self.stream, dropped=self.dropped)
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
            try:
                subject, payload, headers = (
                    self.subject(record),
                    self.encode(record),
                    {"Nats-Msg-Id": self.msg_id(record)},
                )
            except Exception as exc:  # a record no retry could write: drop it rather than loop on it
                self.dropped += 1
                log.error("unwritable record dropped", stream=self.stream, error=repr(exc)[:200])
                continue
            reply = f"{self._inbox}.{seq}"
            self._unacked[reply] = (record, time.monotonic())
            try:
                await self.nc.publish(subject, payload, reply=reply, headers=headers)
            except Exception as exc:  # the link dropped under us: keep the record, try again
                self._unacked.pop(reply, None)
                self._retry([record], str(exc))

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._unacked.pop(msg.subject, None)
        if entry is None:
            return  # acknowledged after it was given up on: it was retried, and stored once
        failed = (msg.headers and msg.headers.get("Status") == "503") or b'"error"' in msg.data
        if failed:
            self._retry([entry[0]], msg.data.decode(errors="replace") or f"no responders (no {self.stream} stream)")
        elif self._wants_seq:
            try:
                await self.stored(entry[0], _decode_ack(msg.data).seq)
            except Exception as exc:  # a hook's failure must not stop acknowledgements
                log.error("stored hook failed", stream=self.stream, error=repr(exc)[:200])
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

    def _retry(self, records: list[Any], error: str) -> None:
        self.retried += len(records)
        now = time.monotonic()
        if now >= self._pause_until:  # one warning per pause, not one per refused record
            log.warning("records not stored yet, retrying", stream=self.stream, count=len(records), error=error[:200])
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
            log.warning("records not fully flushed", stream=self.stream, pending=self.pending)

    async def stop(self) -> None:
        await self.flush()
        for task in self._tasks:
            task.cancel()
        if self._sub is not None:
            await self._sub.unsubscribe()
