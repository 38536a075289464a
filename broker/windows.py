"""Reading a stream newest first, a window at a time, through short-lived consumers.

``broker.direct`` pages streams with batched direct gets, which need ``allow_direct``; HISTORY
and LOGS do not have it (their configs stay as deployed), so they are read through ephemeral
pull consumers, which give two things a direct get does not:

- a consumer created at a sequence or a time says, before it delivers anything, which sequence
  it starts at and how many messages matching its subject filters lie from there to the end of
  the stream (``num_pending``, from the server's per-subject index): the number of matches
  between two sequences costs two consumer creations, whatever the filters, so a page has an
  exact total and a window of about N matches is found by a few of them;
- it then delivers exactly the matches of its window, in one pull.

A consumer lives for one read: deleted right after (a publish, no reply awaited), and it would
expire by itself after ``INACTIVE_S``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

INACTIVE_S = 10  # a consumer whose delete was lost goes away by itself after this
MAX_PULL_BYTES = 8 * 1024 * 1024  # per pull: a window of large records comes in several
_NS = 1_000_000_000


class WindowError(RuntimeError):
    """The server refused or did not answer a request (no such stream, JetStream unavailable)."""


@dataclass(frozen=True, slots=True)
class Stored:
    seq: int
    subject: str
    data: bytes
    time: float  # when the stream stored it, seconds since the epoch


@dataclass(frozen=True, slots=True)
class Bounds:
    first: int
    last: int
    dense: bool  # no message deleted between first and last: counts need no consumer


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat()


def _position(reply: str) -> tuple[int, float]:
    """Stream sequence and time from a delivered message's ack subject (v1 and v2 forms)."""
    tokens = reply.split(".")
    seq, ns = (tokens[5], tokens[7]) if len(tokens) == 9 else (tokens[7], tokens[9])
    return int(seq), int(ns) / _NS


