"""Every message that travels on NATS, one msgspec Struct each.

JSON on the wire, so ``nats sub`` and ``nats stream view`` show readable text. Reply
messages form a tagged union on the ``kind`` field; new kinds (image results, blob claim
checks, queue notices) are added as new tagged Structs without changing the existing ones.
Every top-level message carries ``schema`` so a reader can tell which contract wrote it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from msgspec import Struct, field

SCHEMA_VERSION = 1

P = TypeVar("P")


def now() -> float:
    return time.time()


class Usage(Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# ---------------------------------------------------------------- inference


class InferenceRequest(Struct, Generic[P], kw_only=True):
    """Gateway -> node. ``params`` is the validated OpenAI body for the capability."""

    request_id: str
    model: str
    capability: str
    params: P
    stream: bool = False
    deadline: float | None = None  # unix time after which the node may drop it
    # "reject": answer a 429 ``node_busy`` Failure at once when every slot is taken, so the
    # gateway can queue or go elsewhere; "queue": wait on the node for a slot.
    when_busy: Literal["queue", "reject"] = "queue"
    schema: int = SCHEMA_VERSION


class Accepted(Struct, tag_field="kind", tag="accepted", kw_only=True):
    """A node took a streamed request and is starting it, so the gateway can open the stream."""

    request_id: str = ""  # stamped by the node's Responder
    node_id: str = ""
    waited_ms: float = 0.0  # time spent waiting for a free slot on the node


class TextDelta(Struct, tag_field="kind", tag="delta", kw_only=True):
    """A piece of generated text of a streamed answer."""

    request_id: str = ""  # stamped by the node's Responder
    node_id: str = ""
    text: str
    index: int = 0


class TextDone(Struct, tag_field="kind", tag="done", kw_only=True):
    """Ends a text answer. Carries the whole text only when the request was not streamed."""

    request_id: str = ""  # stamped by the node's Responder
    node_id: str = ""
    finish_reason: str
    usage: Usage
    text: str = ""
    index: int = 0


class EmbeddingResult(Struct, tag_field="kind", tag="embeddings", kw_only=True):
    request_id: str = ""  # stamped by the node's Responder
    node_id: str = ""
    vectors: list[list[float]]
    usage: Usage


class Attachment(Struct, kw_only=True, omit_defaults=True):
    """Binary payload of a request or reply (claim check): the bytes themselves when small,
    else the name of an object in the temporary ``payloads`` object store.

    NATS messages are limited (1 MB by default) while an audio upload may be 25 MB, so large
    bytes travel through the object store and only this small reference in the message.
    """

    size: int
    content_type: str = "application/octet-stream"
    filename: str = ""
    data: bytes | None = None  # inline bytes (base64 in JSON)
    object: str | None = None  # name in events.storage.OBJ_PAYLOADS

    @property
    def inline(self) -> bool:
        return self.object is None


class ImageResult(Struct, tag_field="kind", tag="images", kw_only=True):
    """Generated or edited images, PNG each, in request order."""

    request_id: str = ""  # stamped by the node's Responder
    node_id: str = ""
    images: list[Attachment]


class TranscriptionResult(Struct, tag_field="kind", tag="transcription", kw_only=True):
    """A transcript (or translation) already rendered in the requested response_format."""

    request_id: str = ""  # stamped by the node's Responder
    node_id: str = ""
    body: Attachment  # JSON for json/verbose_json, text for text/srt/vtt; content_type says which
    text: str = ""  # the plain transcript, for the history record (truncated)
    language: str = ""
    duration_s: float = 0.0


class SpeechResult(Struct, tag_field="kind", tag="speech", kw_only=True):
    """Synthesised speech, encoded in the requested response_format."""

    request_id: str = ""  # stamped by the node's Responder
    node_id: str = ""
    audio: Attachment
    sample_rate: int
    duration_s: float = 0.0


class Failure(Struct, tag_field="kind", tag="error", kw_only=True):
    """Ends an answer with an error; ``status`` is the HTTP status the gateway should use."""

    request_id: str = ""  # stamped by the node's Responder
    node_id: str = ""
    status: int
    message: str
    type: str = "server_error"
    code: str | None = None
    param: str | None = None


Reply = Accepted | TextDelta | TextDone | EmbeddingResult | ImageResult | TranscriptionResult | SpeechResult | Failure
FINAL_REPLIES = (TextDone, EmbeddingResult, ImageResult, TranscriptionResult, SpeechResult, Failure)


class CancelRequest(Struct, kw_only=True):
    request_id: str
    reason: str = "client disconnected"
    schema: int = SCHEMA_VERSION


# ---------------------------------------------------------------- nodes


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
            m.name == model
            and m.state == "ready"
            and m.artifact_bytes > 0
            and (capability is None or capability in m.capabilities)
            for m in self.models
        )


class Answer(Struct, kw_only=True):
    """What every admin answer starts with; ``status`` follows HTTP so the gateway can pass it on."""

    ok: bool
    status: int = 200
    message: str = ""


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


class DownloadProgress(Struct, kw_only=True):
    """A node's report on one model download, on ``downloads.progress.<node>.<model>``."""

    node_id: str
    model: str
    state: Literal["running", "done", "failed"] = "running"
    bytes_done: int = 0
    bytes_total: int = 0
    speed_bps: float = 0.0
    eta_s: float | None = None
    error: str | None = None
    task_id: str | None = None
    source: str | None = None  # where the bytes come from: object store, origin URL, shared path
    at: float = field(default_factory=now)
    schema: int = SCHEMA_VERSION

    @property
    def fraction(self) -> float | None:
        return self.bytes_done / self.bytes_total if self.bytes_total > 0 else None


