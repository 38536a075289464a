"""How a node runs each kind of request on its engine: one runner per answer shape.

The capability table (events/capabilities.py) names each capability's runner and engine
method; a runner calls the engine in the model's worker thread and returns the final reply
(streamed text goes out through the request's Responder as it comes). A new capability whose
answer has a known shape needs no new runner: a table entry and its engine method.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext

from events.capabilities import CAPABILITIES
from events.messages import EmbeddingResult, InferenceRequest, Reply, TextDelta, TextDone

from . import media
from .responder import Responder

_END = object()


@dataclass
class Job:
    """One request being run: what every runner needs."""

    engine: Any
    request: InferenceRequest
    responder: Responder
    cancelled: threading.Event
    pool: Executor  # the model's worker threads
    js: JetStreamContext  # claim checks of media inputs and outputs

    @property
    def method(self) -> Callable[..., Any]:
        return getattr(self.engine, CAPABILITIES[self.request.capability].method)


async def text(job: Job) -> Reply:
    """Chat or completion: one TextDone, or deltas batched while the previous one was sent."""
    loop = asyncio.get_running_loop()
    method, params, cancelled = job.method, job.request.params, job.cancelled
    if inspect.iscoroutinefunction(method):
        return await _text_async(job)
    if not job.request.stream:
        outcome = await loop.run_in_executor(job.pool, method, params, None, cancelled)
        return TextDone(text=outcome.text, finish_reason=outcome.finish_reason, usage=outcome.usage)

    queue: asyncio.Queue = asyncio.Queue()

    def on_delta(piece: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, piece)

    def run() -> Any:
        try:
            return method(params, on_delta, cancelled)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    future = loop.run_in_executor(job.pool, run)
    ended = False
    try:
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
                await job.responder.send(TextDelta(text="".join(parts)))
    except BaseException:
        # A reply could not be sent (or we were cancelled): stop the engine at its next token and
        # keep the slot until its thread is really free, so the next request is not double-booked.
        cancelled.set()
        await asyncio.shield(future)
        raise
    outcome = await future
    return TextDone(finish_reason=outcome.finish_reason, usage=outcome.usage)


async def _text_async(job: Job) -> Reply:
    """An engine that waits on the network (nodes/upstream.py): awaited here, no worker thread;
    each streamed piece is sent as it comes."""
    request, cancelled = job.request, job.cancelled

    async def on_delta(piece: str) -> None:
        if not cancelled.is_set():
            await job.responder.send(TextDelta(text=piece))

    outcome = await job.method(request.params, on_delta if request.stream else None, cancelled)
    text = "" if request.stream else outcome.text
    return TextDone(text=text, finish_reason=outcome.finish_reason, usage=outcome.usage)


async def embedding(job: Job) -> Reply:
    if inspect.iscoroutinefunction(job.method):  # an upstream server's model
        vectors, usage = await job.method(job.request.params)
    else:
        vectors, usage = await asyncio.get_running_loop().run_in_executor(job.pool, job.method, job.request.params)
    return EmbeddingResult(vectors=vectors, usage=usage)


async def image(job: Job) -> Reply:
    return await media.image(job.engine, job.request, job.pool, job.js, job.cancelled)


async def transcription(job: Job) -> Reply:
    return await media.transcription(job.engine, job.request, job.pool, job.js, job.cancelled)


async def speech(job: Job) -> Reply:
    return await media.speech(job.engine, job.request, job.pool, job.js, job.cancelled)


RUNNERS: dict[str, Callable[[Job], Awaitable[Reply]]] = {
    "text": text,
    "embedding": embedding,
    "image": image,
    "transcription": transcription,
    "speech": speech,
}
