"""Settings and helpers the multimodal runtimes share (threads, artifact size)."""

from __future__ import annotations

import os
from pathlib import Path

THREADS_ENV = "LLM_ROUTER_ENGINE_THREADS"


def engine_threads() -> int:
    """CPU threads for torch / CTranslate2 / onnxruntime; 0 leaves the library's default.

    On a small CPU shared with other work, one thread is often several times faster than
    the default (offline-runtimes.md, "Thread pitfall"), hence a setting rather than a guess.
    """
    value = os.environ.get(THREADS_ENV, "0")
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be an integer, not {value!r}") from None
    if threads < 0:
        raise ValueError(f"{THREADS_ENV} must be 0 (library default) or more, not {threads}")
    return threads


def artifact_bytes(path: Path) -> int:
    """Bytes on disk of a model file, or of every file under a model folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