# ---------------------------------------------------------------- registry

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

    kind: Literal["path", "hf"]
    path: str | None = None
    repo: str | None = None
    filename: str | None = None
    revision: str | None = None
    projector: str | None = None  # a GGUF's multimodal projector (mmproj), path kind: gives "vision"
    files: list[ModelFile] = field(default_factory=list)


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


class DeleteModel(Struct, kw_only=True):
    name: str


class DownloadModel(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """"Download now" (``admin.model.download``, ``POST /v0/models/{model}/download``).

    Targets: ``node`` (one node id), ``all`` (every live node that can run the model), or
    neither: one node, chosen by the registry (what a request for a missing model does).
    """

    model: str = ""
    node: str | None = None
    all: bool = False


class NodeDownload(Struct, kw_only=True):
    """The registry's order to one node (``admin.node.<id>.download``)."""

    model: str
    task_id: str


NodeDownloadState = Literal["present", "started", "running", "not_found", "unsupported", "failed"]


class NodeDownloadReply(Answer, kw_only=True):
    node_id: str = ""
    model: str = ""
    task_id: str = ""
    state: NodeDownloadState = "failed"
    source: str = ""  # where the node gets (or has) the file


class DownloadTask(Struct, kw_only=True):
    """A "download now" task, kept in the ``downloads`` bucket under ``task.<id>``."""

    task_id: str
    model: str
    nodes: list[NodeDownloadReply]
    created_at: float = field(default_factory=now)
    schema: int = SCHEMA_VERSION


class DownloadReply(Answer, kw_only=True):
    task: DownloadTask | None = None


class AdminReply(Answer, kw_only=True):
    """Answer to a model register/delete request."""

    record: ModelRecord | None = None


# ---------------------------------------------------------------- catalogs

Capability = Literal["chat", "completion", "embedding", "image", "transcription", "translation", "speech", "vision"]
Platform = Literal["linux-cpu", "linux-cuda", "macos-metal", "windows-cpu", "windows-cuda"]
CatalogId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=128)]
RepoId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")]
PositiveBytes = Annotated[int, msgspec.Meta(gt=0)]


class CatalogEntry(Struct, kw_only=True, forbid_unknown_fields=True):
    """One model of the curated catalog, ``registry/supported_models.json`` (its schema)."""

    id: CatalogId
    name: Annotated[str, msgspec.Meta(min_length=1)]
    description: str
    repo: RepoId
    recommended_filename: Annotated[str, msgspec.Meta(min_length=1)]
    size_bytes: PositiveBytes
    required_memory_bytes: PositiveBytes
    tags: list[str]
    capabilities: Annotated[list[Capability], msgspec.Meta(min_length=1)]
    quantization: str | None
    parameter_count: str | None
    format: Literal["gguf", "ctranslate2", "diffusers", "piper", "safetensors"]
    engine: Literal["llama_cpp", "faster_whisper", "diffusers", "piper", "exllamav2"]
    platforms: Annotated[list[Platform], msgspec.Meta(min_length=1)]


class CatalogFile(Struct, forbid_unknown_fields=True):
    schema: int
    models: list[CatalogEntry]


class HfInfo(Struct, kw_only=True):
    downloads: int | None = None
    likes: int | None = None


class HubEntry(CatalogEntry, kw_only=True):
    """A catalog entry with what the cluster has done with it."""

    status: Literal["available", "downloading", "downloaded"]
    lifecycle_status: ModelState | None = None  # None: not registered
    registered_as: str | None = None
    download_progress: DownloadProgress | None = None
    hf_info: HfInfo | None = None


class HubQuery(Struct, kw_only=True):
    search: str = ""


class HubReply(Answer, kw_only=True):
    models: list[HubEntry] = field(default_factory=list)


class GgufVariant(Struct, kw_only=True):
    """One downloadable GGUF of a repository (a split model counts once, by its first part)."""

    filename: str
    quantization: str | None
    size_bytes: int
    last_modified: str | None
    url: str
    parts: int = 1


class HfModel(Struct, kw_only=True):
    id: str
    downloads: int | None = None
    likes: int | None = None
    last_modified: str | None = None
    tags: list[str] = field(default_factory=list)
    variants: list[GgufVariant] = field(default_factory=list)


class HfQuery(Struct, kw_only=True):
    search: str = ""
    # Bounded: page N fetches N * per_page results from Hugging Face (and a huge N overflowed).
    page: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    per_page: Annotated[int, msgspec.Meta(ge=1, le=100)] = 50


class HfPage(Struct, kw_only=True):
    search: str
    page: int
    per_page: int
    has_more: bool
    models: list[HfModel]
    fetched_at: float
    stale: bool = False  # Hugging Face failed: this is the last page fetched


class HfReply(Answer, kw_only=True):
    page: HfPage | None = None


# ---------------------------------------------------------------- history


class HistoryRecord(Struct, kw_only=True):
    """One request as the gateway saw it, appended to the HISTORY stream."""

    id: str
    capability: str
    endpoint: str  # the HTTP path, e.g. /v1/chat/completions
    model: str
    status_code: int
    started_at: float
    duration_ms: float
    stream: bool = False
    node_id: str | None = None
    first_byte_ms: float | None = None
    usage: Usage | None = None
    error: str | None = None
    request: msgspec.Raw = msgspec.Raw(b"null")
    response: Any = None
    schema: int = SCHEMA_VERSION
