"""A GGUF metadata reader in plain Python, for hosts without the ``gguf`` package.

The registry host installs no engine extras, yet it must tell a projector from a model, and
a node must know a model's trained context before llama.cpp allocates one. Both read only the
key/value header (versions 2 and 3, either byte order), never the tensors, and stop at the
key they need: llama.cpp's converters write ``general.*`` first, the tokenizer's arrays last.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"
PROJECTOR_ARCH = "clip"  # llama.cpp's mmproj files (vision encoder + projector)

# GGUF value types: fixed-size scalars by struct code; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GgufError(ValueError):
    """Not a GGUF header this reader understands (wrong magic, version, type, or truncated)."""


def metadata(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Every key/value pair of the header in file order; a generator, so callers stop early."""
    with Path(path).open("rb") as fh:
        size = Path(path).stat().st_size
        yield from _Header(fh, size).pairs()


def architecture(path: str | Path) -> str | None:
    """``general.architecture``; None when the file is not a readable GGUF or lacks the key."""
    try:
        for key, value in metadata(path):
            if key == "general.architecture":
                return value if isinstance(value, str) else None
    except (OSError, GgufError):
        return None
    return None


def context_length(path: str | Path) -> int:
    """``<general.architecture>.context_length``, the context the model was trained for; 0 when
    unknown (unreadable metadata is llama.cpp's loader's to report, with its own message)."""
    arch = None
    try:
        for key, value in metadata(path):
            if key == "general.architecture" and isinstance(value, str):
                arch = value
            elif arch is not None and key == f"{arch}.context_length" and isinstance(value, int):
                return value
    except (OSError, GgufError):
        return 0
    return 0


class _Header:
    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh = fh
        self.size = size
        head = fh.read(24)
        if len(head) < 24 or head[:4] != MAGIC:
            raise GgufError("not a GGUF file")
        for order in "<>":  # version 3 allows big-endian files; the version tells which
            version, self.tensors, self.count = struct.unpack(f"{order}IQQ", head[4:24])
            if version in (2, 3):
                self.order = order
                break
        else:
            raise GgufError("unsupported GGUF version (only 2 and 3)")

    def pairs(self) -> Iterator[tuple[str, Any]]:
        for _ in range(self.count):
            key = self._string()
            yield key, self._value(self._unpack("I"))

    def _unpack(self, code: str) -> Any:
        width = struct.calcsize(code)
        data = self.fh.read(width)
        if len(data) < width:
            raise GgufError("truncated GGUF header")
        return struct.unpack(self.order + code, data)[0]

    def _string(self) -> str:
        length = self._unpack("Q")
        if length > self.size - self.fh.tell():
            raise GgufError("a GGUF string runs past the end of the file")
        return self.fh.read(length).decode("utf-8", "replace")

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("I"), self._unpack("Q")
            smallest = struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8  # a string's length
            if count * smallest > self.size - self.fh.tell():
                raise GgufError("a GGUF array runs past the end of the file")
            if item in _SCALARS:  # one unpack for the whole block (token scores, type ids)
                return list(struct.unpack(f"{self.order}{count}{_SCALARS[item]}", self.fh.read(count * smallest)))
            return [self._value(item) for _ in range(count)]
        raise GgufError(f"unknown GGUF value type {kind}")
