"""What a runtime (one engine library) and a loaded engine look like to the node agent.

Engines are blocking: the agent calls them in a worker thread, passing ``on_delta`` (called
from that thread for each piece of streamed text) and ``cancelled`` (set when the client went
away; the engine stops at its next token).

``Runtime.load(..., slots=N)`` asks for N calls at once (the node's ``--parallel``); the engine's
``slots`` says how many it really runs at once, which may be fewer where the library is not
safe for concurrent calls. The node runs at most that many and reports it in its heartbeat,
so the gateway never sends an engine more than it can run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from events.messages import ModelRecord, RuntimeStatus, Usage


class EngineError(Exception):
    """A request the engine refuses (too long a prompt, bad parameter): reported, not crashed."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


@dataclass
class TextOutcome:
    text: str
    finish_reason: str
    usage: Usage


OnDelta = Callable[[str], None]


class Engine(Protocol):
    """A text engine (llama.cpp): chat, completion, embeddings."""

    capabilities: list[str]
    artifact_bytes: int
    slots: int  # calls it runs at once

    def chat(self, body: Any, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome: ...

    def complete(self, body: Any, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome: ...

    def embed(self, body: Any) -> tuple[list[list[float]], Usage]: ...

    def close(self) -> None: ...


# The multimodal engines take and return bytes; ``nodes.media`` calls them by capability.
# (Full signatures and error conventions: the runtimes' docstrings.)


class ImageEngine(Protocol):
    """diffusers: PNG bytes out."""

    capabilities: list[str]
    artifact_bytes: int
    slots: int  # calls it runs at once

    def generate(
        self,
        prompt: str,
        n: int = 1,
        width: int = 512,
        height: int = 512,
        seed: int | None = None,
        steps: int | None = None,
        negative_prompt: str | None = None,
        *,
        cancelled: threading.Event | None = None,
    ) -> list[bytes]: ...

    def edit(
        self,
        image: bytes,
        mask: bytes | None,
        prompt: str,
        n: int = 1,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        *,
        cancelled: threading.Event | None = None,
    ) -> list[bytes]: ...

    def variation(
        self,
        image: bytes,
        n: int = 1,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        *,
        cancelled: threading.Event | None = None,
    ) -> list[bytes]: ...

    def close(self) -> None: ...


class TranscriptionEngine(Protocol):
    """faster-whisper: audio bytes in, a ``Transcript`` out (rendered by ``transcript_formats``)."""

    capabilities: list[str]
    artifact_bytes: int
    slots: int  # calls it runs at once

    def transcribe(
        self,
        audio: bytes,
        *,
        task: str = "transcribe",
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        word_timestamps: bool = False,
        cancelled: threading.Event | None = None,
    ) -> Any: ...

    def close(self) -> None: ...


class SpeechEngine(Protocol):
    """Piper voices: text to int16 samples, then encoded to a response format."""

    capabilities: list[str]
    artifact_bytes: int
    slots: int  # calls it runs at once

    def speak(
        self, text: str, *, speed: float = 1.0, voice: str | None = None, cancelled: threading.Event | None = None
    ) -> tuple[Any, int]: ...

    def encode(self, pcm: Any, sample_rate: int, response_format: str = "mp3") -> bytes: ...

    def close(self) -> None: ...


AnyEngine = Engine | ImageEngine | TranscriptionEngine | SpeechEngine


class Runtime(Protocol):
    name: str
    capabilities: list[str]  # what models of this runtime can offer (reported in heartbeats)

    def probe(self) -> RuntimeStatus:
        """Whether the engine library is installed here; never raises, and is cheap (no import
        of the library: every node start probes every runtime; ``load`` imports it)."""
        ...

    def accepts(self, record: ModelRecord) -> bool: ...

    def load(self, record: ModelRecord, path: str, *, slots: int = 1) -> AnyEngine:
        """An engine for ``slots`` concurrent calls, or fewer (its ``slots`` says how many)."""
        ...
