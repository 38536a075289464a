"""How much memory a llama.cpp model takes: estimated from its GGUF before loading, and read
from what llama.cpp itself reports allocating while it loads.

The estimate is llama.cpp's own arithmetic for its three kinds of buffer, per context (each
engine slot is a ``Llama`` instance with its own context):

- weights: the tensor bytes of the GGUF. On the CPU they are mmap-ed, so every slot shares
  one copy; offloaded to a GPU, each instance uploads its own.
- KV cache: ``n_layer * n_ctx * n_head_kv * (key_length + value_length)`` f16 values.
- compute buffers (without flash attention, llama-cpp-python's default): the attention scores
  of one micro-batch against the whole context (``n_ubatch * n_ctx * (n_head + 1)`` f32, the
  ``+ 1`` the mask), the logits of a micro-batch and the feed-forward activations. At a large
  context the scores dominate everything else: 320 MiB for a 0.4 MB model at 32k tokens.

The measurement does not use the process's RSS: llama.cpp allocates its KV and compute
buffers at load but touches their pages only when a long prompt runs, so RSS after a load
says a few MB where the allocation is hundreds. Its log lines (``CPU KV buffer size = 8.00
MiB``, ``CUDA0 compute buffer size = ...``) name every buffer with its device; a log callback
collects those of the loads running in the current thread. The mmap-ed weights
(``CPU_Mapped``) are counted once, however many slots map the file.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.gguf import Layout

MiB = 1024 * 1024
CONTEXT_PAD = 256  # llama.cpp rounds a context up to a multiple of this
MAX_BATCH = 512  # llama-cpp-python's n_batch (and so n_ubatch), at most the context asked for

_BUFFER = re.compile(r"(\S+)\s+(?:model|KV|compute|output|RS|recurrent)\s+buffer size\s*=\s*([\d.]+)\s*MiB")
_GPU = re.compile(r"^(?:CUDA|ROCm|HIP|Vulkan|SYCL|MUSA|CANN)(\d+)$")


@dataclass(frozen=True)
class Plan:
    """How the engine will load a model: what the estimate depends on."""

    n_ctx: int  # the context asked for, already limited to the trained one
    slots: int = 1
    gpu_layers: int = 0  # layers offloaded (0: CPU only)
    gpu_device: str = "gpu0"
    projector_bytes: int = 0  # a vision model's mmproj, loaded by every slot


def estimate(layout: Layout, plan: Plan) -> dict[str, int]:
    """Bytes per device ("ram", ``plan.gpu_device``) the model will take once loaded."""
    n_layer = layout.block_count or 1
    n_head = layout.head_count or 1
    n_embd = layout.embedding_length
    head_k = layout.key_length or (n_embd // n_head if n_embd else 0)
    head_v = layout.value_length or head_k
    n_head_kv = layout.head_count_kv or n_head
    n_ctx = -(-max(plan.n_ctx, 1) // CONTEXT_PAD) * CONTEXT_PAD
    n_ubatch = min(MAX_BATCH, max(plan.n_ctx, 1))
    offloaded = min(plan.gpu_layers, n_layer)

    layer_bytes = [0] * n_layer
    other: dict[str, int] = {}
    for name, size in layout.tensor_bytes.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < n_layer:
            layer_bytes[int(parts[1])] += size
        else:
            other[name] = size
    # llama.cpp offloads the last layers first, and the output layer only with all of them.
    gpu_weights = sum(layer_bytes[n_layer - offloaded :]) if offloaded else 0
    cpu_weights = sum(layer_bytes[: n_layer - offloaded])
    for name, size in other.items():
        if plan.gpu_layers > n_layer and not name.startswith("token_embd"):
            gpu_weights += size
        else:
            cpu_weights += size

    kv_per_layer = n_ctx * n_head_kv * (head_k + head_v) * 2  # f16
    compute = n_ubatch * (n_ctx * (n_head + 1) * 4 + layout.vocab_size * 4 + layout.feed_forward_length * 12)
    ram = cpu_weights + (n_layer - offloaded) * kv_per_layer * plan.slots
    gpu = gpu_weights * plan.slots + offloaded * kv_per_layer * plan.slots
    if offloaded:
        gpu += compute * plan.slots
    else:
        ram += compute * plan.slots
    ram += plan.projector_bytes * plan.slots
    need = {"ram": ram}
    if gpu:
        need[plan.gpu_device] = gpu
    return need


def device_of(buffer: str) -> str:
    """The node's device name for a llama.cpp buffer type (``CPU_Mapped``, ``CUDA0``, ``CUDA_Host``)."""
    match = _GPU.match(buffer)
    if match:
        return f"gpu{match.group(1)}"
    if buffer == "Metal":
        return "gpu0"
    return "ram"


def parse_buffers(lines: list[str]) -> dict[str, int]:
    """Bytes per device from llama.cpp's ``... buffer size = N MiB`` log lines."""
    found: dict[str, int] = {}
    mapped: dict[str, int] = {}
    for line in lines:
        for buffer, mib in _BUFFER.findall(line):
            device, size = device_of(buffer), round(float(mib) * MiB)
            if buffer.endswith("_Mapped"):  # the mmap-ed file: one copy however many instances map it
                mapped[device] = max(mapped.get(device, 0), size)
            else:
                found[device] = found.get(device, 0) + size
    for device, size in mapped.items():
        found[device] = found.get(device, 0) + size
    return found


class _Capture:
    """llama.cpp's log callback: lines of the loads running under :func:`reported` in this
    thread are kept; every line still goes to llama-cpp-python's own callback (which prints
    it when a model was loaded with verbose=True)."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.installed = False
        self.lock = threading.Lock()
        self.callback: Any = None
        self.forward: Any = None

    def install(self) -> None:
        with self.lock:
            if self.installed:
                return
            import llama_cpp
            from llama_cpp import _logger

            self.forward = _logger.llama_log_callback

            @llama_cpp.llama_log_callback
            def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
                lines = getattr(self.local, "lines", None)
                if lines is not None and len(lines) < 10_000:
                    lines.append(text.decode("utf-8", "replace"))
                self.forward(level, text, user_data)

            self.callback = callback  # kept: llama.cpp holds only a C pointer to it
            llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
            self.installed = True


_capture = _Capture()


@contextmanager
def reported() -> Iterator[dict[str, int]]:
    """Collect what llama.cpp allocates in the block (this thread's loads): the dict yielded
    is filled, per device, when the block ends."""
    _capture.install()
    outer = getattr(_capture.local, "lines", None)
    _capture.local.lines = []
    found: dict[str, int] = {}
    try:
        yield found
    finally:
        lines, _capture.local.lines = _capture.local.lines, outer
        if outer is not None:
            outer.extend(lines)
        found.update(parse_buffers(lines))


def file_bytes(path: str | None) -> int:
    try:
        return Path(path).stat().st_size if path else 0
    except OSError:
        return 0
