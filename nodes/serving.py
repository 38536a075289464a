"""Runs inference requests for one loaded model: slots, worker thread, streamed replies.

Each loaded model has as many slots as its engine runs calls at once (``engine.slots``: the
node's ``--parallel``, or fewer where the engine cannot), so no engine is given more calls
than it can run, and as many worker threads of its own, so a long generation never blocks
the event loop that sends heartbeats. It also keeps what the node's memory accounting needs:
what the model takes per device, and when it last served (the least recently used idle model
is the one unloaded to make room). What a request runs is its capability's runner
(nodes/runners.py); its replies go out through the request's Responder.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
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
    def __init__(
        self,
        record: ModelRecord,
        runtime: str,
        engine: LoadedEngine,
        path: str,
        *,
        memory: dict[str, int] | None = None,
        estimate: dict[str, int] | None = None,
        load_s: float | None = None,
        pinned: bool = False,
    ) -> None:
        self.record = record
        self.runtime = runtime
        self.engine = engine
        self.path = path
        self.parallel = engine.slots  # what the engine really runs at once, not what was asked
        self.active = 0
        self.waiting = 0
        self.memory = dict(memory or {})  # per device, measured after the load
        self.estimate = dict(estimate or {})
        self.load_s = load_s
        self.pinned = pinned  # loaded for the registration's minimum replicas
        self.loaded_at = time.time()
        self.last_used = time.monotonic()  # its last request's end (or its load)
        self.used = False  # served a request since it was loaded
        self.fresh_until = 0.0  # monotonic: not unloaded before then unless used (a request is on its way)
        self.on_idle: Callable[[], None] | None = None  # called when its last request ends
        self._slots = asyncio.Semaphore(self.parallel)
        self._pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix=f"engine-{record.name}")

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def capabilities(self) -> list[str]:
        """What the engine can do, limited to what the registration offers."""
        return [c for c in self.engine.capabilities if c in self.record.capabilities]

    @property
    def upstream(self) -> bool:
        """An upstream server's model (nodes/upstream.py): it takes none of this node's memory,
        and the node serves it while the server lists it, never unloading it to make room or when idle."""
        return self.record.source.kind == "upstream"

    @property
    def in_flight(self) -> int:
        return self.active + self.waiting

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
            origin="upstream" if self.upstream else "registry",
            memory_bytes=self.memory,
            estimate_bytes=self.estimate,
            loaded_at=self.loaded_at,
            last_used_at=time.time() - (time.monotonic() - self.last_used),
            load_s=self.load_s,
            pinned=self.pinned,
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
        self.used = True
        try:
            await self._slots.acquire()
        except BaseException:
            self.waiting -= 1
            self._ended()
            raise
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
            self._ended()
        await responder.send(final)

    def _ended(self) -> None:
        self.last_used = time.monotonic()
        if self.in_flight == 0 and self.on_idle is not None:
            self.on_idle()

    async def close(self) -> None:
        """Wait for in-flight work (taking every slot), then free the engine off the loop."""
        for _ in range(self.parallel):
            await self._slots.acquire()
        await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.close)
        self._pool.shutdown(wait=False)
