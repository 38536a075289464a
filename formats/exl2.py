"""EXL2 (exllamav2's quantisation) folders: recognised from their config, else their tensors.

exllamav2's converter (``exllamav2/conversion/compile.py``) writes into the output's
``config.json`` a ``quantization_config`` with ``"quant_method": "exl2"``, its ``bits`` and
``head_bits``; folders made before that signature existed are recognised by their tensors,
which only EXL2 names ``<layer>.q_invperm`` / ``.q_scale_max`` (GPTQ's are ``qweight``, ``g_idx``).
A safetensors header is read, never its data: 8 bytes of length, then JSON.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

QUANT_METHOD = "exl2"
EXL2_TENSOR_SUFFIXES = (".q_invperm", ".q_scale_max", ".q_groups")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header


def quantization_config(config: Any) -> dict[str, Any] | None:
    """A config.json's EXL2 signature, or None."""
    if not isinstance(config, dict):
        return None
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == QUANT_METHOD:
        return quant
    return None


def bits_label(config: Any) -> str | None:
    """``4.0bpw`` for a config quantised at 4.0 bits per weight (how EXL2 repos name variants)."""
    quant = quantization_config(config)
    bits = quant.get("bits") if quant else None
    if not isinstance(bits, int | float) or isinstance(bits, bool):
        return None
    text = f"{float(bits):.2f}".rstrip("0")
    return (text + "0" if text.endswith(".") else text) + "bpw"


def read_config(folder: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_exl2(folder: Path) -> bool:
    folder = Path(folder)
    if quantization_config(read_config(folder)) is not None:
        return True
    return any(_has_exl2_tensors(p) for p in sorted(folder.glob("*.safetensors")))


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header."""
    with Path(path).open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            return []
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER:
            return []
        header = fh.read(size)
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, ValueError):
        return []
    return [name for name in parsed if name != "__metadata__"] if isinstance(parsed, dict) else []


def _has_exl2_tensors(path: Path) -> bool:
    try:
        return any(name.endswith(EXL2_TENSOR_SUFFIXES) for name in tensor_names(path))
    except OSError:
        return False
