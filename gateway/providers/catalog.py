"""Each configured provider's model list, cached a day and refreshed in the background.

``GET /v1/models`` reads only this cache, so it never waits for a provider. A background task
fetches every list whose time has come, each provider on its own (10 s timeout each), so one
that is slow or down delays nobody: its last good list stays listed (stale) and it is asked
again ``retry_s`` later; a provider that never answered is simply not listed yet.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from .base import MODELS_TIMEOUT_S, CloudModel, Provider

log = structlog.get_logger("gateway.providers")

TTL_S = 24 * 3600.0  # SPEC-82491000: a day
RETRY_S = 300.0  # after a failed refresh


@dataclass
class CachedList:
    models: list[CloudModel] = field(default_factory=list)
    fetched_at: float | None = None  # time.time() of the last good fetch
    due: float = 0.0  # monotonic time of the next fetch
    error: str | None = None  # why the last fetch failed (the list is stale), None when it worked
    entries: list[dict] = field(default_factory=list)  # the /v1/models entries, built once per fetch
    by_id: dict[str, dict] = field(default_factory=dict)


class CloudCatalog:
    def __init__(self, providers: list[Provider], *, ttl_s: float = TTL_S, retry_s: float = RETRY_S) -> None:
        self.providers = providers
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.lists: dict[str, CachedList] = {p.name: CachedList() for p in providers}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._attempted: dict[str, asyncio.Event] = {p.name: asyncio.Event() for p in providers}

    async def start(self) -> None:
        if self.providers:
            self._task = asyncio.create_task(self._run(), name="cloud-models")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            due = [p for p in self.providers if self.lists[p.name].due <= now]
            if due:
                await asyncio.gather(*(self.refresh(p) for p in due))
                continue
            wait = min(self.lists[p.name].due for p in self.providers) - now
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except TimeoutError:
                pass

    def expire(self) -> None:
        """Fetch every list again now (in the background), e.g. after a provider's key changed."""
        for cached in self.lists.values():
            cached.due = 0.0
        self._wake.set()

    async def refresh(self, provider: Provider) -> bool:
        """Fetch one provider's list; on failure keep the old one. True when it worked."""
        cached = self.lists[provider.name]
        try:
            models = await asyncio.wait_for(provider.models(), timeout=MODELS_TIMEOUT_S)
        except Exception as exc:  # any failure of one provider: keep its stale list, retry later
            cached.error = provider.scrub(f"{type(exc).__name__}: {exc}")[:300]
            cached.due = time.monotonic() + self.retry_s
            log.warning("cloud model list not refreshed", provider=provider.name, error=cached.error)
            return False
        finally:
            self._attempted[provider.name].set()
        cached.models, cached.fetched_at, cached.error = models, time.time(), None
        cached.entries = [self._entry(provider.name, m) for m in models]
        cached.by_id = {e["id"]: e for e in cached.entries}
        cached.due = time.monotonic() + self.ttl_s
        log.info("cloud model list refreshed", provider=provider.name, models=len(models))
        return True

    async def attempted(self, timeout: float = MODELS_TIMEOUT_S + 1) -> None:
        """Wait until every provider's first fetch has ended (worked or not)."""
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._attempted.values())), timeout)

    @staticmethod
    def _entry(provider: str, model: CloudModel) -> dict:
        return {
            "id": f"{provider}:{model.id}",
            "object": "model",
            "created": model.created,
            "owned_by": provider,
            "capabilities": model.capabilities,
            "ready": True,
            "lifecycle_status": "ready",
        }

    def entries(self) -> list[dict]:
        """Every listed cloud model, prefixed, in provider order."""
        return [entry for cached in self.lists.values() for entry in cached.entries]

    def get(self, model: str) -> dict | None:
        provider = model.partition(":")[0]
        cached = self.lists.get(provider)
        return cached.by_id.get(model) if cached is not None else None

    def status(self) -> dict[str, dict]:
        """Per provider: how many models, when fetched, whether stale and why."""
        return {
            name: {"models": len(c.models), "fetched_at": c.fetched_at, "stale": c.error is not None, "error": c.error}
            for name, c in self.lists.items()
        }
