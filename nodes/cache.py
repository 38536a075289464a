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

from broker.blobs import artifact_name, file_sha256
from events.messages import ModelRecord
from registry.artifacts import artifact_size

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def _segment(text: str) -> str:
    if text in ("", ".", ".."):
        return "".join(f"={b:02X}" for b in text.encode()) or "=00"
    return "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in text.encode())


def model_dir(models_root: Path, name: str) -> Path:
    return models_root.joinpath(*(_segment(part) for part in name.split("/")))


def artifact_path(models_root: Path, record: ModelRecord) -> Path | None:
    """Where the record's file lives under ``models_root`` (None when it cannot be placed)."""
    name = artifact_name(record)
    if name is None:
        return None
    return model_dir(models_root, record.name).joinpath(*PurePosixPath(name).parts)


def part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


def journal_path(final: Path) -> Path:
    return final.with_name(final.name + ".part.json")


def _marker_path(final: Path) -> Path:
    return final.with_name(final.name + ".verified")


def problem(path: Path, record: ModelRecord, *, expected_sha256: str | None = None) -> str | None:
    """Why ``path`` is not a complete copy of the record's file, or None when it is."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "no file"
    if record.source.kind == "path" and (path.is_dir() or path.suffix == ".onnx"):
        return _multi_file_problem(path, record)
    if not path.is_file():
        return "not a file"
    if stat.st_size == 0:
        return "empty file"
    if record.size_bytes and stat.st_size != record.size_bytes:
        return f"{stat.st_size} bytes, expected {record.size_bytes}"
    digest = expected_sha256 or record.sha256
    if not digest:
        return None
    marker = _marker_path(path)
    try:
        seen = json.loads(marker.read_text())
        if seen == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.lower()}:
            return None
    except (OSError, ValueError):
        pass  # no marker, or a stale or broken one: hash the file
    actual = file_sha256(path)
    if actual != digest.lower():
        return f"sha256 {actual[:12]}…, expected {digest.lower()[:12]}…"
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
    """The file under ``models_root`` when it is complete, else None."""
    path = artifact_path(models_root, record)
    if path is None or problem(path, record) is not None:
        return None
    return path


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
