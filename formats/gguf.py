"""A GGUF metadata reader in plain Python, for hosts without the ``gguf`` package.

The registry host installs no engine extras, yet it must tell a projector from a model, and
a node must know a model's trained context before llama.cpp allocates one, and how much memory
it will take before loading it. All read only the header (versions 2 and 3, either byte order):
the key/value pairs and, for :func:`layout`, the tensor table, never the tensor data. The first
two stop at the key they need: llama.cpp's converters write ``general.*`` first, the
tokenizer's arrays last.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Layout:
    """What a memory estimate needs of a model: its shape and the bytes of each tensor."""

    architecture: str | None
    context_length: int = 0
    block_count: int = 0
    embedding_length: int = 0
    feed_forward_length: int = 0
    head_count: int = 0
    head_count_kv: int = 0
    key_length: int = 0  # per head; 0: embedding_length / head_count
    value_length: int = 0
    vocab_size: int = 0
    tensor_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def weights_bytes(self) -> int:
        return sum(self.tensor_bytes.values())


_LAYOUT_KEYS = {
    "context_length": "context_length",
    "block_count": "block_count",
    "embedding_length": "embedding_length",
    "feed_forward_length": "feed_forward_length",
    "attention.head_count": "head_count",
    "attention.head_count_kv": "head_count_kv",
    "attention.key_length": "key_length",
    "attention.value_length": "value_length",
    "vocab_size": "vocab_size",
}
MAX_TENSORS = 1_000_000  # far more than any model has; bounds what a corrupt header can make us read


def layout(path: str | Path) -> Layout:
    """The model's hyperparameters and tensor sizes (the gaps between tensor offsets, so every
    quantisation type is sized without a table of them). Raises GgufError or OSError."""
    size = Path(path).stat().st_size
    with Path(path).open("rb") as fh:
        header = _Header(fh, size)
        values: dict[str, object] = {}
        arch = None
        alignment = 32
        for key, value in header.pairs(skip_arrays=True):
            if key == "general.architecture" and isinstance(value, str):
                arch = value
            elif key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
            elif key == "tokenizer.ggml.tokens" and isinstance(value, _Skipped):
                values.setdefault("vocab_size", value.count)
            elif arch is not None and key.startswith(arch + "."):
                field_name = _LAYOUT_KEYS.get(key[len(arch) + 1 :])
                if field_name is not None:
                    if isinstance(value, int) and not isinstance(value, bool):
                        values[field_name] = value
                    elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                        values[field_name] = max(value)  # per-layer values (e.g. head_count_kv)
        tensors = header.tensors_table()
        data_start = -(-fh.tell() // alignment) * alignment
    offsets = sorted((offset, name) for name, offset in tensors)
    sizes = {}
    for i, (offset, name) in enumerate(offsets):
        end = offsets[i + 1][0] if i + 1 < len(offsets) else size - data_start
        sizes[name] = max(0, end - offset)
    return Layout(architecture=arch, tensor_bytes=sizes, **values)


class _Skipped:
    """An array whose items were skipped (``tokenizer.ggml.tokens``): only its length is kept."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count


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

    def pairs(self, *, skip_arrays: bool = False) -> Iterator[tuple[str, Any]]:
        """``skip_arrays``: arrays of strings are seeked over, their length kept (:class:`_Skipped`)."""
        for _ in range(self.count):
            key = self._string()
            kind = self._unpack("I")
            yield key, self._skip_array() if skip_arrays and kind == _ARRAY else self._value(kind)

    def _skip_array(self) -> Any:
        item, count = self._unpack("I"), self._unpack("Q")
        if item in _SCALARS:
            width = struct.calcsize(_SCALARS[item])
            if count * width > self.size - self.fh.tell():
                raise GgufError("a GGUF array runs past the end of the file")
            if count <= 64:
                return list(struct.unpack(f"{self.order}{count}{_SCALARS[item]}", self.fh.read(count * width)))
            self.fh.seek(count * width, 1)
            return _Skipped(count)
        if item != _STRING:
            return [self._value(item) for _ in range(count)]
        if count * 8 > self.size - self.fh.tell():
            raise GgufError("a GGUF array runs past the end of the file")
        for _ in range(count):
            length = self._unpack("Q")
            if length > self.size - self.fh.tell():
                raise GgufError("a GGUF string runs past the end of the file")
            self.fh.seek(length, 1)
        return _Skipped(count)

    def tensors_table(self) -> list[tuple[str, int]]:
        """(name, data offset) of every tensor; read right after :meth:`pairs` is exhausted."""
        if self.tensors > MAX_TENSORS:
            raise GgufError(f"a GGUF header claiming {self.tensors} tensors")
        table = []
        for _ in range(self.tensors):
            name = self._string()
            dims = self._unpack("I")
            if dims > 8:
                raise GgufError(f"tensor {name} has {dims} dimensions")
            self.fh.seek(8 * dims + 4, 1)  # the dimensions, then the type
            table.append((name, self._unpack("Q")))
        return table

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
