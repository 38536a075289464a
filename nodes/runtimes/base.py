"""What a runtime (one engine library) and a loaded engine look like to the node agent.

Engines are blocking: the agent calls them in a worker thread, passing ``on_delta`` (called
from that thread for each piece of streamed text) and ``cancelled`` (set when the client went
away; the engine stops at its next token).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

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
    capabilities: list[str]
    artifact_bytes: int

    def chat(self, body: Any, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome: ...

    def complete(self, body: Any, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome: ...

    def embed(self, body: Any) -> tuple[list[list[float]], Usage]: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    name: str

    def probe(self) -> RuntimeStatus:
        """Whether the engine library imports here; never raises."""
        ...

    def accepts(self, record: ModelRecord) -> bool: ...

    def load(self, record: ModelRecord, path: str) -> Engine: ...
