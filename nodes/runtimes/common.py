"""Settings and helpers the runtimes share (threads, artifact size, cheap availability probe)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from events.messages import RuntimeStatus

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


def probe_packages(name: str, capabilities: list[str], packages: list[tuple[str, str]]) -> RuntimeStatus:
    """A runtime's availability from package metadata alone: ``(module, distribution)`` pairs.

    Cheap on purpose: importing torch + diffusers takes seconds and every node start probes
    every runtime. A package that is installed but broken is reported when a model loads.
    """
    versions = []
    for module, distribution in packages:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return RuntimeStatus(name=name, available=False, capabilities=list(capabilities),
                                 error=f"{distribution} is not installed (module {module} not found)")
        try:
            versions.append(f"{distribution} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(distribution)
    return RuntimeStatus(name=name, available=True, version=", ".join(versions), capabilities=list(capabilities))
