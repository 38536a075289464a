"""structlog set-up: readable console lines on a terminal (JSON lines otherwise), and every record
also to the LOGS stream (:mod:`broker.logship`) and to daily JSON-lines files (:mod:`llm_router.log_files`).

Settings (each also an environment variable): ``LLM_ROUTER_LOG_LEVEL`` (debug, info, warning,
error; every destination), ``LLM_ROUTER_LOG_FORMAT`` (console or json, the console only),
``LLM_ROUTER_LOG_DIR`` (default ``<data dir>/logs``; ``off``: no files) and
``LLM_ROUTER_LOG_RETENTION_DAYS`` (7). The records reach the stream and the files through one
processor that appends them to two bounded buffers: the caller never waits for a disk or NATS.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from broker.logship import REQUEST_ID, SHIPPER

from .log_files import DailyFiles

DEFAULT_RETENTION_DAYS = 7
_files: DailyFiles | None = None


class _NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that remembers the name it was asked for (``get_logger("gateway.auth")``)."""

    def __init__(self, file: Any, name: str | None) -> None:
        super().__init__(file)
        self.name = name


class _NamedLoggerFactory:
    def __init__(self, file: Any) -> None:
        self.file = file

    def __call__(self, *args: Any) -> _NamedPrintLogger:
        return _NamedPrintLogger(self.file, args[0] if args and isinstance(args[0], str) else None)


def _tee(clock: Callable[[], float], files: DailyFiles | None):
    def tee(logger: Any, method: str, event: dict) -> dict:
        if "request_id" not in event:
            request_id = REQUEST_ID.get()
            if request_id is not None:
                event["request_id"] = request_id
        entry = (clock(), event.get("level") or method, getattr(logger, "name", None), dict(event))
        SHIPPER.emit(entry)
        if files is not None:
            files.emit(entry)
        return event

    return tee


def log_dir(data_dir: str | Path | None = None) -> Path | None:
    """``LLM_ROUTER_LOG_DIR``, else ``<data dir>/logs`` (``LLM_ROUTER_DATA_DIR`` or ~/.llm-router); None: off."""
    explicit = os.environ.get("LLM_ROUTER_LOG_DIR")
    if explicit:
        return None if explicit.lower() == "off" else Path(explicit).expanduser()
    base = data_dir or os.environ.get("LLM_ROUTER_DATA_DIR") or Path.home() / ".llm-router"
    return Path(base).expanduser() / "logs"


def configure(
    level: str | None = None,
    fmt: str | None = None,
    *,
    component: str = "up",
    directory: Path | None = None,
    retention_days: int | None = None,
    clock: Callable[[], float] = time.time,
    cache: bool = True,
) -> None:
    """``component``: this process's own (``up``, ``gateway``, ``registry``, ``node``), which also
    names its log files; ``directory``: where they go (None: no files); ``clock``: records' times
    (tests move it across days); ``cache``: loggers keep this configuration once used (a test
    that configures again, or captures logs, wants False)."""
    global _files
    level_name = (level or os.environ.get("LLM_ROUTER_LOG_LEVEL") or "info").upper()
    fmt = fmt or os.environ.get("LLM_ROUTER_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    renderer = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    if retention_days is None:
        raw = os.environ.get("LLM_ROUTER_LOG_RETENTION_DAYS") or str(DEFAULT_RETENTION_DAYS)
        if not raw.isdigit() or not 1 <= int(raw) <= 3650:
            raise RuntimeError(f"LLM_ROUTER_LOG_RETENTION_DAYS must be a number of days from 1 to 3650, not {raw!r}")
        retention_days = int(raw)
    if _files is not None:
        _files.stop()
        _files = None
    if directory is not None:
        _files = DailyFiles(directory, component, retention_days)
        _files.start(clock())
    SHIPPER.identity.component = component
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            _tee(clock, _files),
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=_NamedLoggerFactory(sys.stderr),
        cache_logger_on_first_use=cache,
    )


def files() -> DailyFiles | None:
    """The files this process writes its records to (None: none)."""
    return _files
