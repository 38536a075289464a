"""The exllamav2 runtime's CPU side (CI has no GPU): EXL2 detection and registration, the probe's
reasons, runtime selection, the catalog entry, the heartbeat's gpu field, the chat template and
the refusals. The GPU side is tests/test_exllamav2_gpu.py, skipped without CUDA."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import numpy as np
import pytest
from safetensors.numpy import save_file
from tiny_models import model_record

from events import codec
from events.messages import ModelRecord, NodeHeartbeat, RegisterModel, RuntimeStatus
from events.openai import ChatCompletionBody
from formats import exl2
from formats.artifacts import EXL2, UnrecognisedModel, detect
from nodes.runtimes import EngineError, default_runtimes
from nodes.runtimes import cuda as cuda_facts
from nodes.runtimes import exllamav2 as runtime_module
from nodes.runtimes.exl2_constraints import refusal
from nodes.runtimes.exllamav2 import ExLlamaV2Runtime, probe_exllamav2
from nodes.runtimes.hf_chat_template import ChatTemplate, TemplateError
from registry.catalog import load_catalog
from registry.hf import RepoFile, RepoListing
from registry.sources import from_catalog, from_hugging_face, from_path, model_roots

EXL2_QUANT = {"quant_method": "exl2", "version": "0.3.2", "bits": 4.0, "head_bits": 6}
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_folder(folder: Path, *, quant: dict | None = EXL2_QUANT, tensors: dict | None = None, tokenizer=True) -> Path:
    """An EXL2-shaped folder: config.json, a small safetensors file, the tokenizer's files."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32}
    if quant is not None:
        config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    weights = tensors or {"model.layers.0.self_attn.q_proj.weight": np.zeros((4, 4), dtype=np.float16)}
    save_file(weights, str(folder / "output.safetensors"))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": {"content": "</s>"}})
        )
    return folder


# ---------------------------------------------------------------- detection


def test_exl2_folder_is_detected_from_its_quantization_config(tmp_path: Path) -> None:
    assert detect(write_folder(tmp_path / "m")) == EXL2
    assert EXL2.runtime == "exllamav2" and EXL2.format == "exl2"


def test_exl2_folder_without_the_signature_is_detected_from_its_tensors(tmp_path: Path) -> None:
    tensors = {
        "model.layers.0.self_attn.q_proj.q_weight": np.zeros((4, 4), dtype=np.int32),
        "model.layers.0.self_attn.q_proj.q_invperm": np.zeros((4,), dtype=np.int16),
    }
    folder = write_folder(tmp_path / "old", quant=None, tensors=tensors)
    assert sorted(exl2.tensor_names(folder / "output.safetensors")) == sorted(tensors)
    assert detect(folder) == EXL2


def test_plain_or_other_quantised_safetensors_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnrecognisedModel, match="not EXL2"):
        detect(write_folder(tmp_path / "plain", quant=None))
    with pytest.raises(UnrecognisedModel, match="not EXL2"):
        detect(write_folder(tmp_path / "gptq", quant={"quant_method": "gptq", "bits": 4}))


def test_exl2_folder_needs_its_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(UnrecognisedModel, match="tokenizer"):
        detect(write_folder(tmp_path / "m", tokenizer=False))


def test_bits_label_names_variants_as_exl2_repos_do() -> None:
    assert [exl2.bits_label({"quantization_config": {**EXL2_QUANT, "bits": b}}) for b in (4.0, 6.5, 4.25, 8)] == [
        "4.0bpw",
        "6.5bpw",
        "4.25bpw",
        "8.0bpw",
    ]
    assert exl2.bits_label({"quantization_config": {"quant_method": "gptq", "bits": 4}}) is None


# ---------------------------------------------------------------- registration


def test_exl2_folder_registers_by_path(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "Llama-exl2")
    record = from_path(RegisterModel(path=str(folder)), model_roots([tmp_path]))
    assert (record.name, record.format, record.runtime) == ("Llama-exl2", "exl2", "exllamav2")
    assert record.capabilities == ["chat", "completion"] and record.quantization == "4.0bpw"
    assert record.size_bytes == sum(p.stat().st_size for p in folder.iterdir())


class StubHub:
    """What registration asks of registry.hf.HuggingFace: a listing, and a small JSON file."""

    def __init__(self, files: dict[str, int], config: dict | None) -> None:
        self.files, self.config, self.asked = files, config, []

    async def repo(self, repo: str, revision: str | None = None) -> RepoListing:
        self.asked.append(revision)
        files = {n: RepoFile(n, size, None) for n, size in self.files.items()}
        return RepoListing(repo, "c0ffee", files, "text-generation", [], None)

    async def json_file(self, repo: str, revision: str | None, filename: str):
        assert filename == "config.json" and revision == "c0ffee"
        return self.config


