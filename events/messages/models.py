"""Models: the registry's records (``models`` bucket), their sources and files, model events,
and the admin requests that register or delete one."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct, field

from .base import SCHEMA_VERSION, Answer, now
from .downloads import DownloadProgress

ModelState = Literal["registered", "downloading", "ready", "pending_conversion", "error"]


class ModelFile(Struct, kw_only=True, omit_defaults=True):
    """One file of a model made of several (a pipeline folder, a voice and its config, a split GGUF)."""

    path: str  # in the repository
    size: int = 0
    sha256: str | None = None
    local: str | None = None  # its name on the node when it differs (``x.fp16.safetensors`` → ``x.safetensors``)

    @property
    def local_path(self) -> str:
        return self.local or self.path


class ModelSource(Struct, kw_only=True, omit_defaults=True):
    """Where nodes get the artifact: a path they can see, or an origin repository.

    ``filename`` is what runtimes load (or, for a folder model, the file at its root); when the
    model has more files than that one, ``files`` lists all of them, ``filename`` included.
    """

    # "upstream": only on the node that proxies an existing server, never in the registry (nodes/upstream.py)
    kind: Literal["path", "hf", "upstream"]
    path: str | None = None
    repo: str | None = None
    filename: str | None = None
    revision: str | None = None
    projector: str | None = None  # a GGUF's multimodal projector (mmproj), path kind: gives "vision"
    files: list[ModelFile] = field(default_factory=list)


class Replicas(Struct, kw_only=True, forbid_unknown_fields=True):
    """How many nodes should have a model loaded: ``min`` are placed when it is registered (and
    when nodes join), up to ``max`` while requests keep queueing for it (default: ``min``)."""

    min: int = 1
    max: int | None = None

    @property
    def most(self) -> int:
        return max(self.min, self.max if self.max is not None else self.min)


class ModelRecord(Struct, kw_only=True):
    """Value of the ``models`` KV bucket, written by the registry only."""

    name: str
    format: str
    runtime: str
    capabilities: list[str]
    source: ModelSource
    state: ModelState = "registered"
    size_bytes: int = 0
    required_memory_bytes: int = 0
    sha256: str | None = None
    quantization: str | None = None
    catalog_id: str | None = None  # the curated catalog entry it was registered from
    description: str = ""
    tags: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    download: DownloadProgress | None = None  # the most advanced download in progress
    predownload: bool = False  # nodes fetch it as soon as it is registered, not on first use
    # None: every node that has its files loads it while it fits in the node's memory budget.
    replicas: Replicas | None = None
    created_at: float = field(default_factory=now)
    updated_at: float = field(default_factory=now)
    schema: int = SCHEMA_VERSION


class ModelEvent(Struct, kw_only=True):
    """On REGISTRY_EVENTS: ``registry.events.model.<event>``."""

    event: Literal["added", "updated", "deleted"]
    name: str
    record: ModelRecord | None = None
    at: float = field(default_factory=now)
    schema: int = SCHEMA_VERSION


class RegisterModel(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Admin request (``admin.model.register``, ``POST /v0/models/register``). Metadata only.

    Exactly one source: ``catalog_id`` (curated catalog), ``repo`` (+ ``filename``), ``url``
    (a Hugging Face repo or file URL), or ``path`` (a file the nodes can see).
    """

    catalog_id: str | None = None
    repo: str | None = None
    filename: str | None = None
    revision: str | None = None
    url: str | None = None
    path: str | None = None
    projector: str | None = None  # with path: a GGUF's mmproj (default: the one mmproj*.gguf beside it)
    name: str | None = None
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    predownload: bool = False
    replicas: int | Replicas | None = None  # an int: that many, no more


class DeleteModel(Struct, kw_only=True):
    name: str


class AdminReply(Answer, kw_only=True):
    """Answer to a model register/delete request."""

    record: ModelRecord | None = None
