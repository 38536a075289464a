"""Runs inference requests for one loaded model: slots, worker thread, streamed replies.

Each loaded model has as many slots as its engine runs calls at once (``engine.slots``: the
node's ``--parallel``, or fewer where the engine cannot), so no engine is given more calls
than it can run, and as many worker threads of its own, so a long generation never blocks
the event loop that sends heartbeats. What a request runs is its capability's runner
(nodes/runners.py); its replies go out through the request's Responder.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import structlog
from nats.js import JetStreamContext

from events.capabilities import CAPABILITIES
from events.messages import Accepted, Failure, InferenceRequest, LoadedModel, ModelRecord

from .responder import Responder
from .runners import RUNNERS, Job
from .runtimes.base import EngineError, LoadedEngine

log = structlog.get_logger("node")


class ServedModel:
    def __init__(self, record: ModelRecord, runtime: str, engine: LoadedEngine, path: str) -> None:
        self.record = record
        self.runtime = runtime
        self.engine = engine
        self.path = path
        self.parallel = engine.slots  # what the engine really runs at once, not what was asked
        self.active = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(self.parallel)
        self._pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix=f"engine-{record.name}")

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def capabilities(self) -> list[str]:
        """What the engine can do, limited to what the registration offers."""
        return [c for c in self.engine.capabilities if c in self.record.capabilities]

    def report(self) -> LoadedModel:
        return LoadedModel(
            name=self.name,
            runtime=self.runtime,
            capabilities=self.capabilities,
            state="ready",
            artifact_path=self.path,
            artifact_bytes=self.engine.artifact_bytes,
            active_requests=self.active,
            parallel=self.parallel,
            origin="upstream" if self.record.source.kind == "upstream" else "registry",
        )

    async def serve(
        self, request: InferenceRequest, responder: Responder, cancelled: threading.Event, js: JetStreamContext
    ) -> None:
        """Answer one request through ``responder``; always ends with a final reply (done or error)."""
        if request.when_busy == "reject" and self.active + self.waiting >= self.parallel:
            await responder.fail(
                429,
                f"node {responder.node_id} has no free slot for {self.name}",
                type="rate_limit_exceeded",
                code="node_busy",
            )
            return
        queued_at = time.perf_counter()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            if cancelled.is_set():
                return  # the client left while this request waited for a slot
            if request.stream:
                await responder.send(Accepted(waited_ms=(time.perf_counter() - queued_at) * 1000))
            runner = RUNNERS[CAPABILITIES[request.capability].runner]
            final = await runner(Job(self.engine, request, responder, cancelled, self._pool, js))
        except EngineError as exc:
            final = Failure(
                status=exc.status, type="invalid_request_error", message=str(exc), param=exc.param, code=exc.code
            )
        except Exception as exc:
            log.exception("engine failed", model=self.name, request_id=request.request_id)
            final = Failure(status=500, message=f"engine error: {exc}")
        finally:
            self.active -= 1
            self._slots.release()
        await responder.send(final)

    async def close(self) -> None:
        """Wait for in-flight work (taking every slot), then free the engine off the loop."""
        for _ in range(self.parallel):
            await self._slots.acquire()
        await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.close)
        self._pool.shutdown(wait=False)