EXL2_REPO_FILES = {
    "config.json": 700,
    "output.safetensors": 5_000_000,
    "tokenizer.json": 9000,
    "tokenizer_config.json": 500,
    "measurement.json": 40_000,
    "README.md": 100,
    ".gitattributes": 10,
}


def test_exl2_repo_registers_from_hugging_face_as_a_multi_file_model() -> None:
    hub = StubHub(EXL2_REPO_FILES, {"quantization_config": EXL2_QUANT})
    record = asyncio.run(from_hugging_face(RegisterModel(repo="turboderp/Tiny-exl2:4.0bpw"), hub))
    assert hub.asked == ["4.0bpw"]  # :4.0bpw names the branch
    assert (record.name, record.format, record.runtime, record.state) == (
        "turboderp/Tiny-exl2:4.0bpw",
        "exl2",
        "exllamav2",
        "registered",
    )
    paths = sorted(f.path for f in record.source.files)
    assert paths == ["config.json", "measurement.json", "output.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert record.size_bytes == sum(EXL2_REPO_FILES[p] for p in paths)


def test_safetensors_repo_that_is_not_exl2_stays_pending_conversion() -> None:
    hub = StubHub(EXL2_REPO_FILES, {"architectures": ["LlamaForCausalLM"]})
    record = asyncio.run(from_hugging_face(RegisterModel(repo="org/Plain"), hub))
    assert (record.format, record.state) == ("safetensors", "pending_conversion")


def test_catalog_has_an_exl2_chat_model_for_a_24_gb_gpu() -> None:
    entries = [e for e in load_catalog() if e.format == "exl2"]
    assert entries, "the catalog lists no EXL2 model"
    entry = entries[0]
    assert entry.engine == "exllamav2" and "chat" in entry.capabilities and entry.revision
    assert entry.required_memory_bytes < 24 * 10**9 and set(entry.platforms) <= {"linux-cuda", "windows-cuda"}
    hub = StubHub(EXL2_REPO_FILES, None)
    record = asyncio.run(from_catalog(RegisterModel(catalog_id=entry.id), {entry.id: entry}, hub))
    assert hub.asked == [entry.revision]  # the variant's branch is what nodes download
    assert (record.format, record.runtime, record.source.revision) == ("exl2", "exllamav2", "c0ffee")
    assert "output.safetensors" in {f.path for f in record.source.files}


# ---------------------------------------------------------------- the probe


def test_probe_on_this_machine_says_why_exllamav2_is_unavailable() -> None:
    status = ExLlamaV2Runtime().probe()
    assert not status.available and not status.gpu and status.capabilities == ["chat", "completion"]
    assert "docs/gpu.md" in status.error
    installed = runtime_module._find("exllamav2") is not None
    if not installed:
        assert "exllamav2 is not installed" in status.error


@pytest.fixture
def present(monkeypatch: pytest.MonkeyPatch):
    """Pretend pieces are present; each test takes one away."""
    state = {"modules": {"exllamav2", "exllamav2_ext"}, "torch": (True, "12.8"), "devices": 1, "nvcc": "/x/nvcc"}
    monkeypatch.setattr(runtime_module, "_find", lambda m: object() if m in state["modules"] else None)
    monkeypatch.setattr(cuda_facts, "torch_cuda_version", lambda: state["torch"])
    monkeypatch.setattr(cuda_facts, "cuda_device_count", lambda: state["devices"])
    monkeypatch.setattr(cuda_facts, "nvcc", lambda: state["nvcc"])
    monkeypatch.setattr(cuda_facts, "ninja", lambda: "/x/ninja")
    return state


def test_probe_reasons_in_order(present) -> None:
    ok = probe_exllamav2()
    assert ok.available and ok.gpu and "CUDA 12.8" in ok.version
    present["modules"].discard("exllamav2_ext")  # no prebuilt extension: the JIT build needs nvcc and ninja
    assert probe_exllamav2().available
    present["nvcc"] = None
    assert "nvcc (the CUDA toolkit) not found" in probe_exllamav2().error
    present["devices"] = 0
    assert "no CUDA device is visible" in probe_exllamav2().error
    present["torch"] = (True, None)
    assert "build without CUDA" in probe_exllamav2().error
    present["torch"] = (False, None)
    assert "torch is not installed" in probe_exllamav2().error
    present["modules"].clear()
    assert "exllamav2 is not installed" in probe_exllamav2().error


def test_probe_reports_a_failed_import(present) -> None:
    status = probe_exllamav2("RuntimeError: Error building extension 'exllamav2_ext'")
    assert not status.available and "failed to import: RuntimeError: Error building extension" in status.error


def test_cuda_facts_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    has_torch, version = cuda_facts.torch_cuda_version()
    if has_torch:
        import torch

        assert version == torch.version.cuda
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda_facts.cuda_device_count() == 0


# ---------------------------------------------------------------- runtime selection


def exl2_record() -> ModelRecord:
    return model_record("m", "/x", format="exl2", runtime="exllamav2", capabilities=("chat", "completion"))


def test_only_exllamav2_claims_exl2_and_not_without_cuda() -> None:
    record = exl2_record()
    runtimes = default_runtimes()
    assert [r.name for r in runtimes if r.accepts(record)] == ["exllamav2"]
    runtime = next(r for r in runtimes if r.accepts(record))
    can, why = runtime.can_load(record)
    assert not can and why == runtime.probe().error
    gguf = ModelRecord(name="g", format="gguf", runtime="llama_cpp", capabilities=["chat"], source=record.source)
    assert not runtime.accepts(gguf) and runtime.can_load(gguf)[0] is False


# ---------------------------------------------------------------- heartbeats


def test_runtime_status_says_whether_it_runs_on_a_gpu() -> None:
    status = RuntimeStatus(name="exllamav2", available=True, capabilities=["chat"], gpu=True)
    beat = NodeHeartbeat(node_id="n", hostname="h", started_at=1.0, sent_at=2.0, interval_s=2.0, runtimes=[status])
    assert codec.decode(codec.encode(beat), NodeHeartbeat).runtimes[0].gpu is True
    old = b'{"name": "llama_cpp", "available": true}'  # a node older than the field
    assert codec.decode(old, RuntimeStatus).gpu is False
    assert all(s.gpu is False for s in (r.probe() for r in default_runtimes()) if not cuda_facts.cuda_device_count())


def test_the_probe_puts_its_memory_on_the_first_gpu(present) -> None:
    ok = probe_exllamav2()
    assert (ok.gpu, ok.backend, ok.device) == (True, "cuda", "gpu0")  # the node's accounting counts it there


def test_the_estimate_is_the_weights_the_paged_cache_and_working_room(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.update(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    config["max_position_embeddings"] = 32768
    (folder / "config.json").write_text(json.dumps(config))
    weights = sum(f.stat().st_size for f in folder.iterdir())
    record = model_record("m", folder, format="exl2", runtime="exllamav2")
    runtime = ExLlamaV2Runtime()
    # 2 slots x 8192 tokens, fp16: K and V of 32 layers x 8 heads x 128 dims x 2 bytes = 128 KiB a token.
    cache = 2 * 8192 * 128 * 1024
    assert runtime.estimate(record, str(folder), slots=2) == {"gpu0": weights + cache + runtime_module.WORKING_BYTES}
    q4 = msgspec.structs.replace(record, labels={"kv_cache": "q4", "context": "100"})  # 100 tokens: one 256-token page
    assert runtime.estimate(q4, str(folder), slots=1)["gpu0"] < weights + cache // 64 + runtime_module.WORKING_BYTES
    (folder / "config.json").write_text("{}")  # no shape: the node falls back to the registration or the files
    assert runtime.estimate(record, str(folder)) == {}


# ---------------------------------------------------------------- the chat template and refusals


def test_chat_template_renders_as_transformers_would(tmp_path: Path) -> None:
    template = ChatTemplate.from_folder(write_folder(tmp_path / "m"))
    assert (template.bos_token, template.eos_token, template.stops) == ("<s>", "</s>", [])
    text = template.render([{"role": "user", "content": "hi"}], tools=[{"type": "function"}])
    assert text == '<s><|im_start|>user\nhi<|im_end|>\nTOOLS [{"type": "function"}]\n<|im_start|>assistant\n'
    refusing = ChatTemplate("{{ raise_exception('no system messages') }}")
    with pytest.raises(TemplateError, match="no system messages"):
        refusing.render([{"role": "system", "content": "x"}])
    with pytest.raises(EngineError, match="refused these messages") as caught:
        refusing.prompt([{"role": "system", "content": "x"}])
    assert caught.value.status == 400 and caught.value.param == "messages"


def test_folder_without_a_template_gets_chatml_and_its_stop(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "m")
    (folder / "tokenizer_config.json").write_text("{}")
    template = ChatTemplate.from_folder(folder)
    assert template.render([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")
    assert template.stops == ["<|im_end|>"]


def chat(**fields) -> ChatCompletionBody:
    return codec.decode(
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}), ChatCompletionBody
    )


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_what_exllamav2_cannot_constrain_is_a_clear_400(fields: dict, param: str) -> None:
    error = refusal(chat(**fields))
    assert error is not None and error.status == 400 and error.param == param
    assert error.code == "unsupported_parameter"


def test_plain_auto_tools_and_json_answers_are_accepted() -> None:
    assert refusal(chat()) is None
    assert refusal(chat(tools=TOOLS)) is None
    json_answer = refusal(chat(response_format={"type": "json_object"}))
    assert json_answer is None or "lm-format-enforcer" in str(json_answer)  # CI has no lm-format-enforcer
