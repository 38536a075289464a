"""One module per engine; ``default_runtimes`` lists the ones this build knows.

Importing a runtime module is cheap: each imports its engine library only in load(); probe()
reads package metadata.
"""

from ..remote_media import ImageFetcher
from .base import Engine, EngineError, Runtime, TextOutcome
from .diffusers_images import DiffusersRuntime
from .exllamav2 import ExLlamaV2Runtime
from .faster_whisper import FasterWhisperRuntime
from .llama_cpp import LlamaCppRuntime
from .piper_tts import PiperRuntime


def default_runtimes(
    names: list[str] | None = None, *, images: ImageFetcher | None = None, gpu_layers: int | None = None
) -> list[Runtime]:
    """Every runtime this build knows, or only those ``names`` (``--runtimes``); ``images``: how
    vision chats fetch remote images (default: from public addresses only); ``gpu_layers``:
    llama.cpp's offload limit (``--gpu-layers``; None: every layer, where it can)."""
    runtimes: list[Runtime] = [
        LlamaCppRuntime(images=images, gpu_layers=gpu_layers),
        ExLlamaV2Runtime(),
        DiffusersRuntime(),
        FasterWhisperRuntime(),
        PiperRuntime(),
    ]
    if names is None:
        return runtimes
    known = {r.name for r in runtimes}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown runtime(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [r for r in runtimes if r.name in names]


__all__ = [
    "DiffusersRuntime",
    "ExLlamaV2Runtime",
    "Engine",
    "EngineError",
    "FasterWhisperRuntime",
    "LlamaCppRuntime",
    "PiperRuntime",
    "Runtime",
    "TextOutcome",
    "default_runtimes",
]
