"""A do-nothing engine for measuring the router's own overhead (benchmarks only).

``MinimalEngine`` answers every request at once with a fixed short text, so that whatever
time a request takes through the gateway is the stack's (HTTP, NATS, node, history), not
the model's. ``MinimalRuntime`` claims GGUF registrations, so a tiny GGUF registered the
normal way (``Registry.register``) is served by this engine instead of llama.cpp.

An optional fixed service time (``delay_s``, or the ``BENCH_ENGINE_DELAY_MS`` environment
variable read by ``MinimalRuntime``; 0 by default) makes every chat and completion call hold
its slot that long before answering, like a model of a known speed (``bench/dispatch.py``).
The wait ends early when the request is cancelled.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from events import subjects
from events.messages import ModelRecord, RuntimeStatus, Usage
from nodes.runtimes.base import OnDelta, TextOutcome

NAME = "bench_minimal"
TEXT = "pong"
USAGE = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
EMBEDDING_DIMS = 8
DELAY_ENV = "BENCH_ENGINE_DELAY_MS"


class MinimalEngine:
    def __init__(self, path: str, delay_s: float = 0.0, slots: int = 1) -> None:
        self.capabilities = [subjects.CHAT, subjects.COMPLETION, subjects.EMBEDDING]
        self.slots = slots  # it holds no per-call state, so any number of calls run at once
        self.artifact_bytes = Path(path).stat().st_size
        self.delay_s = max(0.0, delay_s)

    def _answer(self, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        if on_delta is not None:
            on_delta(TEXT)  # a stream shows its text at once, then the service time runs
        if self.delay_s > 0:  # the fixed service time; a cancellation ends it early
            deadline = time.monotonic() + self.delay_s
            remaining = self.delay_s
            while remaining > 0 and not cancelled.wait(remaining):
                remaining = deadline - time.monotonic()
        return TextOutcome(TEXT, "stop", USAGE)

    def chat(self, body: Any, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        return self._answer(on_delta, cancelled)

    def complete(self, body: Any, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        return self._answer(on_delta, cancelled)

    def embed(self, body: Any) -> tuple[list[list[float]], Usage]:
        inputs = body.inputs
        return [[0.0] * EMBEDDING_DIMS for _ in inputs], Usage(len(inputs), 0, len(inputs))

    def close(self) -> None:
        pass


class MinimalRuntime:
    name = NAME

    def __init__(self, delay_s: float | None = None) -> None:
        """``delay_s``: service time of every chat/completion call; None reads ``BENCH_ENGINE_DELAY_MS``."""
        if delay_s is None:
            delay_s = float(os.environ.get(DELAY_ENV) or 0) / 1000
        self.delay_s = delay_s

    def probe(self) -> RuntimeStatus:
        return RuntimeStatus(name=NAME, available=True, version="bench")

    def accepts(self, record: ModelRecord) -> bool:
        return record.format == "gguf"

    def load(self, record: ModelRecord, path: str, *, slots: int = 1) -> MinimalEngine:
        return MinimalEngine(path, self.delay_s, slots)
