"""Reading a run of stream messages in one round trip: JetStream's batched direct get.

``$JS.API.DIRECT.GET.<stream>`` with ``{"seq": N, "batch": B, "next_by_subj": filter}`` answers
with up to B messages at or after sequence N that match the filter (the server walks its
per-subject index, so a sparse filter costs no scan here), then an end-of-batch status. No
consumer is created, so paging a stream from any sequence is cheap. Needs a stream with
``allow_direct`` and nats-server 2.11 or later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout

MAX_BATCH = 1000  # per request; a record of a few hundred bytes keeps an answer well under a MB


@dataclass(frozen=True, slots=True)
class StoredMsg:
    seq: int
    subject: str
    data: bytes


class DirectGetError(RuntimeError):
    """The server refused the request (a stream without direct gets, a server older than 2.11)."""


async def direct_batch(
    nc: Client, stream: str, seq: int, batch: int, subject: str | None = None, *, timeout: float = 5.0
) -> list[StoredMsg]:
    """Up to ``batch`` (at most :data:`MAX_BATCH`) messages from sequence ``seq`` on, matching ``subject``."""
    request: dict = {"seq": max(1, seq), "batch": max(1, min(batch, MAX_BATCH))}
    if subject:
        request["next_by_subj"] = subject
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    found: list[StoredMsg] = []
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
        while True:
            try:
                msg = await sub.next_msg(timeout)
            except NatsTimeout:
                raise DirectGetError(
                    f"no end of batch from {stream} within {timeout:g} s (nats-server < 2.11?)"
                ) from None
            headers = msg.headers or {}
            status = headers.get("Status")
            if status in ("204", "404"):  # end of the batch; nothing (more) at or after seq
                return found
            if status:
                raise DirectGetError(f"direct get on {stream}: {status} {headers.get('Description', '')}".strip())
            found.append(StoredMsg(int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data))
    finally:
        await sub.unsubscribe()


async def read_range(nc: Client, stream: str, start: int, end: int, subject: str | None = None) -> list[StoredMsg]:
    """The messages with sequence ``start`` to ``end`` (inclusive) that match ``subject``, oldest first."""
    found: list[StoredMsg] = []
    seq = start
    while seq <= end:
        batch = min(end - seq + 1, MAX_BATCH)
        got = await direct_batch(nc, stream, seq, batch, subject)
        found += [msg for msg in got if msg.seq <= end]
        if len(got) < batch or not got or got[-1].seq >= end:
            return found  # the end of the range, or no further match in the whole stream
        seq = got[-1].seq + 1
    return found


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[StoredMsg]  # newest first
    next_before: int | None  # pass as ``before`` for the next (older) page; None: nothing older


async def newest_first(
    nc: Client,
    js: Any,
    stream: str,
    *,
    limit: int,
    before: int | None = None,
    subject: str | None = None,
    max_scan: int = 100_000,
) -> Page:
    """Up to ``limit`` messages matching ``subject`` with sequence below ``before``, newest first.

    Reads backwards in windows of sequences, each window one batched direct get (or a few):
    without a filter one window of ``limit`` is the page; with one, windows grow fourfold while
    matches are sparse. At most ``max_scan`` sequences are walked per page; a page cut short there
    still has a ``next_before``, so a client keeps paging."""
    state = (await js.stream_info(stream)).state
    first, upper = max(1, state.first_seq), state.last_seq
    if before is not None:
        upper = min(upper, before - 1)
    window = limit if subject is None else max(limit, 256)
    found: list[StoredMsg] = []
    scanned = 0
    while upper >= first and len(found) < limit and scanned < max_scan:
        start = max(first, upper - window + 1)
        found += reversed(await read_range(nc, stream, start, upper, subject))
        scanned += upper - start + 1
        upper = start - 1
        window = min(window * 4, 16 * MAX_BATCH)
    page = found[:limit]
    if len(found) > limit or (upper >= first and len(found) == limit):
        return Page(page, page[-1].seq)
    return Page(page, upper + 1 if upper >= first else None)
