"""Serving NATS subjects: one endpoint layer for every component, discoverable with ``nats micro``.

An endpoint is a subject, a message type and a handler (the shape of Dynamo's
``endpoint(...).serve_endpoint(handler)``). The layer decodes each request once and refuses an
undecodable one through the endpoint's ``refuse`` (or logs it when there is nobody to tell),
runs the handler in a task of its own that it keeps until done (NATS runs one callback per
subscription at a time, so a slow request must not hold the next one), and counts requests,
errors and processing time per endpoint.

A :class:`Service` answers the NATS micro protocol (``$SRV.PING|INFO|STATS``, the JSON of
``nats.micro``), so ``nats micro ls``, ``nats micro info NAME`` and ``nats micro stats NAME``
list every node, the registry and their endpoints with only the NATS CLI. Unlike
``nats.micro.Service`` it can remove endpoints (a node unloads models) and measures a request
until its handler finishes, not until the callback returns.

Subscriptions belong to the client, and ``broker.connection.ResilientClient`` replays them
after any reconnection, so nothing here has to be re-established by hand.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, InitVar, dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import (
    EndpointInfo,
    EndpointStats,
    ServiceInfo,
    ServicePing,
    ServiceStats,
    ServiceVerb,
    control_subject,
)

log = structlog.get_logger("broker.endpoints")

Handler = Callable[[Any, Msg], Awaitable[None]]
Refuse = Callable[[Msg, str], Awaitable[None]]


@dataclass(eq=False)
class Endpoint:
    """One served subject; created by :meth:`Service.add` (which documents the options)."""

    service: Service
    name: str
    subject: str
    handler: Handler
    _: KW_ONLY
    kind: InitVar[Any] = None  # the request's type: decoded only when given
    queue: str | None = None
    refuse: Refuse | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    concurrent: bool = True
    empty: bytes | None = None  # what an empty request body means (e.g. b"{}": all defaults)
    # the micro protocol's statistics, and the subscription while it serves
    requests: int = field(default=0, init=False)
    errors: int = field(default=0, init=False)
    processing_ns: int = field(default=0, init=False)
    last_error: str = field(default="", init=False)
    subscription: Subscription | None = field(default=None, init=False)

    def __post_init__(self, kind: Any) -> None:
        self._decode = msgspec.json.Decoder(kind).decode if kind is not None else None

    async def _start(self) -> None:
        self.subscription = await self.service.nc.subscribe(self.subject, queue=self.queue or "", cb=self._on_msg)

    async def _stop(self) -> None:
        if self.subscription is not None:
            await self.subscription.unsubscribe()
            self.subscription = None

    async def _on_msg(self, msg: Msg) -> None:
        self.requests += 1
        if self._decode is None:
            request: Any = msg
        else:
            try:
                request = self._decode(msg.data or self.empty or b"")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._failed(f"undecodable request: {exc}")
                if self.refuse is not None:
                    await self.refuse(msg, f"bad request: {exc}")
                else:
                    log.warning("undecodable request", subject=msg.subject, endpoint=self.name, error=str(exc))
                return
        if self.concurrent:
            self.service.spawn(self._run(request, msg))
        else:
            await self._run(request, msg)

    async def _run(self, request: Any, msg: Msg) -> None:
        started = time.perf_counter_ns()
        try:
            await self.handler(request, msg)
        except Exception as exc:
            self._failed(repr(exc))
            log.exception("endpoint handler failed", endpoint=self.name, subject=msg.subject)
        finally:
            self.processing_ns += time.perf_counter_ns() - started

    def _failed(self, error: str) -> None:
        self.errors += 1
        self.last_error = error

    def info(self) -> EndpointInfo:
        return EndpointInfo(name=self.name, subject=self.subject, queue_group=self.queue or "", metadata=self.metadata)

    def stats(self) -> EndpointStats:
        return EndpointStats(
            name=self.name,
            subject=self.subject,
            queue_group=self.queue or "",
            num_requests=self.requests,
            num_errors=self.errors,
            last_error=self.last_error,
            processing_time=self.processing_ns,
            average_processing_time=self.processing_ns // self.requests if self.requests else 0,
        )


class Service:
    """A component's endpoints as one NATS micro service (``name``, one ``id`` per instance)."""

    def __init__(
        self,
        nc: Client,
        name: str,
        *,
        version: str = "0.1.0",
        description: str = "",
        metadata: dict[str, str] | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.nc = nc
        self.name = name
        self.version = version
        self.description = description
        self.metadata = metadata or {}
        self.id = instance_id or uuid.uuid4().hex
        self.endpoints: list[Endpoint] = []
        self.tasks: set[asyncio.Task] = set()
        self._control: list[Subscription] = []
        self._started = datetime.now(UTC)

    async def start(self) -> None:
        """Answer PING, INFO and STATS for all services, services of this name, and this one."""
        handlers = {ServiceVerb.PING: self._ping, ServiceVerb.INFO: self._info, ServiceVerb.STATS: self._stats}
        for verb, handler in handlers.items():
            for name, instance in ((None, None), (self.name, None), (self.name, self.id)):
                subject = control_subject(verb, name=name, id=instance)
                self._control.append(await self.nc.subscribe(subject, cb=handler))

    async def add(self, name: str, subject: str, handler: Handler, **options: Any) -> Endpoint:
        """Serve ``subject``: ``handler(request, msg)``, ``request`` decoded as ``kind`` when given.

        Options: ``kind``, ``queue`` (queue group), ``refuse(msg, why)`` for undecodable
        requests, ``metadata``, ``concurrent`` (False: handle in the callback, in order),
        ``empty`` (the body an empty request stands for)."""
        endpoint = Endpoint(self, name, subject, handler, **options)
        await endpoint._start()
        self.endpoints.append(endpoint)
        return endpoint

    async def remove(self, endpoint: Endpoint) -> None:
        if endpoint in self.endpoints:
            self.endpoints.remove(endpoint)
        await endpoint._stop()

    def spawn(self, work: Awaitable[None]) -> asyncio.Task:
        """Run ``work`` in a task kept until it is done (its exceptions are the handler's)."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests, then let the running ones finish (up to ``timeout``)."""
        for endpoint in list(self.endpoints):
            await self.remove(endpoint)
        for sub in self._control:
            await sub.unsubscribe()
        self._control.clear()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout)

    # ------------------------------------------------------------ the micro protocol

    def _identity(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "version": self.version, "metadata": self.metadata}

    async def _ping(self, msg: Msg) -> None:
        await self._answer(msg, ServicePing(**self._identity()).to_dict())

    async def _info(self, msg: Msg) -> None:
        info = ServiceInfo(
            **self._identity(), description=self.description, endpoints=[e.info() for e in self.endpoints]
        )
        await self._answer(msg, info.to_dict())

    async def _stats(self, msg: Msg) -> None:
        stats = ServiceStats(**self._identity(), started=self._started, endpoints=[e.stats() for e in self.endpoints])
        await self._answer(msg, stats.to_dict())

    async def _answer(self, msg: Msg, payload: dict[str, Any]) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, msgspec.json.encode(payload))
