"""Runs one image, transcription/translation or speech request on a loaded engine.

Input files arrive as claim checks (:mod:`broker.payloads`): they are read here (not
deleted: the gateway owns them, so a retry on another node can still read them), the blocking
engine runs in the model's worker thread, and output bytes go back as attachments, inline when
small, else through the ``payloads`` object store, which the gateway empties as it reads.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor
from typing import Any

from nats.js import JetStreamContext

from broker import payloads
from events import codec, subjects
from events.messages import ImageResult, InferenceRequest, SpeechResult, TranscriptionResult
from events.openai import (
    SPEECH_CONTENT_TYPES,
    TRANSCRIPT_CONTENT_TYPES,
    ImageEditBody,
    ImageGenerationBody,
    ImageVariationBody,
    SpeechBody,
    TranscriptionBody,
)

from .runtimes.base import EngineError
from .runtimes.transcript_formats import render

HISTORY_TEXT_CHARS = 2000


async def _input(js: JetStreamContext, attachment: Any, param: str) -> bytes:
    try:
        return await payloads.load(js, attachment)
    except payloads.PayloadMissing as exc:
        raise EngineError(f"{param}: {exc}", status=410, param=param, code="payload_missing") from None


async def image(
    engine: Any, request: InferenceRequest, pool: Executor, js: JetStreamContext, cancelled: threading.Event
) -> ImageResult:
    body = request.params
    loop = asyncio.get_running_loop()
    size = body.dimensions
    common = {"n": body.n, "seed": body.seed, "steps": body.steps, "cancelled": cancelled}
    if isinstance(body, ImageGenerationBody):
        width, height = size or (512, 512)

        def work() -> list[bytes]:
            return engine.generate(
                body.prompt, width=width, height=height, negative_prompt=body.negative_prompt, **common
            )
    elif isinstance(body, ImageEditBody):
        image = await _input(js, body.image, "image")
        mask = await _input(js, body.mask, "mask") if body.mask is not None else None
        width, height = size or (None, None)

        def work() -> list[bytes]:
            return engine.edit(image, mask, body.prompt, width=width, height=height, **common)
    elif isinstance(body, ImageVariationBody):
        image = await _input(js, body.image, "image")
        width, height = size or (None, None)

        def work() -> list[bytes]:
            return engine.variation(image, width=width, height=height, **common)
    else:
        raise EngineError(f"unknown image operation {type(body).__name__}", status=500)
    pngs = await loop.run_in_executor(pool, work)
    images = await payloads.pack(js, [(png, "image/png", f"image-{i}.png") for i, png in enumerate(pngs)])
    return ImageResult(images=images)


async def transcription(
    engine: Any, request: InferenceRequest, pool: Executor, js: JetStreamContext, cancelled: threading.Event
) -> TranscriptionResult:
    body: TranscriptionBody = request.params
    audio = await _input(js, body.file, "file")
    task = "translate" if request.capability == subjects.TRANSLATION else "transcribe"
    language = None if task == "translate" else body.language
    words = "word" in body.timestamp_granularities and body.response_format == "verbose_json"

    def work() -> tuple[bytes, Any]:
        transcript = engine.transcribe(
            audio,
            task=task,
            language=language,
            prompt=body.prompt,
            temperature=body.temperature,
            word_timestamps=words,
            cancelled=cancelled,
        )
        rendered = render(transcript, body.response_format)
        data = rendered.encode("utf-8") if isinstance(rendered, str) else codec.encode(rendered)
        return data, transcript

    data, transcript = await asyncio.get_running_loop().run_in_executor(pool, work)
    content_type = TRANSCRIPT_CONTENT_TYPES[body.response_format]
    attachment = await payloads.attach(
        js, data, content_type=content_type, filename=f"transcript.{_extension(body.response_format)}"
    )
    return TranscriptionResult(
        body=attachment,
        text=transcript.text[:HISTORY_TEXT_CHARS],
        language=transcript.language,
        duration_s=transcript.duration,
    )


async def speech(
    engine: Any, request: InferenceRequest, pool: Executor, js: JetStreamContext, cancelled: threading.Event
) -> SpeechResult:
    body: SpeechBody = request.params

    def work() -> tuple[bytes, int, float]:
        pcm, rate = engine.speak(body.input, speed=body.speed, voice=body.voice, cancelled=cancelled)
        return engine.encode(pcm, rate, body.response_format), rate, len(pcm) / rate

    audio, rate, seconds = await asyncio.get_running_loop().run_in_executor(pool, work)
    attachment = await payloads.attach(
        js, audio, content_type=SPEECH_CONTENT_TYPES[body.response_format], filename=f"speech.{body.response_format}"
    )
    return SpeechResult(audio=attachment, sample_rate=rate, duration_s=round(seconds, 3))


def _extension(response_format: str) -> str:
    return {"verbose_json": "json", "text": "txt"}.get(response_format, response_format)
