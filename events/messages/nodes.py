"""Nodes: heartbeats (what a node runs and holds), admin commands to one node, goodbyes."""

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

    @property
    def servable(self) -> bool:
        """Ready, with a real artifact loaded or an upstream answering for it."""
        return self.state == "ready" and (self.artifact_bytes > 0 or self.origin == "upstream")


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
    schema: int = SCHEMA_VERSION

    def serves(self, model: str, capability: str | None = None) -> bool:
        """Whether ``model`` is loaded with a real artifact (and offers ``capability`` when given)."""
        return any(
            m.name == model and m.servable and (capability is None or capability in m.capabilities) for m in self.models
        )


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
