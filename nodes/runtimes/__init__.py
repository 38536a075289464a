"""One module per engine; ``default_runtimes`` lists the ones this build knows.

Importing a runtime module is cheap: each imports its engine library only in probe()/load().
"""

from .base import Engine, EngineError, Runtime, TextOutcome
from .diffusers_images import DiffusersRuntime
from .faster_whisper import FasterWhisperRuntime
from .llama_cpp import LlamaCppRuntime
from .piper_tts import PiperRuntime


def default_runtimes() -> list[Runtime]:
    return [LlamaCppRuntime()]


__all__ = [
    "DiffusersRuntime",
    "Engine",
    "EngineError",
    "FasterWhisperRuntime",
    "LlamaCppRuntime",
    "PiperRuntime",
    "Runtime",
    "TextOutcome",
    "default_runtimes",
]
