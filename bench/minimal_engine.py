"""A do-nothing engine for measuring the router's own overhead (benchmarks only).

``MinimalEngine`` answers every request at once with a fixed short text, so that whatever
time a request takes through the gateway is the stack's (HTTP, NATS, node, history), not
the model's. ``MinimalRuntime`` claims GGUF registrations, so a tiny GGUF registered the
normal way (``Registry.register``) is served by this engine instead of llama.cpp.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from events import subjects
from events.messages import ModelRecord, RuntimeStatus, Usage
from nodes.runtimes.base import OnDelta, TextOutcome

NAME = "bench_minimal"
TEXT = "pong"
USAGE = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
EMBEDDING_DIMS = 8


class MinimalEngine:
    def __init__(self, path: str) -> None:
        self.capabilities = [subjects.CHAT, subjects.COMPLETION, subjects.EMBEDDING]
        self.artifact_bytes = Path(path).stat().st_size

    def _answer(self, on_delta: OnDelta | None) -> TextOutcome:
        if on_delta is not None:
            on_delta(TEXT)
        return TextOutcome(TEXT, "stop", USAGE)

    def chat(self, body: Any, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        return self._answer(on_delta)

    def complete(self, body: Any, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        return self._answer(on_delta)

    def embed(self, body: Any) -> tuple[list[list[float]], Usage]:
        inputs = body.inputs
        return [[0.0] * EMBEDDING_DIMS for _ in inputs], Usage(len(inputs), 0, len(inputs))

    def close(self) -> None:
        pass


class MinimalRuntime:
    name = NAME

    def probe(self) -> RuntimeStatus:
        return RuntimeStatus(name=NAME, available=True, version="bench")

    def accepts(self, record: ModelRecord) -> bool:
        return record.format == "gguf"

    def load(self, record: ModelRecord, path: str) -> MinimalEngine:
        return MinimalEngine(path)
