"""This process's log records as JSON lines in files of one day each, kept a few days.

``<dir>/<stem>.jsonl.<YYYY-MM-DD>`` (the UTC day of each record), one file per component kind
that runs here (``up``, ``gateway``, ``registry``, ``node``), so several processes sharing a data
dir do not write the same file. A record goes to the file of its own day: the first record of a
new day opens that day's file, and files older than ``retention_days`` days (the day of the
newest record written counting as the first) are deleted then, and at start.

A thread writes them: structlog's processor only appends to a bounded buffer (records beyond it
are dropped and counted), so a slow disk never holds an event loop.
"""

from __future__ import annotations

import atexit
import datetime
import re
import threading
from collections import deque
from pathlib import Path
from typing import IO

import structlog

from broker.logship import SHIPPER, Entry, record_of
from events import codec

_DATED = re.compile(r"^(?P<stem>.+)\.jsonl\.(?P<day>[0-9]{4}-[0-9]{2}-[0-9]{2})$")


def day_of(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).date().isoformat()


class DailyFiles:
    def __init__(
        self, directory: Path, stem: str, retention_days: int = 7, *, max_pending: int = 50_000, interval: float = 0.25
    ) -> None:
        self.directory = Path(directory)
        self.stem = stem
        self.retention_days = max(1, retention_days)
        self.max_pending = max_pending
        self.interval = interval
        self.written = 0
        self.dropped = 0
        self._pending: deque[Entry] = deque()
        self._file: IO[bytes] | None = None
        self._day: str | None = None
        self._wake = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()  # one writer at a time: the thread, or flush() at exit
        self._thread = threading.Thread(target=self._run, name="log-files", daemon=True)

    def path(self, day: str) -> Path:
        return self.directory / f"{self.stem}.jsonl.{day}"

    def start(self, now: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prune(day_of(now))
        self._thread.start()
        atexit.register(self.stop)

    def emit(self, entry: Entry) -> None:
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(entry)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write what is buffered (the thread does it every ``interval``; at exit, whoever calls)."""
        with self._lock:
            try:
                while self._pending:
                    lines: list[bytes] = []
                    day = day_of(self._pending[0][0])
                    while self._pending and len(lines) < 1000 and day_of(self._pending[0][0]) == day:
                        lines.append(codec.encode(record_of(self._pending.popleft(), SHIPPER.identity)) + b"\n")
                    self._write(day, b"".join(lines))
            except OSError as exc:  # a full or read-only disk: say so on the console, keep serving
                self.dropped += 1
                structlog.get_logger("llm_router.logs").error(
                    "log file not written", path=str(self.directory), error=str(exc)
                )

    def _write(self, day: str, data: bytes) -> None:
        if day != self._day:
            if self._file is not None:
                self._file.close()
            self._file, self._day = open(self.path(day), "ab"), day  # noqa: SIM115 - kept open for the day
            self.prune(day)
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        self.written += data.count(b"\n")

    def prune(self, today: str) -> None:
        """Delete this stem's files of days more than ``retention_days - 1`` before ``today``."""
        oldest = (datetime.date.fromisoformat(today) - datetime.timedelta(days=self.retention_days - 1)).isoformat()
        for path in self.directory.glob(f"{self.stem}.jsonl.*"):
            match = _DATED.match(path.name)
            if match and match["stem"] == self.stem and match["day"] < oldest:
                path.unlink(missing_ok=True)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self.flush()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                self._day = None
