"""Where a node gets a model's file, in a fixed order of preference.

1. the node's own cache (``<data-dir>/models/<model>/``), or the registered path itself;
2. a shared models dir (``--shared-models-dir``, e.g. on NFS), used in place, never copied;
3. the registry's object store over NATS;
4. the origin (Hugging Face through huggingface_hub), only when its host is allowed;
5. nowhere: :class:`ModelNotFound`, which says where it looked.

The first two are local (:meth:`Resolver.local`) and need no network; the last two are
remote and give the place to download from. Steps 1-3 and a disallowed origin answer in
milliseconds, so a model that exists nowhere is reported at once.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import structlog
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo

from broker.blobs import artifact_name, blob_info, blob_name, object_sha256
from events.messages import ModelRecord

from . import cache

log = structlog.get_logger("node")

ORIGIN_HEAD_TIMEOUT_S = 10.0
SHARE_ID_FILE = ".llm-router-share-id"


class ModelNotFound(Exception):
    """No source has the model; the message lists what was tried."""


class SourceUnavailable(Exception):
    """A source that should have the model could not be reached (worth retrying later)."""


@dataclass
class RemoteFile:
    """One file to download: where it goes, and where from (an object, or a URL pinned to a commit)."""

    name: str  # in the repository / object store
    target: Path
    size: int = 0
    sha256: str | None = None
    blob: ObjectInfo | None = None
    url: str | None = None
    etag: str | None = None
    received_sha256: str | None = None  # what was received, hashed as it was written (object store)


@dataclass
class Location:
    kind: Literal["cache", "path", "shared", "object_store", "origin"]
    path: Path  # what the runtime loads: where it is (local kinds) or will be (remote kinds)
    source: str  # for people: the path, "object store model-blobs/<name>", or the origin URL
    files: list[RemoteFile] = field(default_factory=list)  # remote kinds: what to download
    into_shared: bool = False  # remote files that go into the shared dir (under a lease)
    tried: list[str] = field(default_factory=list)

    @property
    def local(self) -> bool:
        return self.kind in ("cache", "path", "shared")

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def origin_host(endpoint: str) -> tuple[str, str]:
    parsed = urlparse(endpoint)
    return parsed.hostname or "", parsed.netloc


class Resolver:
    def __init__(
        self,
        js: JetStreamContext,
        models_dir: Path,
        *,
        shared_dir: Path | None = None,
        allow_origins: list[str] | None = None,
        hf_endpoint: str | None = None,
    ) -> None:
        self.js = js
        self.models_dir = models_dir
        self.shared_dir = shared_dir
        self.hf_endpoint = (hf_endpoint or hf_constants.ENDPOINT).rstrip("/")
        host, netloc = origin_host(self.hf_endpoint)
        # Default: the Hugging Face endpoint in use, so HF_ENDPOINT (a mirror) just works.
        self.allow_origins = [netloc] if allow_origins is None else [o for o in allow_origins if o and o != "none"]
        self._origin_allowed = host in self.allow_origins or netloc in self.allow_origins

    # ------------------------------------------------------------ where files go

    def download_root(self, record: ModelRecord) -> tuple[Path, bool]:
        """The models root a download of ``record`` goes to, and whether that is the shared dir."""
        if self.shared_dir is not None and os.access(self.shared_dir, os.W_OK):
            return self.shared_dir, True
        return self.models_dir, False

    def share_id(self) -> str:
        """An id stored in the shared dir itself, so nodes mounting it anywhere agree on it."""
        assert self.shared_dir is not None
        marker = self.shared_dir / SHARE_ID_FILE
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return marker.read_text().strip()
        with os.fdopen(fd, "w") as fh:
            fh.write(uuid.uuid4().hex)
        return marker.read_text().strip()

    # ------------------------------------------------------------ resolution

    def local(self, record: ModelRecord) -> Location | None:
        """A complete copy this node can load now (blocking: it may hash a file once)."""
        if record.source.kind == "path" and record.source.path:
            path = Path(record.source.path)
            if cache.problem(path, record) is None:
                return Location("path", path, str(path))
        cached = cache.cached_artifact(self.models_dir, record)
        if cached is not None:
            return Location("cache", cached, str(cached))
        if self.shared_dir is not None:
            shared = cache.cached_artifact(self.shared_dir, record)
            if shared is not None:
                return Location("shared", shared, str(shared))
        return None

    async def locate(self, record: ModelRecord) -> Location:
        """The best place to get the model from; raises ModelNotFound with what was tried."""
        found = await asyncio.to_thread(self.local, record)
        if found is not None:
            return found
        tried = [self._local_summary(record)]
        files = cache.manifest(record)
        name = artifact_name(record)
        if name is None or (record.source.kind == "hf" and not files):
            raise ModelNotFound(f"model {record.name!r} has no file to fetch")
        root, into_shared = self.download_root(record)
        target = cache.artifact_path(root, record)
        plan = [(f.path, cache.file_path(root, record, f), f.size, f.sha256) for f in files] or [
            (name, cache.model_dir(root, record.name) / name, record.size_bytes, record.sha256)
        ]
        blobs = [await blob_info(self.js, blob_name(record.name, path)) for path, *_ in plan]
        if all(info is not None and info.size > 0 for info in blobs):
            remote = [
                RemoteFile(path, dest, info.size, digest or object_sha256(info), blob=info)
                for (path, dest, _, digest), info in zip(plan, blobs)
            ]
            where = f"object store {blobs[0].bucket}/{blob_name(record.name, name)}"
            return Location("object_store", target, where, remote, into_shared=into_shared, tried=tried)
        tried.append("not in the object store")
        if record.source.kind != "hf":
            raise ModelNotFound(f"model {record.name!r} was not found: " + "; ".join(tried))
        if not self._origin_allowed:
            tried.append(f"origin {origin_host(self.hf_endpoint)[1]} is not allowed (--allow-origin)")
            raise ModelNotFound(f"model {record.name!r} was not found: " + "; ".join(tried))
        if hf_constants.HF_HUB_OFFLINE:
            tried.append("origin not tried: HF_HUB_OFFLINE is set")
            raise ModelNotFound(f"model {record.name!r} was not found: " + "; ".join(tried))
        return await self._origin(record, target, plan, into_shared, tried)

    def _local_summary(self, record: ModelRecord) -> str:
        parts = []
        if record.source.kind == "path":
            parts.append(f"{record.source.path}: {cache.problem(Path(record.source.path or ''), record)}")
        parts.append(f"cache: {cache.missing(self.models_dir, record)}")
        parts.append(
            f"shared dir: {cache.missing(self.shared_dir, record)}" if self.shared_dir else "no shared models dir"
        )
        return ", ".join(parts)

    async def _origin(
        self, record: ModelRecord, target: Path, plan: list, into_shared: bool, tried: list[str]
    ) -> Location:
        """One HEAD, for the file the runtime loads: it gives the commit every URL is pinned to."""
        source = record.source
        url = hf_hub_url(source.repo, source.filename, revision=source.revision or "main", endpoint=self.hf_endpoint)
        try:
            meta = await asyncio.to_thread(get_hf_file_metadata, url, timeout=ORIGIN_HEAD_TIMEOUT_S)
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
            tried.append(f"origin: {type(exc).__name__} for {url}")
            raise ModelNotFound(f"model {record.name!r} was not found: " + "; ".join(tried)) from None
        except (HfHubHTTPError, OSError) as exc:
            raise SourceUnavailable(f"origin {url} unreachable: {exc}") from None
        commit = meta.commit_hash or source.revision or "main"
        remote = []
        for path, dest, size, digest in plan:
            pinned = hf_hub_url(source.repo, path, revision=commit, endpoint=self.hf_endpoint)
            if path == source.filename:
                etag = meta.etag
                size = meta.size or size
                digest = digest or (etag if etag and len(etag) == 64 else None)
            else:
                etag = digest
            remote.append(RemoteFile(path, dest, size, digest, url=pinned, etag=etag))
        entry = hf_hub_url(source.repo, source.filename, revision=commit, endpoint=self.hf_endpoint)
        return Location("origin", target, entry, remote, into_shared=into_shared, tried=tried)
