"""Nodes: heartbeats (what a node runs, holds and could load), admin commands to one node, goodbyes.

Memory is counted per device: ``ram`` and ``gpu<index>`` (NVML's index). A model's memory is a
``{device: bytes}`` map: an estimate before it is loaded, what it was measured to use after.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct, field

from .base import SCHEMA_VERSION, Answer


class GpuInfo(Struct, kw_only=True):
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: float | None = None


class RuntimeStatus(Struct, kw_only=True):
    """Whether an engine library is importable on the node (and why not), and what it serves."""

    name: str
    available: bool
    version: str | None = None
    error: str | None = None
    capabilities: list[str] = field(default_factory=list)  # what this runtime can offer
    models: list[str] = field(default_factory=list)  # models of this runtime loaded now
    # Whether its models run on a GPU here (as the runtime chooses at load: a CUDA build and a
    # visible device). False from nodes older than this field.
    gpu: bool = False
    # What its engine really computes on: "cpu", or the GPU backend its build uses ("cuda",
    # "metal", "vulkan", ...) and the device its models' memory goes to ("ram" or "gpu0").
    backend: str | None = None
    device: str | None = None


class LoadedModel(Struct, kw_only=True):
    name: str
    runtime: str
    capabilities: list[str]
    state: Literal["downloading", "loading", "ready", "error"] = "ready"
    artifact_path: str | None = None
    artifact_bytes: int = 0
    active_requests: int = 0
    parallel: int = 1
    error: str | None = None
    # "upstream": a model of an existing OpenAI-compatible server the node proxies (nodes/upstream.py).
    # It has no registry record and no artifact: gateways serve it while the node announces it.
    origin: Literal["registry", "upstream"] = "registry"
    memory_bytes: dict[str, int] = field(default_factory=dict)  # measured after load, per device
    estimate_bytes: dict[str, int] = field(default_factory=dict)  # what was expected before load
    loaded_at: float | None = None
    last_used_at: float | None = None  # when its last request ended (or it was loaded)
    load_s: float | None = None  # seconds the load took
    pinned: bool = False  # loaded for the registration's minimum replicas: --keep-alive spares it

    @property
    def servable(self) -> bool:
        """Ready, with a real artifact loaded or an upstream answering for it."""
        return self.state == "ready" and (self.artifact_bytes > 0 or self.origin == "upstream")


class DeviceMemory(Struct, kw_only=True):
    """One device of a node: what it has, what models may use of it, what they use now."""

    device: str  # "ram" or "gpu<index>"
    capacity_bytes: int
    budget_bytes: int  # --memory-budget / --gpu-memory-budget of the capacity
    used_bytes: int = 0  # by the loaded models (measured after their load)
    reserved_bytes: int = 0  # by models being loaded now (their estimate)

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes - self.reserved_bytes


class LoadableModel(Struct, kw_only=True):
    """A model whose files are on the node and whose runtime it has, not loaded now: the node
    loads it when the registry places it there (on demand, for a waiting request)."""

    name: str
    runtime: str
    capabilities: list[str]
    estimate_bytes: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # why its last load failed (not enough memory: with the numbers)
    failed_at: float | None = None


class NodeHeartbeat(Struct, kw_only=True):
    node_id: str
    hostname: str
    started_at: float
    sent_at: float
    interval_s: float
    runtimes: list[RuntimeStatus] = field(default_factory=list)
    models: list[LoadedModel] = field(default_factory=list)
    gpus: list[GpuInfo] = field(default_factory=list)
    cpu_percent: float = 0.0
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0
    active_requests: int = 0
    queue_depth: int = 0
    max_parallel: int = 1
    state: Literal["online", "draining", "drained"] = "online"
    # Ids of the requests the node holds (running or waiting for a slot). A gateway fails a call
    # its node no longer knows: the reply was lost (core NATS is at-most-once, e.g. across a
    # broker restart). None: a node that does not report them (older than this field).
    requests: list[str] | None = None
    memory: list[DeviceMemory] = field(default_factory=list)
    loadable: list[LoadableModel] = field(default_factory=list)
    keep_alive_s: float | None = None  # idle models loaded on demand are unloaded after this
    # Models the registry placed here and the node is working on (waiting for room, loading, or
    # fetching their files). The registry sends a decision again to a node whose later beat lacks
    # it: decisions travel on a core subscription, which misses what comes during a reconnection.
    # None: a node that does not report them (older than this field).
    placed: list[str] | None = None
    schema: int = SCHEMA_VERSION

    def serves(self, model: str, capability: str | None = None) -> bool:
        """Whether ``model`` is loaded with a real artifact (and offers ``capability`` when given)."""
        return any(
            m.name == model and m.servable and (capability is None or capability in m.capabilities) for m in self.models
        )

    def can_load(self, model: str, capability: str | None = None) -> bool:
        """Whether ``model`` is loadable here on demand (files present, not loaded now)."""
        return any(m.name == model and (capability is None or capability in m.capabilities) for m in self.loadable)

    def device(self, name: str) -> DeviceMemory | None:
        return next((d for d in self.memory if d.device == name), None)


class NodeCommand(Struct, kw_only=True):
    """Admin request to one node (``admin.node.<id>.<verb>``); the body may be empty."""

    reason: str = ""


class NodeCommandReply(Answer, kw_only=True):
    node_id: str = ""
    state: str = ""
    active_requests: int = 0


class NodeGoodbye(Struct, kw_only=True):
    node_id: str
    reason: str = "shutdown"
    schema: int = SCHEMA_VERSION
