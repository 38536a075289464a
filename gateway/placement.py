"""Asking the registry to place a model: a request waits for it and no node has it loaded, or
its queue keeps standing. The gateway never chooses which node loads a model; the registry
does (registry/placement.py), and the request is served once that node's heartbeat lists it.

One ask per model is in flight at a time, so a burst of cold requests costs the registry one
request; asks repeated by the dispatcher's ticker are spaced (ASK_INTERVAL_S, longer for more
replicas). A request that has just found its model unloaded asks at once (``now``). When the registry
finds no node for the model, the requests queued for it fail at once with its reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from events import subjects
from events.messages import PlaceModel, PlaceReply

from .errors import ApiError

log = structlog.get_logger("gateway")

Ask = Callable[[str, Any, type], Awaitable[Any]]
# The registry answers a repeated ask from what it already decided (nothing placed twice), so
# a cold start may ask again soon; another replica is asked for at most every few seconds.
ASK_INTERVAL_S = {"on_demand": 0.2, "queueing": 5.0}
ASK_TIMEOUT_S = 10.0


class Placer:
    def __init__(self, ask: Ask, failed: Callable[[str, str, int], None]) -> None:
        """``ask``: a registry request (AdminRoutes.ask); ``failed(model, message, status)``: the
        registry refused (Dispatcher.placement_failed)."""
        self.ask = ask
        self.failed = failed
        self._last: dict[tuple[str, str], float] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.asked = 0

    def want(self, model: str, capability: str | None, reason: str, waiting: int, *, now: bool = False) -> None:
        """Ask for ``model`` unless an ask for it is in flight, or (not ``now``) was made just now."""
        task = self._tasks.get(model)
        if task is not None and not task.done():
            return
        key, at = (model, reason), time.monotonic()
        if not now and at - self._last.get(key, -1e9) < ASK_INTERVAL_S.get(reason, 1.0):
            return
        self._last[key] = at
        self.asked += 1
        request = PlaceModel(model=model, capability=capability, reason=reason, waiting=waiting)
        self._tasks[model] = asyncio.create_task(self._ask(request), name=f"place:{model}")

    async def _ask(self, request: PlaceModel) -> None:
        try:
            reply: PlaceReply = await asyncio.wait_for(
                self.ask(subjects.ADMIN_MODEL_PLACE, request, PlaceReply), ASK_TIMEOUT_S
            )
        except ApiError as exc:
            log.warning("model not placed", model=request.model, status=exc.status, reason=exc.message)
            self.failed(request.model, exc.message, exc.status)
            return
        except TimeoutError:
            log.warning("placement request timed out", model=request.model)
            return
        finally:
            self._tasks.pop(request.model, None)
        log.info("placement", model=request.model, reason=request.reason, nodes=reply.nodes, message=reply.message)

    async def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
