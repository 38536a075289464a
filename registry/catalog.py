"""The curated catalog (``supported_models.json``): loaded and validated once, at start-up.

The schema is :class:`events.messages.CatalogEntry`; a file that does not match it stops the
registry with a message naming the entry and field, rather than serving a half-read catalog.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from events import codec
from events.messages import CatalogEntry, CatalogFile

DEFAULT_PATH = Path(__file__).with_name("supported_models.json")
SCHEMA = 1

# Which file format each engine reads; an entry pairing them otherwise is a mistake in the file.
ENGINE_FORMATS = {
    "llama_cpp": {"gguf"},
    "faster_whisper": {"ctranslate2"},
    "diffusers": {"diffusers"},
    "piper": {"piper"},
    "exllamav2": {"exl2"},
}


class CatalogError(RuntimeError):
    pass


def load_catalog(path: Path | None = None) -> list[CatalogEntry]:
    path = Path(path or DEFAULT_PATH)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"cannot read the model catalog {path}: {exc}") from None
    try:
        parsed = codec.decode(raw, CatalogFile)
    except msgspec.ValidationError as exc:
        raise CatalogError(f"{path} does not match the catalog schema: {_locate(raw, exc)}") from None
    except msgspec.DecodeError as exc:
        raise CatalogError(f"{path} is not valid JSON: {exc}") from None
    if parsed.schema != SCHEMA:
        raise CatalogError(f"{path} has schema {parsed.schema}; this version reads schema {SCHEMA}")
    seen: set[str] = set()
    for entry in parsed.models:
        if entry.id in seen:
            raise CatalogError(f"{path}: duplicate id {entry.id!r}")
        seen.add(entry.id)
        if entry.format not in ENGINE_FORMATS[entry.engine]:
            raise CatalogError(f"{path}: entry {entry.id!r} pairs engine {entry.engine!r} with format {entry.format!r}")
        if entry.format == "exl2" and entry.recommended_filename != "config.json":
            raise CatalogError(f"{path}: entry {entry.id!r} is EXL2; its file must be the folder's config.json")
        if entry.format == "gguf" and not entry.recommended_filename.endswith(".gguf"):
            raise CatalogError(f"{path}: entry {entry.id!r} is GGUF but its file is {entry.recommended_filename!r}")
    return parsed.models


def _locate(raw: bytes, exc: msgspec.ValidationError) -> str:
    """msgspec says ``$.models[3].size_bytes``; add the id of entry 3, which a human can find."""
    message = str(exc)
    marker = "$.models["
    if marker in message:
        index = message.split(marker, 1)[1].split("]", 1)[0]
        try:
            entry = msgspec.json.decode(raw)["models"][int(index)]
            return f"{message} (entry id {entry.get('id')!r})"
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return message
    return message


def search(entries: list[CatalogEntry], query: str) -> list[CatalogEntry]:
    """Entries whose id, name, repo or a tag contains ``query`` (case-insensitive)."""
    q = query.strip().lower()
    if not q:
        return list(entries)
    return [
        e
        for e in entries
        if q in e.id or q in e.name.lower() or q in e.repo.lower() or any(q in tag.lower() for tag in e.tags)
    ]
