"""Runs inference requests for one loaded model: slots, worker thread, streamed replies.

Each loaded model has as many slots as its engine runs calls at once (``engine.slots``: the
node's ``--parallel``, or fewer where the engine cannot), so no engine is given more calls
than it can run, and as many worker threads of its own, so a long generation never blocks
the event loop that sends heartbeats. Streamed text is handed from the worker thread to the
loop and published in batches: whatever accumulated while the previous message was being
sent goes in one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import structlog
from nats.aio.client import Client

from events import codec, subjects
from events.messages import Accepted, EmbeddingResult, Failure, InferenceRequest, LoadedModel, ModelRecord, TextDelta, TextDone
from events.openai import EmbeddingBody

from . import media
from .runtimes.base import AnyEngine, EngineError

log = structlog.get_logger("node")

_END = object()


class ServedModel:
    def __init__(self, record: ModelRecord, runtime: str, engine: AnyEngine, path: str) -> None:
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
        )

    async def serve(
        self,
        nc: Client,
        node_id: str,
        request: InferenceRequest,
        reply: str,
        cancelled: threading.Event,
    ) -> None:
        """Answer one request on ``reply``; always ends with a final message (done or error)."""
        rid = request.request_id
        if request.when_busy == "reject" and self.active + self.waiting >= self.parallel:
            busy = Failure(request_id=rid, node_id=node_id, status=429, type="rate_limit_exceeded",
                           message=f"node {node_id} has no free slot for {self.name}", code="node_busy")
            await nc.publish(reply, codec.encode(busy))
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
                waited = (time.perf_counter() - queued_at) * 1000
                await nc.publish(reply, codec.encode(Accepted(request_id=rid, node_id=node_id, waited_ms=waited)))
            final = await self._run(nc, node_id, request, reply, cancelled)
        except EngineError as exc:
            final = Failure(
                request_id=rid, node_id=node_id, status=exc.status, type="invalid_request_error",
                message=str(exc), param=exc.param, code=exc.code,
            )
        except Exception as exc:
            log.exception("engine failed", model=self.name, request_id=rid)
            final = Failure(request_id=rid, node_id=node_id, status=500, message=f"engine error: {exc}")
        finally:
            self.active -= 1
            self._slots.release()
        await nc.publish(reply, codec.encode(final))

    async def _run(self, nc: Client, node_id: str, request: InferenceRequest, reply: str, cancelled: threading.Event):
        loop = asyncio.get_running_loop()
        rid = request.request_id
        if request.capability in media.MEDIA_CAPABILITIES:
            return await media.run(self.engine, request, node_id, self._pool, nc.jetstream(), cancelled)
        if request.capability == subjects.EMBEDDING:
            body: EmbeddingBody = request.params
            vectors, usage = await loop.run_in_executor(self._pool, self.engine.embed, body)
            return EmbeddingResult(request_id=rid, node_id=node_id, vectors=vectors, usage=usage)

        chat = request.capability in (subjects.CHAT, subjects.VISION)
        method: Callable[..., Any] = self.engine.chat if chat else self.engine.complete
        if not request.stream:
            outcome = await loop.run_in_executor(self._pool, method, request.params, None, cancelled)
            return TextDone(
                request_id=rid, node_id=node_id, text=outcome.text,
                finish_reason=outcome.finish_reason, usage=outcome.usage,
            )

        queue: asyncio.Queue = asyncio.Queue()

        def on_delta(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        def run() -> Any:
            try:
                return method(request.params, on_delta, cancelled)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        future = loop.run_in_executor(self._pool, run)
        ended = False
        while not ended:
            item = await queue.get()
            parts: list[str] = []
            while True:
                if item is _END:
                    ended = True
                    break
                parts.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            if parts and not cancelled.is_set():
                await nc.publish(reply, codec.encode(TextDelta(request_id=rid, node_id=node_id, text="".join(parts))))
        outcome = await future
        return TextDone(request_id=rid, node_id=node_id, finish_reason=outcome.finish_reason, usage=outcome.usage)

    async def close(self) -> None:
        """Wait for in-flight work (taking every slot), then free the engine off the loop."""
        for _ in range(self.parallel):
            await self._slots.acquire()
        await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.close)
        self._pool.shutdown(wait=False)
