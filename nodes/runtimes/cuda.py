"""What a node has for CUDA, found without importing torch or any engine (probes must be cheap).

torch's CUDA build is read from ``torch/version.py`` (a CPU wheel says ``cuda = None``); the
devices from the NVIDIA driver's ``/proc/driver/nvidia/gpus`` (Linux), else NVML when
nvidia-ml-py is installed; ``CUDA_VISIBLE_DEVICES`` set to nothing (or -1) hides them all, as
CUDA itself does. The compiler and ninja are what torch's JIT extension builds need.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def torch_cuda_version() -> tuple[bool, str | None]:
    """(torch is installed, the CUDA version it was built for or None), read from its version.py."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return False, None
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version_file.read_text(encoding="utf-8")
    except OSError:
        return True, None
    match = re.search(r"^cuda(?::[^=]*)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return True, match.group(1) if match else None


def cuda_device_count() -> int:
    """NVIDIA GPUs this process may use (0 when hidden by CUDA_VISIBLE_DEVICES or absent)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        count = sum(1 for _ in NVIDIA_GPUS.iterdir()) if NVIDIA_GPUS.is_dir() else _nvml_count()
    except OSError:
        count = _nvml_count()
    if visible is not None:
        count = min(count, len([v for v in visible.split(",") if v.strip()]))
    return count


def _nvml_count() -> int:
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError:
        return 0
    finally:
        pynvml.nvmlShutdown()


def nvcc() -> str | None:
    """The CUDA compiler torch's cpp_extension would use: $CUDA_HOME/bin/nvcc, else on PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def ninja() -> str | None:
    """torch's cpp_extension.load needs the ninja build tool (the pip package puts it on PATH)."""
    return shutil.which("ninja")
