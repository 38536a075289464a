"""Token and cost counters: every answered request adds to its day's counters in the ``usage`` bucket.

Why counters and not a scan of HISTORY: the stream keeps 7 days, and a month's usage must be
answered in milliseconds, so each gateway adds each successful record (tokens, and a cost from
the price table) to an in-memory delta per (UTC day, provider, model, API key) and writes the
deltas every ``flush_s`` seconds with a compare-and-set per key (several gateways add to the
same keys). Every gateway mirrors the bucket (100 days of days), so ``GET /v0/usage`` adds up
at most a month of days from memory. What a gateway counted but has not written yet (at most
``flush_s``) is written before it answers.

The meter observes the history writer (``HistoryWriter.observe``): every record the Exchange
makes, local or cloud, passes through :meth:`UsageMeter.count` once. It is also where a
record gets its ``cost_usd``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from broker.mirrors import BucketWatch
from events import codec, storage
from events.messages import HistoryRecord, UsageDay

from .providers.prices import PriceTable

log = structlog.get_logger("gateway.usage")

FLUSH_S = 2.0
CAS_TRIES = 8
LOCAL = "local"
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "unpriced")


def utc_day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def add_to(total: UsageDay, delta: UsageDay) -> None:
    for name in COUNTERS:
        setattr(total, name, getattr(total, name) + getattr(delta, name))


class UsageMeter(BucketWatch):
    bucket = storage.KV_USAGE
    record_type = UsageDay
    record_kind = "usage counters"

    def __init__(self, prices: PriceTable, *, flush_s: float = FLUSH_S) -> None:
        super().__init__()
        self.prices = prices
        self.flush_s = flush_s
        self.days: dict[str, UsageDay] = {}  # the bucket, by key
        self._pending: dict[str, UsageDay] = {}
        self._keys: dict[tuple[str, str, str, str | None], str] = {}  # (day, provider, model, key id) -> bucket key
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task | None = None

    # ------------------------------------------------------------ the mirror

    def _new_tables(self) -> dict[str, UsageDay]:
        return {}

    def _swap_in(self, tables: dict[str, UsageDay]) -> None:
        self.days = tables

    def _live(self) -> dict[str, UsageDay]:
        return self.days

    def _put(self, entry: Any, record: UsageDay, tables: dict[str, UsageDay], live: bool) -> None:
        tables[entry.key] = record

    def _drop(self, entry: Any, tables: dict[str, UsageDay], live: bool) -> None:
        tables.pop(entry.key, None)

    async def start(self, js: Any) -> None:
        await super().start(js)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="usage-flush")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.flush()
        await super().stop()

    # ------------------------------------------------------------ counting

    def count(self, record: HistoryRecord) -> None:
        """Add an answered request (2xx with token usage) to its day; give the record its cost."""
        usage = record.usage
        if usage is None or not 200 <= record.status_code < 300:
            return
        provider = record.provider or LOCAL
        model = record.model.partition(":")[2] if record.provider else record.model  # unprefixed, for prices
        if record.cost_usd is None:
            record.cost_usd = self.prices.cost(provider, model, usage)
        day = utc_day(record.started_at)
        names = (day, provider, record.model, record.key_id)
        key = self._keys.get(names)
        if key is None:  # the same few keys for every request of a day: encoded once
            if len(self._keys) > 10_000:
                self._keys.clear()
            key = self._keys[names] = storage.usage_key(*names)
        delta = self._pending.get(key)
        if delta is None:
            delta = self._pending[key] = UsageDay(day=day, provider=provider, model=record.model, key_id=record.key_id)
        delta.requests += 1
        delta.prompt_tokens += usage.prompt_tokens
        delta.completion_tokens += usage.completion_tokens
        delta.total_tokens += usage.total_tokens
        if record.cost_usd is None:
            delta.unpriced += 1
        else:
            delta.cost_usd += record.cost_usd

    # ------------------------------------------------------------ writing

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush(self) -> None:
        """Write every pending delta; one that cannot be written now is kept for the next flush."""
        async with self._lock:
            pending, self._pending = self._pending, {}
            for key, delta in pending.items():
                try:
                    await self._add(key, delta)
                except Exception as exc:  # NATS away or a contended key: keep the counts, try again later
                    log.warning("usage counters not written yet", key=key, error=str(exc))
                    kept = self._pending.get(key)
                    if kept is None:
                        self._pending[key] = delta
                    else:
                        add_to(kept, delta)

    async def _add(self, key: str, delta: UsageDay) -> None:
        for _ in range(CAS_TRIES):
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                try:
                    await self.kv.create(key, codec.encode(delta))
                except KeyWrongLastSequenceError:
                    continue  # another gateway made it first: add to theirs
                self.days[key] = msgspec.structs.replace(delta)
                return
            total = codec.decode(entry.value, UsageDay)
            add_to(total, delta)
            try:
                await self.kv.update(key, codec.encode(total), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            self.days[key] = total  # before the watcher says so
            return
        raise RuntimeError(f"usage key changed {CAS_TRIES} times while being written")
