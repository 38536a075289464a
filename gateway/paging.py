"""Pages of a stream's records, newest first or oldest first, for the read APIs (history, logs).

Both read through :class:`broker.windows.Windows` and differ only in what a stored message
becomes (a :class:`Scan`'s ``row``: a dict, or None when the message is not wanted, such as one
whose text does not match); its ``chunk`` is how many matches of the subject filters one read
takes when ``row`` may drop some.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from broker.windows import Bounds, Stored, Windows

Row = Callable[[Stored], dict[str, Any] | None]


@dataclass(frozen=True)
class Scan:
    """What one read API pages through: the subject filters, what a message becomes, how many
    records one page may read, and how many matches a read takes."""

    windows: Windows
    filters: Sequence[str]
    row: Row
    max_scan: int
    chunk: int | None = None  # None: every match is a row, so a read takes just what the page lacks


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    more: bool  # older records (backward) or newer ones (forward) may follow
    edge: int  # backward: the oldest sequence read (the next page's "before"); forward: the newest


async def backward(
    scan: Scan, lo: int, hi: int, *, limit: int, bounds: Bounds | None = None, span: tuple[int, int] | None = None
) -> Page:
    """Up to ``limit`` rows of the matches from ``hi`` down to ``lo``, reading at most ``max_scan``."""
    windows, filters, row, max_scan = scan.windows, scan.filters, scan.row, scan.max_scan
    span = span if span is not None else await windows.span(filters, lo, hi, bounds)
    rows: list[dict[str, Any]] = []
    scanned, oldest = 0, hi + 1
    found = windows.newest_first(filters, lo, hi, chunk=scan.chunk or limit, bounds=bounds, span=span)
    async with aclosing(found) as windows_:
        async for window in windows_:
            for msg in window:
                scanned, oldest = scanned + 1, msg.seq
                made = row(msg)
                if made is not None:
                    rows.append(made)
                if len(rows) == limit or scanned >= max_scan:
                    return Page(rows, span[1] > scanned, oldest)
    return Page(rows, span[1] > scanned, oldest)


async def forward(scan: Scan, after: int, lo: int, hi: int, *, limit: int) -> Page:
    """Up to ``limit`` rows of the matches after ``after`` (and from ``lo``) up to ``hi``, oldest first."""
    start, last, scanned, rows = max(lo, after + 1), after, 0, []
    while len(rows) < limit and scanned < scan.max_scan:
        batch = scan.chunk or limit - len(rows)
        found = [msg for msg in await scan.windows.read(scan.filters, start, batch) if msg.seq <= hi]
        for msg in found:
            scanned, last = scanned + 1, msg.seq
            made = scan.row(msg)
            if made is not None:
                rows.append(made)
            if len(rows) == limit:
                break
        if len(found) < batch:
            return Page(rows, False, last)  # nothing newer matches yet
        start = last + 1
    return Page(rows, last < hi, last)
