"""Memory accounting: budgets, room planning (least recently used idle models first, never a
busy one), and llama.cpp's estimate against what it really allocates."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import requires_llama
from tiny_models import model_record

from formats.gguf import layout
from nodes.memory import RAM, Memory, NotEnoughMemory, Resident, parse_budget
from nodes.residency import Residency
from nodes.runtimes import llama_backend, llama_memory
from nodes.serving import ServedModel

MiB = 1024**2


def test_budgets_are_bytes_or_shares() -> None:
    assert parse_budget("80%", 1000, default="90%") == 800
    assert parse_budget(None, 1000, default="90%") == 900
    assert parse_budget("512MiB", 0, default="1%") == 512 * MiB
    assert parse_budget("2GB", 0, default="1%") == 2_000_000_000
    assert parse_budget("1.5GiB", 0, default="1%") == int(1.5 * 1024**3)
    assert parse_budget("123456", 0, default="1%") == 123456
    for bad in ("0%", "101%", "lots", "12XB", "-5", "0"):
        with pytest.raises(ValueError):
            parse_budget(bad, 1000, default="90%")


def memory(budget_mib: int) -> Memory:
    return Memory(ram_budget=f"{budget_mib}MiB")


def resident(name: str, mib: int, last_used: float, *, idle: bool = True) -> Resident:
    return Resident(name=name, memory={RAM: mib * MiB}, idle=idle, last_used=last_used)


def test_room_comes_from_the_least_recently_used_idle_models() -> None:
    room = memory(100).plan(
        "new", {RAM: 40 * MiB}, [resident("a", 40, 3.0), resident("b", 40, 1.0), resident("c", 10, 0.5)], {}, evict=True
    )
    assert room.victims == ["c", "b"]  # oldest first until 40 MiB are free: c (10 MiB) is not enough, then b
    assert memory(100).plan("new", {RAM: 10 * MiB}, [resident("a", 40, 1.0)], {}, evict=True).victims == []


def test_a_busy_model_is_never_a_victim() -> None:
    residents = [resident("busy", 60, 0.0, idle=False), resident("idle", 30, 5.0)]
    room = memory(100).plan("new", {RAM: 30 * MiB}, residents, {}, evict=True)
    assert room.victims == ["idle"]  # the busy one is older, and spared
    room = memory(100).plan("new", {RAM: 50 * MiB}, residents, {}, evict=True)
    assert room.wait and "busy" in room.why  # only the busy one could make room: wait for it


def test_what_can_never_fit_or_must_not_evict_says_the_numbers() -> None:
    with pytest.raises(NotEnoughMemory) as never:
        memory(100).plan("huge", {RAM: 200 * MiB}, [], {}, evict=True)
    assert never.value.permanent and "200.0 MiB" in str(never.value) and "100.0 MiB" in str(never.value)
    with pytest.raises(NotEnoughMemory) as no_evict:
        memory(100).plan("m", {RAM: 50 * MiB}, [resident("a", 60, 1.0)], {}, evict=False)
    assert not no_evict.value.permanent and "a 60.0 MiB" in str(no_evict.value)
    with pytest.raises(NotEnoughMemory):
        memory(100).plan("gpu-model", {"gpu0": MiB}, [], {}, evict=True)  # no GPU here


def test_loads_in_progress_count_as_used() -> None:
    room = memory(100).plan("m", {RAM: 50 * MiB}, [], {RAM: 60 * MiB}, evict=True)
    assert room.wait  # another model is being loaded into that room


def test_gpu_layers_follow_the_build_and_the_machine() -> None:
    assert llama_backend.gpu_layers(None, supports_offload=True, on_gpu=True) == llama_backend.ALL_LAYERS
    assert llama_backend.gpu_layers(20, supports_offload=True, on_gpu=True) == 20
    assert llama_backend.gpu_layers(None, supports_offload=False, on_gpu=True) == 0  # a CPU-only build
    assert llama_backend.gpu_layers(None, supports_offload=True, on_gpu=False) == 0  # no GPU here
    assert llama_backend.runs_on("cuda", 1) == ("cuda", "gpu0")
    assert llama_backend.runs_on("cuda", 0) == ("cpu", "ram")  # a CUDA wheel on a machine without a GPU
    assert llama_backend.runs_on("cpu", 2) == ("cpu", "ram")


def test_llama_cpp_buffer_lines_are_counted_per_device() -> None:
    lines = [
        "load_tensors:   CPU_Mapped model buffer size =   281.81 MiB",
        "load_tensors:        CUDA0 model buffer size =  4403.49 MiB",
        "llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB",
        "sched_reserve:      CUDA0 compute buffer size =   296.00 MiB",
        "sched_reserve:  CUDA_Host compute buffer size =    16.01 MiB",
        "load_tensors:   CPU_Mapped model buffer size =   281.81 MiB",  # a second slot maps the same file
    ]
    found = llama_memory.parse_buffers(lines)
    assert abs(found["gpu0"] - (4403.49 + 512 + 296) * MiB) < 4
    assert abs(found["ram"] - (281.81 + 16.01) * MiB) < 4


def test_offloaded_layers_move_to_the_gpu(tmp_path) -> None:
    from nodes.demo_model import write_tiny_gguf

    shape = layout(write_tiny_gguf(tmp_path / "m.gguf", n_layers=4, context_length=4096))
    cpu = llama_memory.estimate(shape, llama_memory.Plan(n_ctx=4096))
    gpu = llama_memory.estimate(shape, llama_memory.Plan(n_ctx=4096, gpu_layers=llama_backend.ALL_LAYERS))
    half = llama_memory.estimate(shape, llama_memory.Plan(n_ctx=4096, gpu_layers=2))
    assert set(cpu) == {RAM} and gpu[RAM] < cpu[RAM] and gpu["gpu0"] > 0
    assert gpu[RAM] < half[RAM] < cpu[RAM]
    assert abs(sum(gpu.values()) - sum(cpu.values())) < 0.01 * sum(cpu.values())  # moved, not made up


@requires_llama
@pytest.mark.parametrize(("n_ctx", "slots"), [(32768, 1), (16384, 2), (512, 1)])
def test_the_estimate_of_a_large_context_is_within_a_quarter_of_what_llama_cpp_allocates(tmp_path, n_ctx, slots):
    """0.4 MB of weights, hundreds of MB of KV cache and attention buffers at a large context."""
    from nodes.demo_model import write_tiny_gguf
    from nodes.runtimes import LlamaCppRuntime

    path = write_tiny_gguf(tmp_path / "long.gguf", context_length=n_ctx)
    record = model_record("long", path, labels={"n_ctx": str(n_ctx)})
    runtime = LlamaCppRuntime(n_threads=1)
    runtime.probe()
    estimate = runtime.estimate(record, str(path), slots=slots)
    engine = runtime.load(record, str(path), slots=slots)
    try:
        measured = engine.memory_bytes
    finally:
        engine.close()
    assert set(estimate) == set(measured) == {RAM}
    assert abs(estimate[RAM] - measured[RAM]) <= 0.25 * measured[RAM], (estimate, measured)
    if n_ctx >= 16384:
        assert measured[RAM] > 100 * path.stat().st_size  # the context, not the weights, is what costs


def _gpu_build() -> bool:
    """A llama-cpp-python built with GPU offload, on a machine with an NVIDIA GPU."""
    from nodes import system

    if not system.gpus():
        return False
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


@requires_llama
def test_the_runtime_reports_the_backend_it_really_uses() -> None:
    from nodes.runtimes import LlamaCppRuntime

    status = LlamaCppRuntime(n_threads=1).probe()
    if _gpu_build():
        assert (status.backend, status.device) == (llama_backend.build_backend(), "gpu0")
    else:
        assert (status.backend, status.device) == ("cpu", "ram")  # no GPU here, or a CPU-only build


@requires_llama
@pytest.mark.skipif(not _gpu_build(), reason="needs an NVIDIA GPU and a llama-cpp-python built with CUDA")
def test_a_gpu_build_offloads_every_layer_and_its_memory_goes_to_the_gpu(tmp_path) -> None:
    from nodes.demo_model import write_tiny_gguf
    from nodes.runtimes import LlamaCppRuntime

    path = write_tiny_gguf(tmp_path / "gpu.gguf", n_embd=256, n_layers=4, context_length=8192)
    record = model_record("gpu", path, labels={"n_ctx": "8192"})
    runtime = LlamaCppRuntime(n_threads=1)
    runtime.probe()
    estimate = runtime.estimate(record, str(path))
    engine = runtime.load(record, str(path))
    try:
        measured = engine.memory_bytes
        assert measured.get("gpu0", 0) > measured.get(RAM, 0)  # weights, KV cache and compute buffers there
        assert abs(estimate["gpu0"] - measured["gpu0"]) <= 0.25 * measured["gpu0"], (estimate, measured)
    finally:
        engine.close()
    limited = LlamaCppRuntime(n_threads=1, gpu_layers=0)
    limited.probe()
    engine = limited.load(record, str(path))
    try:
        assert "gpu0" not in engine.memory_bytes or engine.memory_bytes["gpu0"] < measured["gpu0"] / 2
    finally:
        engine.close()


class _UpstreamEngine:
    """What nodes/upstream.py's engine shows the node: no file, no memory here."""

    capabilities = ["chat"]
    artifact_bytes = 0
    slots = 1

    def close(self) -> None:
        return None


async def test_an_upstream_model_is_never_unloaded_for_room_or_idleness() -> None:
    async def attach(_served) -> None:
        return None

    async def detach(_name) -> None:
        return None

    residency = Residency(
        memory(50), asyncio.Lock(), parallel=1, attach=attach, detach=detach, changed=lambda: None, keep_alive_s=0.0
    )
    record = model_record("box/llama", "http://box:8080", format="upstream", runtime="upstream", kind="upstream")
    served = ServedModel(record, "upstream", _UpstreamEngine(), "http://box:8080")
    served.last_used = time.monotonic() - 3600  # idle for an hour
    residency.served[record.name] = served
    assert residency.residents() == []  # never a victim to make room
    await residency.expire_idle()  # --keep-alive 0: every idle model it could unload goes
    assert "box/llama" in residency.served
    assert served.report().origin == "upstream"
    await residency.close()
