"""Login throttling, per username and per client address: password guessing gets slow.

In memory, per gateway: N gateways behind a balancer allow up to N times the attempts (their
tables are not shared; a KV round trip per attempt would cost more than the guess it slows).
The numbers below still keep guessing at a few dozen tries an hour per user.

Every attempt counts as a failure when it starts (so parallel attempts cannot all slip in before
the first one fails) and a success takes its own count back. ``limit`` failures within
``window_s`` lock the name (or address) for ``first_lock_s``; while failures keep coming, each
further lock is twice as long (up to ``max_lock_s``); a quiet window forgets them. A success
clears the username's record entirely, and takes back only its own attempt from the address's:
otherwise logging in to one's own account would launder guesses at everyone else's.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_ENTRIES = 100_000  # names and addresses remembered; beyond it, the oldest are forgotten


def address_key(host: str) -> str:
    """What an address is counted as: itself, or for IPv6 its /64 (one machine often has a whole
    /64 to pick addresses from)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


@dataclass
class _Record:
    limit: int
    times: deque[float] = field(init=False)
    strikes: int = 0  # locks in the current run of failures
    locked_until: float = 0.0
    armed_at: float | None = None  # the attempt that set the current lock
    lock_before: tuple[int, float] = (0, 0.0)  # strikes and lock before that attempt (for a success to undo)

    def __post_init__(self) -> None:
        self.times = deque(maxlen=self.limit)


@dataclass(frozen=True)
class Attempt:
    user: str
    address: str
    at: float


class LoginThrottle:
    def __init__(
        self,
        *,
        per_user: int = 5,
        per_address: int = 20,
        window_s: float = 300.0,
        first_lock_s: float = 30.0,
        max_lock_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_user, self.per_address = per_user, per_address
        self.window_s, self.first_lock_s, self.max_lock_s = window_s, first_lock_s, max_lock_s
        self.clock = clock
        self._records: dict[tuple[str, str], _Record] = {}

    def begin(self, user: str, address: str) -> tuple[Attempt | None, int]:
        """``(attempt, 0)`` when the attempt may go on (counted as a failure until
        :meth:`succeeded`), else ``(None, seconds to wait)``."""
        now = self.clock()
        address = address_key(address)
        keys = (("user", user, self.per_user), ("address", address, self.per_address))
        records = [self._record(kind, name, limit, now) for kind, name, limit in keys]
        wait = max(record.locked_until - now for record in records)
        if wait > 0:
            return None, math.ceil(wait)
        for record in records:
            self._count(record, now)
        return Attempt(user, address, now), 0

    def succeeded(self, attempt: Attempt) -> None:
        self._records.pop(("user", attempt.user), None)
        record = self._records.get(("address", attempt.address))
        if record is None:
            return
        if attempt.at in record.times:  # else pushed out by later attempts: nothing to take back
            record.times.remove(attempt.at)
        if record.armed_at == attempt.at:
            (record.strikes, record.locked_until), record.armed_at = record.lock_before, None

    def _record(self, kind: str, name: str, limit: int, now: float) -> _Record:
        key = (kind, name)
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= MAX_ENTRIES:
                self._records.pop(next(iter(self._records)))
            record = self._records[key] = _Record(limit)
        while record.times and record.times[0] <= now - self.window_s:
            record.times.popleft()
        if not record.times and now >= record.locked_until + self.window_s:
            record.strikes = 0  # a quiet window: the run of failures is over
        return record

    def _count(self, record: _Record, now: float) -> None:
        record.times.append(now)
        if len(record.times) >= record.limit:
            record.lock_before = (record.strikes, record.locked_until)
            record.strikes += 1
            lock = min(self.max_lock_s, self.first_lock_s * 2 ** (record.strikes - 1))
            record.locked_until, record.armed_at = now + lock, now
