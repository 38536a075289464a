"""Recognising a model artifact on disk: its format, runtime and capabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from events import subjects

GGUF_MAGIC = b"GGUF"


class UnrecognisedModel(ValueError):
    pass


@dataclass(frozen=True)
class ArtifactKind:
    format: str
    runtime: str
    capabilities: list[str]


def detect(path: Path) -> ArtifactKind:
    """Read the file's magic bytes, not its suffix; raise UnrecognisedModel with a reason."""
    if not path.exists():
        raise UnrecognisedModel(f"no such file: {path}")
    if not path.is_file():
        raise UnrecognisedModel(f"not a model file: {path} (a directory; only GGUF files are supported so far)")
    if path.stat().st_size == 0:
        raise UnrecognisedModel(f"empty file: {path}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == GGUF_MAGIC:
        return ArtifactKind("gguf", "llama_cpp", [subjects.CHAT, subjects.COMPLETION, subjects.EMBEDDING])
    raise UnrecognisedModel(f"unrecognised model file: {path} (expected a GGUF file)")
