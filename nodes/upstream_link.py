"""Keeps an upstream node's models in step with its server: health check and model re-sync.

Every ``interval`` seconds the server's ``/v1/models`` is read: that is the health check (every
OpenAI-compatible server has it, unlike ``/health``) and the re-sync at once. A model that
appears is served (announced in the next heartbeat), one that goes is unloaded. After
``failures`` checks in a row fail the node goes offline: it unloads everything, sends one last
heartbeat without models (gateways drop them at once) and then stays silent, so after the
heartbeat TTL it is offline for every gateway. The first check that works brings it back.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

from events import name_error

from .upstream import UpstreamEngine, UpstreamServer

log = structlog.get_logger("node.upstream")

INTERVAL_S = 5.0
FAILURES = 3
CHECK_TIMEOUT_S = 5.0


class UpstreamHost(Protocol):
    """What the link needs of the node agent (nodes/agent.py)."""

    parallel: int

    async def serve_upstream(self, name: str, engine: UpstreamEngine) -> None: ...

    async def unload_upstream(self, name: str, reason: str) -> None: ...

    async def go_offline(self, reason: str) -> None: ...

    def go_online(self) -> None: ...


class UpstreamLink:
    def __init__(
        self,
        server: UpstreamServer,
        *,
        prefix: str = "",
        interval: float = INTERVAL_S,
        failures: int = FAILURES,
        check_timeout: float = CHECK_TIMEOUT_S,
    ) -> None:
        """``prefix``: put before each upstream model's name (``prefix + id``), e.g. to tell two
        servers that both serve ``llama3`` apart."""
        self.server = server
        self.prefix = prefix
        self.interval = interval
        self.failures_allowed = max(1, failures)
        self.check_timeout = min(check_timeout, max(interval, 0.5))
        self.failed_checks = 0
        self.online = True
        self.names: dict[str, str] = {}  # announced name -> the server's id
        self.last_error: str | None = None
        self._host: UpstreamHost | None = None
        self._task: asyncio.Task | None = None

    async def start(self, host: UpstreamHost) -> None:
        """First check now (the node starts with the server's models when it answers), then on schedule."""
        self._host = host
        await self.check()
        self._task = asyncio.create_task(self._run(), name="upstream-link")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.server.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()

    async def check(self) -> bool:
        """One health check and re-sync; True when the server answered."""
        host = self._host
        assert host is not None
        try:
            listed = await self.server.models(self.check_timeout)
        except Exception as exc:  # unreachable, timed out, an error status, an unreadable list: all "down"
            self.failed_checks += 1
            self.last_error = self.server.scrub(f"{type(exc).__name__}: {exc}")[:300]
            log.warning(
                "upstream check failed", upstream=self.server.shown, failures=self.failed_checks, error=self.last_error
            )
            if self.online and self.failed_checks >= self.failures_allowed:
                self.online = False
                for name in list(self.names):
                    await host.unload_upstream(name, "upstream unreachable")
                self.names.clear()
                await host.go_offline(f"upstream {self.server.shown} failed {self.failed_checks} checks")
            return False
        self.failed_checks, self.last_error = 0, None
        wanted = {}
        for model_id in listed:
            name = self.prefix + model_id
            invalid = name_error(name)
            if invalid:
                log.warning("upstream model skipped", model=model_id[:80], reason=invalid)
                continue
            wanted[name] = model_id
        for name in [n for n in self.names if n not in wanted]:
            await host.unload_upstream(name, "no longer listed by the upstream")
            del self.names[name]
        for name, model_id in wanted.items():
            if name not in self.names:
                await host.serve_upstream(name, UpstreamEngine(self.server, model_id, host.parallel))
                self.names[name] = model_id
        if not self.online:
            self.online = True
            log.info("upstream back", upstream=self.server.shown, models=sorted(wanted))
            host.go_online()
        return True
