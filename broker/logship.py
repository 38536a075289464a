"""This process's log records, shipped to the LOGS stream off every caller's path.

structlog hands each record to :meth:`LogShipper.emit` (``llm_router.logs``): one append to a
bounded buffer, nothing else. A background task publishes the buffer every ``interval`` on the
NATS connection of the component the record belongs to (:meth:`LogShipper.attach`, from each
component's ``start``), one plain publish per record on ``logs.<component>.<instance>.<level>``,
which the stream stores: no acknowledgement is awaited, a lost line is a lost line. While NATS
is unreachable the buffer keeps the newest ``max_pending`` records; older ones are dropped and
counted (``stats``).

Which component a record is: its logger's first name (``gateway.auth``: the gateway,
``registry``, ``node``) when that component runs in this process, else the process's own
(``up`` for ``llm-router up``, which also hosts the registry and the gateway). Values that look
like secrets (API keys, NATS seeds, JWTs), and keys that name one, are redacted first. A node's
records carry its id as their instance (one node per process; tests that run several in one
process see the last one started).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import re
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client

from events import codec, subjects
from events.messages import LogRecord

LOGGER_COMPONENTS = {"gateway": "gateway", "registry": "registry", "node": "node", "nodes": "node"}
MAX_EVENT_CHARS = 2000
MAX_VALUE_CHARS = 1000
MAX_TRACEBACK_CHARS = 8000  # the ``exception`` field structlog renders
MAX_FIELDS = 32
_SECRET_KEY = re.compile(r"authorization|password|secret|token|api_?key|seed|jwt|creds|cookie", re.I)
# API keys, NATS nkey seeds (S + type + base32), JWTs: never shipped, never written.
_SECRET_VALUE = re.compile(r"sk-llmr-[A-Za-z0-9_-]+|\bS[A-Z][A-Z2-7]{54,}\b|\beyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+")
_LEVELS = {"warn": "warning", "exception": "error", "fatal": "critical", "msg": "info"}
# A refused publish of a log record is itself logged: that line is not shipped again (no loop).
_OWN_REFUSAL = 'publish to "logs.'

Entry = tuple[float, str, str | None, dict[str, Any]]  # time, level, logger name, event dict

# The request being served, for every line logged while serving it (a node sets it per request):
# one ContextVar, cheaper than structlog's bound_contextvars on a request path.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("log_request_id", default=None)


def _text(value: Any, limit: int) -> Any:
    if isinstance(value, bool | int | float) or value is None:
        return value
    text = value if isinstance(value, str) else str(value)
    text = _SECRET_VALUE.sub("[redacted]", text)
    return text if len(text) <= limit else text[:limit] + "…"


def _level(name: str | None) -> str:
    level = _LEVELS.get(name or "info", name or "info")
    return level if level in subjects.LOG_LEVELS else "info"


@dataclass
class Identity:
    """Who this process is in its log records."""

    component: str = "up"
    instance: str = f"{socket.gethostname()[:64]}-{os.getpid()}"
    node_id: str | None = None
    hosted: set[str] = field(default_factory=set)  # components started in this process

    def component_of(self, logger: str | None) -> str:
        named = LOGGER_COMPONENTS.get((logger or "").partition(".")[0])
        return named if named is not None and (named in self.hosted or named == self.component) else self.component


def record_of(entry: Entry, identity: Identity) -> LogRecord:
    """The record of one structlog event, bounded and with secrets redacted."""
    when, level, logger, event = entry
    event = dict(event)
    message = event.pop("event", "")
    request_id = event.pop("request_id", None)
    node_id = event.pop("node_id", None)
    for key in ("level", "timestamp"):
        event.pop(key, None)
    fields: dict[str, Any] = {}
    for key, value in list(event.items())[:MAX_FIELDS]:
        key = str(key)[:64]
        limit = MAX_TRACEBACK_CHARS if key == "exception" else MAX_VALUE_CHARS
        fields[key] = "[redacted]" if _SECRET_KEY.search(key) else _text(value, limit)
    component = identity.component_of(logger)
    return LogRecord(
        ts=when,
        level=_level(level),
        component=component,
        instance=identity.node_id if component == "node" and identity.node_id else identity.instance,
        event=_text(message, MAX_EVENT_CHARS),
        logger=logger,
        node_id=_text(node_id, 256) if node_id is not None else identity.node_id if component == "node" else None,
        request_id=_text(request_id, 256) if request_id is not None else None,
        fields=fields,
    )


class LogShipper:
    def __init__(self, *, max_pending: int = 10_000, interval: float = 0.25) -> None:
        self.identity = Identity()
        self.max_pending = max_pending
        self.interval = interval
        self.shipped = 0
        self.dropped = 0
        self._pending: deque[Entry] = deque()
        self._transports: dict[str, Client] = {}  # component -> its connection
        self._task: asyncio.Task | None = None

    @property
    def stats(self) -> dict[str, int]:
        return {"pending": len(self._pending), "shipped": self.shipped, "dropped": self.dropped}

    def emit(self, entry: Entry) -> None:
        """From structlog, on the caller's path (any thread): one append."""
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(entry)

    def attach(self, nc: Client, component: str, instance: str | None = None) -> None:
        """Ship records of ``component`` on ``nc`` (a node also names itself: its id is the instance)."""
        self._transports[component] = nc
        self.identity.hosted.add(component)
        if component == "node" and instance:
            self.identity.node_id = instance
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="log-shipper")

    async def detach(self, nc: Client) -> None:
        """Ship what is buffered, then stop using ``nc`` (its component is stopping)."""
        await self.flush()
        for component in [c for c, transport in self._transports.items() if transport is nc]:
            del self._transports[component]
        if not self._transports and self._task is not None:
            self._task.cancel()
            self._task = None

    def _route(self, component: str) -> Client | None:
        for name in (component, self.identity.component, "gateway"):  # the gateway may publish any log subject
            nc = self._transports.get(name)
            if nc is not None and not nc.is_closed:
                return nc
        return None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> None:
        """Publish what is buffered, as long as its connections are up."""
        sent = 0
        while self._pending:
            entry = self._pending[0]
            record = record_of(entry, self.identity)
            nc = self._route(record.component)
            if nc is None or not nc.is_connected:
                return  # kept (bounded) until the link is back
            self._pending.popleft()
            if record.logger == "broker" and _OWN_REFUSAL in str(record.fields.get("error", "")).lower():
                continue
            try:
                await nc.publish(subjects.logs(record.component, record.instance, record.level), codec.encode(record))
                self.shipped += 1
            except Exception:  # a subject or payload the client refuses: this record is lost, the others go on
                self.dropped += 1
            sent += 1
            if sent % 256 == 0:
                await asyncio.sleep(0)  # a long backlog must not hold the event loop


SHIPPER = LogShipper()  # the process's one shipper: structlog's processor feeds it
