"""What the runtimes share: threads and per-model settings, the cheap availability probe, the runtime shape."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import structlog

from events.messages import ModelRecord, RuntimeStatus

log = structlog.get_logger("node")

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


def single_slot(runtime: str, model: str, requested: int, why: str) -> int:
    """1, for an engine that cannot run calls at once; says so when more were asked for."""
    if requested > 1:
        log.warning(
            "parallel lowered for this runtime", runtime=runtime, model=model, requested=requested, slots=1, reason=why
        )
    return 1


def setting(labels: dict[str, str], label: str, env: str) -> str | None:
    """A per-model setting: the registration's label, else the environment variable, else None."""
    return (labels or {}).get(label) or os.environ.get(env) or None


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
            return RuntimeStatus(
                name=name,
                available=False,
                capabilities=list(capabilities),
                error=f"{distribution} is not installed (module {module} not found)",
            )
        try:
            versions.append(f"{distribution} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(distribution)
    return RuntimeStatus(name=name, available=True, version=", ".join(versions), capabilities=list(capabilities))


class PackageRuntime:
    """A runtime known by its name, capabilities and the packages it needs (``(module, distribution)``).

    Subclasses add ``load``; ``threads`` (None: LLM_ROUTER_ENGINE_THREADS) and ``device`` (None:
    the library's choice) are passed on to their engines.
    """

    name: str
    capabilities: list[str]
    packages: list[tuple[str, str]]

    def __init__(self, *, threads: int | None = None, device: str | None = None) -> None:
        self.threads = engine_threads() if threads is None else threads
        self.device = device

    def probe(self) -> RuntimeStatus:
        status = probe_packages(self.name, self.capabilities, self.packages)
        status.gpu = status.available and (self.device is None or self.device.startswith("cuda")) and self.runs_on_gpu()
        return status

    def runs_on_gpu(self) -> bool:
        """Whether load would choose a CUDA GPU here (cheap: no import of the library)."""
        return False

    def accepts(self, record: ModelRecord) -> bool:
        return record.runtime == self.name
