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
from events.messages import Choice, EmbeddingResult, InferenceRequest, Reply, TextDelta, TextDone, ToolCallDelta

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
        return TextDone(
            text=outcome.text, finish_reason=outcome.finish_reason, usage=outcome.usage, choices=outcome.choices
        )

    queue: asyncio.Queue = asyncio.Queue()

    def on_delta(piece: str | TextDelta) -> None:
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
            parts: list[str | TextDelta] = []
            while True:
                if item is _END:
                    ended = True
                    break
                parts.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            if parts and not cancelled.is_set():
                for delta in _batched(parts):
                    await job.responder.send(delta)
    except BaseException:
        # A reply could not be sent (or we were cancelled): stop the engine at its next token and
        # keep the slot until its thread is really free, so the next request is not double-booked.
        cancelled.set()
        await asyncio.shield(future)
        raise
    outcome = await future
    finals = (
        [Choice(index=c.index, finish_reason=c.finish_reason) for c in outcome.choices] if outcome.choices else None
    )
    return TextDone(finish_reason=outcome.finish_reason, usage=outcome.usage, choices=finals)


def _batched(parts: list[str | TextDelta]) -> list[TextDelta]:
    """Pieces that queued up while a reply was being sent, as few deltas as possible: plain
    text joined, and richer pieces of one choice merged (text, logprobs and call fragments)."""
    if all(isinstance(part, str) for part in parts):
        return [TextDelta(text="".join(parts))]  # type: ignore[arg-type]
    out: list[TextDelta] = []
    for part in parts:
        delta = TextDelta(text=part) if isinstance(part, str) else part
        last = out[-1] if out else None
        if last is not None and last.index == delta.index and not (last.tool_calls and delta.text):
            last.text += delta.text
            if delta.logprobs:
                last.logprobs = (last.logprobs or []) + delta.logprobs
            if delta.tool_calls:
                last.tool_calls = _merged_calls(last.tool_calls or [], delta.tool_calls)
        else:
            out.append(delta)
    return out


def _merged_calls(calls: list[ToolCallDelta], more: list[ToolCallDelta]) -> list[ToolCallDelta]:
    calls = list(calls)
    for call in more:
        if calls and calls[-1].index == call.index and call.id is None:
            calls[-1] = ToolCallDelta(
                index=call.index, id=calls[-1].id, name=calls[-1].name, arguments=calls[-1].arguments + call.arguments
            )
        else:
            calls.append(call)
    return calls


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
