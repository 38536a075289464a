"""A node's memory, per device: what it has, what models may use (the budget), what they need.

Devices are ``ram`` and each GPU NVML reports (``gpu<index>``). The budget of each is an
option (``--memory-budget`` for RAM, ``--gpu-memory-budget`` for every GPU): bytes (``16GiB``,
``8GB``, ``512MiB``, a plain number) or a share of the capacity (``80%``). The defaults leave
headroom for the operating system and the node itself on RAM (80%) and for the CUDA context
and fragmentation on a GPU (90%).

A model's need is a ``{device: bytes}`` map. Before a load it is an estimate: the runtime's own
(llama.cpp's from the GGUF), else the registration's ``required_memory_bytes``, else the size of
its files with a margin. After the load it is what the engine reports allocating, else the
growth of the process's RSS (and of each GPU's used memory) across the load.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from events.messages import DeviceMemory, GpuInfo, ModelRecord
from formats.artifacts import artifact_size

from . import system

RAM = "ram"
DEFAULT_RAM_BUDGET = "80%"
DEFAULT_GPU_BUDGET = "90%"
FILE_MARGIN = 1.2  # a model of another format takes about its files' size, and some more

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*|%)\s*$")


def gpu_device(index: int) -> str:
    return f"gpu{index}"


def parse_budget(text: str | int | None, capacity: int, *, default: str) -> int:
    """``text`` as bytes of a device of ``capacity`` bytes: ``80%``, ``16GiB``, ``8GB``, ``1000000``."""
    value = default if text is None or text == "" else text
    if isinstance(value, int):
        amount = value
    else:
        match = _AMOUNT.match(str(value))
        if match is None:
            raise ValueError(f"memory budget {value!r}: give bytes (16GiB, 8GB, 512MiB, 1000000) or a share (80%)")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit == "%":
            if not 0 < number <= 100:
                raise ValueError(f"memory budget {value!r}: a share must be over 0% and at most 100%")
            amount = int(capacity * number / 100)
        elif unit in _UNITS:
            amount = int(number * _UNITS[unit])
        else:
            raise ValueError(f"memory budget {value!r}: unknown unit {match.group(2)!r}")
    if amount <= 0:
        raise ValueError(f"memory budget {value!r} must be more than 0 bytes")
    return amount


def gib(n: int) -> str:
    """Bytes for people: MiB below a GiB (tiny test models), GiB above."""
    if abs(n) < 1024**3:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024**3:.2f} GiB"


class NotEnoughMemory(Exception):
    """A model does not fit: the message has the numbers (need, budget, what uses the rest)."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent  # larger than the whole budget: it will never fit here


@dataclass
class Resident:
    """What room planning needs of a loaded model."""

    name: str
    memory: dict[str, int]
    idle: bool  # no request running or waiting, and past its grace after loading
    last_used: float


@dataclass
class Room:
    """The answer of :meth:`Memory.plan`: unload ``victims`` and it fits, or ``wait`` (models
    that could free the room are busy now)."""

    victims: list[str] = field(default_factory=list)
    wait: bool = False
    why: str = ""


