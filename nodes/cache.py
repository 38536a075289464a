"""Model directories: ``<root>/<model>/<file>``, for the node's cache and a shared models dir.

A model name keeps its ``/`` as directories (``org/repo:Q4_K_M`` → ``org/repo=3AQ4_K_M/``);
any other character outside ``[A-Za-z0-9._-]`` is written ``=XX`` so a name can never
escape the root or collide with another. A file counts only when it is non-empty, has the
registered size and, when the registration has a sha256, that digest. Hashing a large file
is slow, so a verified file gets a ``<file>.verified`` marker holding its size, mtime and
digest; the hash is computed again only when the file changed.

Files being downloaded are ``<file>.part``, with ``<file>.part.json`` saying where the bytes
come from, so a restarted node resumes them; they are renamed to ``<file>`` only after the
size and digest check.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath

import msgspec

from broker.blobs import artifact_name, file_sha256
from events.messages import ModelFile, ModelRecord
from formats.artifacts import artifact_size

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def _segment(text: str) -> str:
    if text in ("", ".", ".."):
        return "".join(f"={b:02X}" for b in text.encode()) or "=00"
    return "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in text.encode())


def model_dir(models_root: Path, name: str) -> Path:
    return models_root.joinpath(*(_segment(part) for part in name.split("/")))


# Formats a runtime loads as a folder (the folder holding ``filename``), not as one file.
FOLDER_FORMATS = frozenset({"diffusers", "ctranslate2"})


def _relative(name: str) -> PurePosixPath | None:
    relative = PurePosixPath(name)
    return None if relative.is_absolute() or ".." in relative.parts or not relative.parts else relative


def manifest(record: ModelRecord) -> list[ModelFile]:
    """The files of a model fetched from its origin ([] for a path model, or a name that cannot be placed)."""
    if record.source.kind != "hf":
        return []
    files = record.source.files or (
        [ModelFile(path=name, size=record.size_bytes, sha256=record.sha256)] if (name := artifact_name(record)) else []
    )
    return files if all(_relative(f.local_path) for f in files) else []


def file_path(models_root: Path, record: ModelRecord, file: ModelFile) -> Path:
    return model_dir(models_root, record.name).joinpath(*PurePosixPath(file.local_path).parts)


def artifact_path(models_root: Path, record: ModelRecord) -> Path | None:
    """What the runtime loads under ``models_root``: the model's file, or its folder (None: cannot be placed)."""
    name = artifact_name(record)
    if name is None or _relative(name) is None:
        return None
    base = model_dir(models_root, record.name)
    relative = PurePosixPath(name)
    if record.source.kind == "hf" and record.format in FOLDER_FORMATS:
        return base.joinpath(*relative.parent.parts)
    return base.joinpath(*relative.parts)


def for_loading(record: ModelRecord, artifact: Path) -> ModelRecord:
    """The record as the runtime needs it: a downloaded projector named by its path on this node."""
    projector = record.source.projector
    if record.source.kind != "hf" or not projector or _relative(projector) is None:
        return record
    depth = len(PurePosixPath(artifact_name(record) or "").parts)
    root = artifact.parents[depth - 1] if record.format not in FOLDER_FORMATS else artifact
    local = root.joinpath(*PurePosixPath(projector).parts)
    return msgspec.structs.replace(record, source=msgspec.structs.replace(record.source, projector=str(local)))


def part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


def journal_path(final: Path) -> Path:
    return final.with_name(final.name + ".part.json")


def _marker_path(final: Path) -> Path:
    return final.with_name(final.name + ".verified")


def problem(path: Path, record: ModelRecord) -> str | None:
    """Why ``path`` (a registered path, or a one-file copy) is not the record's artifact, or None."""
    if record.source.kind == "path" and (path.is_dir() or path.suffix == ".onnx"):
        return _multi_file_problem(path, record)
    return file_problem(path, record.size_bytes, record.sha256)


def missing(models_root: Path, record: ModelRecord) -> str | None:
    """Why the model's copy under ``models_root`` is incomplete (the first file that is), or None."""
    if record.source.kind == "path":  # a copy of a registered file or folder, by its own name
        path = artifact_path(models_root, record)
        return problem(path, record) if path is not None else "no file name"
    files = manifest(record)
    if not files:
        return "no file this node can store"
    for file in files:
        why = file_problem(file_path(models_root, record, file), file.size, file.sha256)
        if why is not None:
            return why if len(files) == 1 else f"{file.local_path}: {why}"
    return None


def file_problem(path: Path, size: int, sha256: str | None) -> str | None:
    """Why ``path`` is not a complete file of ``size`` bytes (0: any) with ``sha256`` (when given)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "no file"
    if not path.is_file():
        return "not a file"
    if stat.st_size == 0:
        return "empty file"
    if size and stat.st_size != size:
        return f"{stat.st_size} bytes, expected {size}"
    if not sha256:
        return None
    marker = _marker_path(path)
    try:
        seen = json.loads(marker.read_text())
        if seen == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256.lower()}:
            return None
    except (OSError, ValueError):
        pass  # no marker, or a stale or broken one: hash the file
    actual = file_sha256(path)
    if actual != sha256.lower():
        return f"sha256 {actual[:12]}…, expected {sha256.lower()[:12]}…"
    mark_verified(path, actual)
    return None


def _multi_file_problem(path: Path, record: ModelRecord) -> str | None:
    """A registered folder (diffusers, CTranslate2) or Piper voice: complete when its total size,
    counted as the registry counted it, is the registered one (they have no single digest)."""
    size = artifact_size(path)
    if size == 0:
        return "empty folder" if path.is_dir() else "empty file"
    if record.size_bytes and size != record.size_bytes:
        return f"{size} bytes in all, expected {record.size_bytes}"
    return None


def mark_verified(path: Path, sha256: str) -> None:
    """Remember that ``path`` (as it is now) has ``sha256``; atomic, so sharing nodes may race."""
    stat = path.stat()
    marker = _marker_path(path)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256.lower()}))
    os.replace(tmp, marker)


def cached_artifact(models_root: Path, record: ModelRecord) -> Path | None:
    """What the runtime loads, when the copy under ``models_root`` is complete; else None."""
    path = artifact_path(models_root, record)
    return path if path is not None and missing(models_root, record) is None else None


def remove(models_root: Path, name: str) -> bool:
    """Delete the model's directory, and parents left empty; True when something went."""
    target = model_dir(models_root, name)
    if not target.exists():
        return False
    shutil.rmtree(target)
    parent = target.parent
    while parent != models_root and parent.is_relative_to(models_root) and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True
