"""Facts about the machine a node runs on: its persistent id, CPU/memory use, GPUs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psutil

from events.messages import GpuInfo


def persistent_node_id(data_dir: Path) -> str:
    """The node id survives restarts, so the registry and the gateway see one node, not many."""
    path = Path(data_dir) / "node-id"
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    path.parent.mkdir(parents=True, exist_ok=True)
    value = uuid.uuid4().hex[:12]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


def cpu_and_memory() -> tuple[float, int, int]:
    mem = psutil.virtual_memory()
    return psutil.cpu_percent(interval=None), int(mem.total), int(mem.total - mem.available)


def gpus() -> list[GpuInfo]:
    """NVIDIA GPUs through NVML when the ``gpu`` extra is installed; empty otherwise."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []  # no driver on this machine
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            found.append(
                GpuInfo(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_bytes=int(memory.total),
                    memory_used_bytes=int(memory.used),
                    utilization_percent=float(utilization.gpu),
                )
            )
        return found
    finally:
        pynvml.nvmlShutdown()
