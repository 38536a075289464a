"""The node's own model cache: ``<data-dir>/models/<model>/<file>``.

A model name keeps its ``/`` as directories (``org/repo:Q4_K_M`` → ``org/repo=3AQ4_K_M/``);
any other character outside ``[A-Za-z0-9._-]`` is written ``=XX`` so a name can never
escape the cache or collide with another. A cached file counts only when it is non-empty
and has the registered size: a 0-byte or partial file is as good as none.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

from events.messages import ModelRecord

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def _segment(text: str) -> str:
    if text in ("", ".", ".."):
        return "".join(f"={b:02X}" for b in text.encode()) or "=00"
    return "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in text.encode())


def model_dir(models_root: Path, name: str) -> Path:
    return models_root.joinpath(*(_segment(part) for part in name.split("/")))


def artifact_path(models_root: Path, record: ModelRecord) -> Path | None:
    """Where the record's file lives in the cache (None for models not fetched into it)."""
    filename = record.source.filename
    if record.source.kind != "hf" or not filename:
        return None
    relative = PurePosixPath(filename)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    return model_dir(models_root, record.name).joinpath(*relative.parts)


def cached_artifact(models_root: Path, record: ModelRecord) -> Path | None:
    """The cached file when it is complete, else None."""
    path = artifact_path(models_root, record)
    if path is None or not path.is_file():
        return None
    size = path.stat().st_size
    if size == 0 or (record.size_bytes and size != record.size_bytes):
        return None
    return path


def remove(models_root: Path, name: str) -> bool:
    """Delete the model's cache directory, and parents left empty; True when something went."""
    target = model_dir(models_root, name)
    if not target.exists():
        return False
    shutil.rmtree(target)
    parent = target.parent
    while parent != models_root and parent.is_relative_to(models_root) and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True