class Windows:
    """Counts, time lookups and reads of one stream's messages that match subject filters
    (an empty list of filters: every message)."""

    def __init__(self, nc: Client, stream: str, *, timeout: float = 5.0) -> None:
        self.nc = nc
        self.stream = stream
        self.timeout = timeout

    async def _api(self, subject: str, body: dict | None = None) -> dict:
        try:
            msg = await self.nc.request(subject, json.dumps(body).encode() if body else b"", timeout=self.timeout)
        except NatsTimeout:
            raise WindowError(f"no answer from JetStream within {self.timeout:g} s") from None
        except Exception as exc:  # no responders (JetStream off), a lost link: the caller says "unavailable"
            raise WindowError(f"{type(exc).__name__}: {exc}") from None
        answer = json.loads(msg.data)
        if "error" in answer:
            raise WindowError(answer["error"].get("description", "JetStream error"))
        return answer

    async def bounds(self) -> Bounds:
        state = (await self._api(f"$JS.API.STREAM.INFO.{self.stream}"))["state"]
        first, last = max(1, state.get("first_seq", 1)), state.get("last_seq", 0)
        return Bounds(first, last, not state.get("num_deleted"))

    async def _consumer(self, filters: Sequence[str], *, seq: int | None = None, when: float | None = None) -> dict:
        config: dict = {
            "ack_policy": "none",
            "inactive_threshold": INACTIVE_S * _NS,
            "mem_storage": True,
            "num_replicas": 1,
        }
        if when is not None:
            config.update(deliver_policy="by_start_time", opt_start_time=_iso(when))
        else:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=max(1, seq or 1))
        if len(filters) == 1:
            config["filter_subject"] = filters[0]
        elif filters:
            config["filter_subjects"] = list(filters)
        return await self._api(
            f"$JS.API.CONSUMER.CREATE.{self.stream}", {"stream_name": self.stream, "config": config, "action": "create"}
        )

    async def _delete(self, name: str) -> None:
        try:
            await self.nc.publish(f"$JS.API.CONSUMER.DELETE.{self.stream}.{name}", b"")
        except Exception:  # the consumer expires by itself after INACTIVE_S
            return

    async def count_from(self, filters: Sequence[str], seq: int, bounds: Bounds | None = None) -> int:
        """Matches with a sequence of ``seq`` or more."""
        if not filters and bounds is not None and bounds.dense:
            return max(0, bounds.last - max(seq, bounds.first) + 1)
        answer = await self._consumer(filters, seq=seq)
        await self._delete(answer["name"])
        return answer["num_pending"]

    async def seq_at(self, when: float) -> int:
        """The first sequence stored at or after ``when`` (the last sequence + 1 when none is)."""
        answer = await self._consumer((), when=when)
        await self._delete(answer["name"])
        return answer["delivered"]["stream_seq"] + 1

    async def get(self, seq: int) -> Stored | None:
        """The message with sequence ``seq``; None when there is none (never was, or expired)."""
        try:
            answer = await self._api(f"$JS.API.STREAM.MSG.GET.{self.stream}", {"seq": seq})
        except WindowError as exc:
            if "not found" in str(exc).lower():
                return None
            raise
        message = answer["message"]
        when = datetime.datetime.fromisoformat(message["time"].replace("Z", "+00:00")).timestamp()
        return Stored(message["seq"], message["subject"], base64.b64decode(message.get("data", "")), when)

    async def read(self, filters: Sequence[str], start: int, count: int) -> list[Stored]:
        """Up to ``count`` matches from sequence ``start`` on, oldest first."""
        if count <= 0:
            return []
        answer = await self._consumer(filters, seq=start)
        name = answer["name"]
        found: list[Stored] = []
        try:
            while len(found) < count:
                if not await self._pull(name, count - len(found), found):
                    break
        finally:
            await self._delete(name)
        return found

    async def _pull(self, name: str, batch: int, found: list[Stored]) -> bool:
        """One pull of up to ``batch`` messages into ``found``; False when the stream has no more."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        before, wanted = len(found), len(found) + batch
        more = True

        async def collect(msg: Msg) -> None:
            nonlocal more
            if done.done():
                return
            status = msg.headers.get("Status") if msg.headers else None
            if status:
                more = status == "409" and "MaxBytes" in str(msg.headers)  # a full pull, not the end
                done.set_result(None)
                return
            seq, when = _position(msg.reply)
            found.append(Stored(seq, msg.subject, msg.data, when))
            if len(found) >= wanted:
                done.set_result(None)

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=collect)
        try:
            request = {"batch": batch, "no_wait": True, "max_bytes": MAX_PULL_BYTES}
            await self.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{name}", json.dumps(request).encode(), reply=inbox
            )
            try:
                await asyncio.wait_for(done, self.timeout)
            except TimeoutError:
                raise WindowError(f"{self.stream}: no messages within {self.timeout:g} s") from None
        finally:
            await sub.unsubscribe()
        return more and before < len(found) < wanted  # a pull that brought nothing ends the read

    async def span(self, filters: Sequence[str], lo: int, hi: int, bounds: Bounds | None = None) -> tuple[int, int]:
        """``(matches after hi, matches from lo to hi)``."""
        after = await self.count_from(filters, hi + 1, bounds)
        return after, max(0, await self.count_from(filters, lo, bounds) - after)

    async def newest_first(
        self,
        filters: Sequence[str],
        lo: int,
        hi: int,
        *,
        chunk: int,
        bounds: Bounds | None = None,
        span: tuple[int, int] | None = None,
    ) -> AsyncIterator[list[Stored]]:
        """The matches with ``lo <= seq <= hi``, newest first, in windows of about ``chunk`` to
        ``2 * chunk`` (each one pull); ``span``: what :meth:`span` said of ``lo`` and ``hi``."""
        if hi < lo:
            return
        after, remaining = span if span is not None else await self.span(filters, lo, hi, bounds)
        upper = hi
        while remaining > 0 and upper >= lo:
            if remaining <= 2 * chunk:
                start, count = lo, remaining
            else:
                start, count = await self._window(filters, lo, upper, after, remaining, chunk, bounds)
            window = [msg for msg in await self.read(filters, start, count) if msg.seq <= upper]
            window.reverse()
            if window:
                yield window
            after += len(window)
            remaining -= len(window)
            upper = start - 1

    async def _window(
        self, filters: Sequence[str], lo: int, upper: int, after: int, remaining: int, chunk: int, bounds: Bounds | None
    ) -> tuple[int, int]:
        """A start in ``[lo, upper]`` whose window ``[start, upper]`` holds ``chunk`` to
        ``2 * chunk`` matches, by interpolation on counts (a few consumer creations); with its count."""
        low, high = lo, upper
        start = max(lo, upper + 1 - (upper - lo + 1) * 3 * chunk // (2 * remaining))
        best = (lo, remaining)
        for attempt in range(24):
            count = await self.count_from(filters, start, bounds) - after
            best = (start, count)
            if chunk <= count <= 2 * chunk:
                break
            if count < chunk:
                high = start - 1
            else:
                low = start + 1
            if low > high:
                break
            if attempt < 3:  # interpolation first (matches spread evenly), bisection after (clustered)
                width = upper - start + 1
                guess = upper + 1 - width * 3 * chunk // (2 * count) if count else start - 4 * width
            else:
                guess = (low + high) // 2
            start = min(max(guess, low), high)
        return best
