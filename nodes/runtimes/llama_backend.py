"""Which backend a llama-cpp-python build computes on, and how many layers it offloads.

The build decides: a wheel compiled with ``-DGGML_CUDA=on`` (scripts/setup.sh does when
``nvcc`` is there) ships ``libggml-cuda.so`` beside ``libllama.so``, a Metal or Vulkan build its
own ggml library. :func:`build_backend` reads that from the package's files, without importing
it (a node start probes every runtime, and the import loads the CUDA runtime). Whether the
build really offloads is ``llama_cpp.llama_supports_gpu_offload()``, asked when a model loads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# ggml's GPU backend libraries, by the name a heartbeat reports.
_LIBRARIES = {
    "cuda": "ggml-cuda",
    "hip": "ggml-hip",
    "metal": "ggml-metal",
    "vulkan": "ggml-vulkan",
    "sycl": "ggml-sycl",
}
ALL_LAYERS = 0x7FFFFFFF  # what llama.cpp reads as "every layer" (llama-cpp-python's -1)


def build_backend() -> str:
    """ "cuda", "hip", "metal", "vulkan", "sycl" (the first GPU library the build has), else "cpu"."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return "cpu"
    if spec is None or not spec.submodule_search_locations:
        return "cpu"
    names: list[str] = []
    for location in spec.submodule_search_locations:
        lib = Path(location) / "lib"
        if lib.is_dir():
            names += [p.name for p in lib.iterdir()]
    for backend, library in _LIBRARIES.items():
        if any(name.startswith(f"lib{library}.") or name.startswith(f"{library}.") for name in names):
            return backend
    return "cpu"


def runs_on(backend: str, gpus: int) -> tuple[str, str]:
    """(backend, device) models really use: a GPU build on a machine without a GPU runs on the CPU.
    Metal has no NVML GPU to count: an Apple machine always has its GPU."""
    if backend == "metal" or (backend != "cpu" and gpus > 0):
        return backend, "gpu0"
    return "cpu", "ram"


def gpu_layers(limit: int | None, *, supports_offload: bool, on_gpu: bool) -> int:
    """``n_gpu_layers`` for a load: every layer where the build offloads and a GPU is there,
    at most ``limit`` (``--gpu-layers``; None: no limit); 0 on the CPU."""
    if not supports_offload or not on_gpu:
        return 0
    if limit is None or limit < 0:
        return ALL_LAYERS
    return limit
