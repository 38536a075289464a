"""Catalogs: the curated catalog's schema and hub view, and pages of Hugging Face GGUF models."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Struct, field

from .base import Answer
from .downloads import DownloadProgress
from .models import ModelState

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
    format: Literal["gguf", "ctranslate2", "diffusers", "piper", "safetensors", "exl2"]
    engine: Literal["llama_cpp", "faster_whisper", "diffusers", "piper", "exllamav2"]
    platforms: Annotated[list[Platform], msgspec.Meta(min_length=1)]
    # The branch or commit of the repo holding this variant (EXL2 repos keep each bit rate on a
    # branch: 4.0bpw); None: the default branch.
    revision: str | None = None


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
