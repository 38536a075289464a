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

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from events.messages import Choice, ModelRecord, RuntimeStatus, Usage


class Cancellation(threading.Event):
    """Set when the client went away. A thread engine polls it between tokens; an async engine
    (nodes/upstream.py) registers ``on_set`` to stop waiting at once, in its event loop."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[tuple[Any, Callable[[], None]]] = []

    def set(self) -> None:
        super().set()
        callbacks, self._callbacks = self._callbacks, []
        for loop, callback in callbacks:
            loop.call_soon_threadsafe(callback)

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` in the running loop once set (soon, if set already); returns its remover."""
        entry = (asyncio.get_running_loop(), callback)
        if self.is_set():
            entry[0].call_soon(callback)
        else:
            self._callbacks.append(entry)
        return lambda: self._callbacks.remove(entry) if entry in self._callbacks else None


class EngineError(Exception):
    """A request the engine refuses (too long a prompt, bad parameter): reported, not crashed."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


@dataclass
class TextOutcome:
    """A text answer: its first choice's text and finish reason, the usage of all of them, and
    every choice when the answer is more than one plain text (n > 1, tool calls, logprobs)."""

    text: str
    finish_reason: str
    usage: Usage
    choices: list[Choice] | None = None


# Called with each piece of streamed text: a str (choice 0's text, nothing else), or a
# TextDelta when it carries more (another choice, logprobs, tool call fragments).
OnDelta = Callable[[Any], None]


class LoadedEngine(Protocol):
    """What the node agent itself uses of every engine (nodes/serving.py); its request methods
    are called by capability (nodes/runners.py, nodes/media.py)."""

    capabilities: list[str]
    artifact_bytes: int
    slots: int  # calls it runs at once

    def close(self) -> None: ...


class Engine(LoadedEngine, Protocol):
    """A text engine (llama.cpp): chat, completion, embeddings."""

    def chat(self, body: Any, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome: ...

    def complete(self, body: Any, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome: ...

    def embed(self, body: Any) -> tuple[list[list[float]], Usage]: ...


# An engine whose methods are coroutines (nodes/upstream.py: an existing server's model) has the
# same methods, awaited in the event loop; its ``on_delta`` is a coroutine function too.

# The multimodal engines take and return bytes, each through the methods of its one
# implementation, whose signatures and docstrings are the contract (no second copy here):
# images DiffusersEngine.generate/edit/variation, transcription FasterWhisperEngine.transcribe,
# speech PiperEngine.speak/encode.


class Runtime(Protocol):
    name: str
    capabilities: list[str]  # what models of this runtime can offer (reported in heartbeats)

    def probe(self) -> RuntimeStatus:
        """Whether the engine library is installed here; never raises, and is cheap (no import
        of the library: every node start probes every runtime; ``load`` imports it)."""
        ...

    def accepts(self, record: ModelRecord) -> bool: ...

    def load(self, record: ModelRecord, path: str, *, slots: int = 1) -> LoadedEngine:
        """An engine for ``slots`` concurrent calls, or fewer (its ``slots`` says how many)."""
        ...
