"""Downloads: a node's progress reports, "download now" requests, the registry's orders to
nodes and the tasks that track them."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct, field

from .base import SCHEMA_VERSION, Answer, now


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


class DownloadModel(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """ "Download now" (``admin.model.download``, ``POST /v0/models/{model}/download``).

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