class Memory:
    """The devices of one node and their budgets; used and reserved bytes are the caller's."""

    def __init__(self, *, ram_budget: str | int | None = None, gpu_budget: str | int | None = None) -> None:
        self.ram_capacity = int(psutil.virtual_memory().total)
        self.ram_budget = parse_budget(ram_budget, self.ram_capacity, default=DEFAULT_RAM_BUDGET)
        self._gpu_budget_text = gpu_budget
        parse_budget(gpu_budget, 1 << 40, default=DEFAULT_GPU_BUDGET)  # fail at start on a bad option
        self.gpus: dict[str, tuple[int, int]] = {}  # device: (capacity, budget)

    def set_gpus(self, gpus: list[GpuInfo]) -> None:
        self.gpus = {
            gpu_device(g.index): (
                g.memory_total_bytes,
                parse_budget(self._gpu_budget_text, g.memory_total_bytes, default=DEFAULT_GPU_BUDGET),
            )
            for g in gpus
        }

    def budgets(self) -> dict[str, int]:
        return {RAM: self.ram_budget, **{device: budget for device, (_, budget) in self.gpus.items()}}

    def report(self, used: dict[str, int], reserved: dict[str, int]) -> list[DeviceMemory]:
        capacities = {RAM: self.ram_capacity, **{device: cap for device, (cap, _) in self.gpus.items()}}
        return [
            DeviceMemory(
                device=device,
                capacity_bytes=capacities[device],
                budget_bytes=budget,
                used_bytes=used.get(device, 0),
                reserved_bytes=reserved.get(device, 0),
            )
            for device, budget in self.budgets().items()
        ]

    def check(self, model: str, need: dict[str, int]) -> None:
        """NotEnoughMemory (permanent) when ``need`` exceeds a device's whole budget, or names a device this node lacks."""
        budgets = self.budgets()
        for device, size in need.items():
            budget = budgets.get(device)
            if budget is None:
                raise NotEnoughMemory(
                    f"model {model!r} needs {gib(size)} on {device}, which this node has not", permanent=True
                )
            if size > budget:
                option = "--memory-budget" if device == RAM else "--gpu-memory-budget"
                raise NotEnoughMemory(
                    f"model {model!r} needs about {gib(size)} of {device}, more than this node's whole budget of "
                    f"{gib(budget)} ({option}, of {gib(self._capacity(device))})",
                    permanent=True,
                )

    def _capacity(self, device: str) -> int:
        return self.ram_capacity if device == RAM else self.gpus.get(device, (0, 0))[0]

    def plan(
        self, model: str, need: dict[str, int], residents: list[Resident], reserved: dict[str, int], *, evict: bool
    ) -> Room:
        """Room for ``need`` next to ``residents`` and the loads in progress (``reserved``):
        nothing to unload, the least recently used idle models to unload (``evict``), or wait.
        Raises NotEnoughMemory when it cannot fit (or not without unloading, and ``evict`` is off)."""
        self.check(model, need)
        budgets = self.budgets()
        used: dict[str, int] = {}
        for resident in residents:
            for device, size in resident.memory.items():
                used[device] = used.get(device, 0) + size
        missing = {
            device: size - (budgets[device] - used.get(device, 0) - reserved.get(device, 0))
            for device, size in need.items()
        }
        missing = {device: short for device, short in missing.items() if short > 0}
        if not missing:
            return Room()
        summary = self._summary(model, need, used, reserved, residents)
        if not evict:
            raise NotEnoughMemory(f"{summary}; not unloading others for it", permanent=False)
        victims = []
        for resident in sorted((r for r in residents if r.idle), key=lambda r: r.last_used):
            if not any(resident.memory.get(device, 0) > 0 for device in missing):
                continue  # frees nothing where room is missing
            victims.append(resident.name)
            for device in list(missing):
                missing[device] -= resident.memory.get(device, 0)
                if missing[device] <= 0:
                    del missing[device]
            if not missing:
                return Room(victims=victims)
        busy = [r for r in residents if not r.idle and any(r.memory.get(d, 0) > 0 for d in missing)]
        if busy or any(reserved.get(device, 0) > 0 for device in missing):
            return Room(wait=True, why=f"{summary}; waiting for {', '.join(r.name for r in busy) or 'loads'} to finish")
        raise NotEnoughMemory(summary, permanent=False)

    def _summary(
        self,
        model: str,
        need: dict[str, int],
        used: dict[str, int],
        reserved: dict[str, int],
        residents: list[Resident],
    ) -> str:
        parts = []
        budgets = self.budgets()
        for device, size in need.items():
            by = ", ".join(f"{r.name} {gib(r.memory[device])}" for r in residents if r.memory.get(device))
            loading = f", {gib(reserved[device])} being loaded" if reserved.get(device) else ""
            parts.append(
                f"{gib(size)} of {device} needed, {gib(budgets[device] - used.get(device, 0) - reserved.get(device, 0))} "
                f"free of a {gib(budgets[device])} budget (used: {by or 'nothing'}{loading})"
            )
        return f"model {model!r} does not fit: " + "; ".join(parts)


def estimate(runtime: Any, record: ModelRecord, path: Path, *, slots: int, device: str = RAM) -> dict[str, int]:
    """Bytes per device before loading: the runtime's estimate, else the registration's
    ``required_memory_bytes``, else the files' size with a margin, on ``device`` (the runtime's)."""
    own = getattr(runtime, "estimate", None)
    if own is not None:
        found = own(record, str(path), slots=slots)
        if found:
            return found
    if record.required_memory_bytes > 0:
        return {device: record.required_memory_bytes}
    try:
        size = artifact_size(path)
    except OSError:
        size = record.size_bytes
    return {device: math.ceil(size * FILE_MARGIN)}


@contextmanager
def measured(gpus: bool) -> Iterator[dict[str, int]]:
    """The growth of the process's RSS and of each GPU's used memory across the block, per device
    (for engines that do not say what they allocated). Other work running meanwhile counts too."""
    process = psutil.Process()
    rss = process.memory_info().rss
    before = {gpu_device(g.index): g.memory_used_bytes for g in system.gpus()} if gpus else {}
    grown: dict[str, int] = {}
    try:
        yield grown
    finally:
        grown[RAM] = max(0, process.memory_info().rss - rss)
        if gpus:
            for g in system.gpus():
                device = gpu_device(g.index)
                if device in before:
                    grown[device] = max(0, g.memory_used_bytes - before[device])


def total(maps: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in maps:
        for device, size in entry.items():
            out[device] = out.get(device, 0) + size
    return out
