"""exllamav2 on EXL2 folders, on CUDA GPUs: chats and completions with continuous batching.

One ``ExLlamaV2DynamicGenerator`` per model serves every slot: requests become
``ExLlamaV2DynamicJob``s in one paged cache (``slots`` sequences of ``context`` tokens, pages
shared between prompts with the same prefix), and the generator batches whatever jobs are
active at each step, so concurrent requests share every forward pass instead of taking turns.
The generator is not thread-safe: one scheduler thread owns it (enqueue, cancel, iterate) and
the node's worker threads hand it jobs and read their results from queues.

Per request: the prompt comes from the folder's chat template (nodes/runtimes/hf_chat_template.py);
sampling from OpenAI's fields (``ExLlamaV2Sampler.Settings``); stop strings and the model's end
tokens are the job's stop conditions (exllamav2 holds back text that may begin a stop string);
``n`` choices are ``n`` jobs batched together; a cancelled request cancels its jobs at once.
``response_format`` is enforced with lm-format-enforcer (nodes/runtimes/exl2_constraints.py);
tools with ``tool_choice`` "auto" go to the template and calls are read back from the text;
forced tool calls and logprobs are refused with a 400.

The probe is cheap and says why the runtime is unavailable (docs/gpu.md): exllamav2 missing,
torch without CUDA, no CUDA device, or no prebuilt extension and no nvcc / ninja to build it
(exllamav2 compiles its CUDA extension at first import unless a matching wheel is installed).

UNVERIFIED ON A GPU: written against exllamav2 0.3.2's API read from its source; no CUDA
machine has run this module yet (tests/test_exllamav2_gpu.py is the check, skipped without CUDA).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from events import subjects
from events.messages import Choice, ModelRecord, RuntimeStatus, Usage
from events.openai import ChatCompletionBody, CompletionBody, EmbeddingBody
from formats.artifacts import artifact_size

from . import cuda, exl2_constraints
from .base import EngineError, OnDelta, TextOutcome
from .chat_inputs import answer_schema, template_inputs
from .choices import ChoiceWriter
from .common import setting
from .hf_chat_template import ChatTemplate
from .tool_calls import template_format

log = structlog.get_logger("node")

NAME = "exllamav2"
FORMAT = "exl2"
CAPABILITIES = [subjects.CHAT, subjects.COMPLETION]
CONTEXT_ENV, CONTEXT_LABEL = "LLM_ROUTER_EXL2_CONTEXT", "context"  # tokens per sequence
CACHE_ENV, CACHE_LABEL = "LLM_ROUTER_EXL2_CACHE", "kv_cache"  # fp16, q8, q6 or q4
DEFAULT_CONTEXT = 8192
PAGE_SIZE = 256  # the dynamic generator's cache page: the cache is a whole number of them
POLL_S = 0.05  # how often a waiting request looks at its cancellation
CACHE_CLASSES = {
    "fp16": "ExLlamaV2Cache",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}
DOCS = "see docs/gpu.md"


# ---------------------------------------------------------------- availability


def probe_exllamav2(import_error: str | None = None) -> RuntimeStatus:
    """Whether exllamav2 can run here, and if not the first thing missing; never imports it."""

    def unavailable(why: str) -> RuntimeStatus:
        return RuntimeStatus(name=NAME, available=False, capabilities=list(CAPABILITIES), error=f"{why} ({DOCS})")

    if _find("exllamav2") is None:
        return unavailable("exllamav2 is not installed (module exllamav2 not found)")
    has_torch, torch_cuda = cuda.torch_cuda_version()
    if not has_torch:
        return unavailable("torch is not installed (exllamav2 needs a CUDA build of torch)")
    torch_version = _version("torch")
    if torch_cuda is None:
        return unavailable(f"torch {torch_version} is a build without CUDA; exllamav2 needs a CUDA build of torch")
    if cuda.cuda_device_count() == 0:
        return unavailable("no CUDA device is visible (no NVIDIA driver or GPU, or CUDA_VISIBLE_DEVICES hides them)")
    if _find("exllamav2_ext") is None:  # no prebuilt extension: exllamav2 compiles it at first import
        missing = [
            what for what, found in (("nvcc (the CUDA toolkit)", cuda.nvcc()), ("ninja", cuda.ninja())) if not found
        ]
        if missing:
            return unavailable(
                "exllamav2 has no prebuilt extension for this torch and cannot build it: "
                f"{' and '.join(missing)} not found (set CUDA_HOME, or install a wheel matching torch {torch_version})"
            )
    if import_error:
        return unavailable(f"exllamav2 failed to import: {import_error}")
    version = f"exllamav2 {_version('exllamav2')}, torch {torch_version} (CUDA {torch_cuda})"
    return RuntimeStatus(
        name=NAME,
        available=True,
        version=version,
        capabilities=list(CAPABILITIES),
        gpu=True,
        backend="cuda",
        device="gpu0",  # load_autosplit fills the first GPU first; the node's accounting counts it there
    )


def _find(module: str) -> Any:
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


# ---------------------------------------------------------------- the scheduler thread


@dataclass
class _Event:
    index: int  # which choice
    text: str = ""
    tokens: int = 0
    end: str | None = None  # exllamav2's eos_reason once the job is done
    error: BaseException | None = None


class _Scheduler:
    """The one thread that touches the generator: enqueues and cancels jobs between steps,
    runs ``iterate()`` while any job remains, and routes each result to its request's queue."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="exllamav2-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Any) -> None:
        """``job.identifier`` is (the request's queue, the choice index)."""
        self._commands.put(("add", job))
        self._wake.set()

    def cancel(self, job: Any) -> None:
        self._commands.put(("cancel", job))
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._closed:
            self._apply_commands()
            if self.generator.num_remaining_jobs() == 0:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                results = self.generator.iterate()
            except Exception as exc:  # a CUDA or filter failure: every job in flight fails with it
                log.exception("exllamav2 generator step failed")
                self._fail_all(exc)
                continue
            for result in results:
                self._route(result)
        self._fail_all(RuntimeError("the model was unloaded"))

    def _apply_commands(self) -> None:
        while True:
            try:
                verb, job = self._commands.get_nowait()
            except queue.Empty:
                return
            replies, index = job.identifier
            if verb == "add":
                try:
                    self.generator.enqueue(job)
                except (AssertionError, ValueError) as exc:  # exllamav2 asserts a job that cannot fit the cache
                    replies.put(_Event(index, error=EngineError(str(exc), param="messages")))
            else:
                self.generator.cancel(job)

    def _route(self, result: dict) -> None:
        if result.get("stage") != "streaming":
            return
        replies, index = result["identifier"]
        ids = result.get("token_ids")
        event = _Event(index, text=result.get("text", ""), tokens=int(ids.shape[-1]) if ids is not None else 0)
        if result.get("eos"):
            event.end = result.get("eos_reason", "stop_token")
        replies.put(event)

    def _fail_all(self, exc: BaseException) -> None:
        jobs = list(self.generator.active_jobs) + list(self.generator.pending_jobs)
        self.generator.clear_queue()
        for job in jobs:
            replies, index = job.identifier
            replies.put(_Event(index, error=exc))


# ---------------------------------------------------------------- the engine


class Exl2Engine:
    """``slots`` sequences at once in one paged cache of ``slots x context`` tokens."""

    def __init__(self, path: str, *, slots: int, context: int, kv_cache: str = "fp16") -> None:
        import exllamav2
        import torch
        from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
        from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

        if kv_cache not in CACHE_CLASSES:
            raise ValueError(f"{CACHE_ENV} must be one of {', '.join(CACHE_CLASSES)}, not {kv_cache!r}")
        self._torch = torch
        self._job_class = ExLlamaV2DynamicJob
        self._settings_class = ExLlamaV2Sampler.Settings
        config = ExLlamaV2Config(path)
        config.arch_compat_overrides()
        self.context = min(context, config.max_seq_len)
        config.max_seq_len = self.context
        self.model = ExLlamaV2(config)
        total = -(-slots * self.context // PAGE_SIZE) * PAGE_SIZE
        cache = getattr(exllamav2, CACHE_CLASSES[kv_cache])(self.model, max_seq_len=total, lazy=True)
        self.model.load_autosplit(cache, progress=False)  # layers over every visible GPU, cache beside them
        try:
            self.tokenizer = ExLlamaV2Tokenizer(config)
            self.generator = ExLlamaV2DynamicGenerator(
                model=self.model, cache=cache, tokenizer=self.tokenizer, max_batch_size=slots, max_seq_len=self.context
            )
        except BaseException:
            self.model.unload()
            raise
        self.capabilities = list(CAPABILITIES)
        self.artifact_bytes = artifact_size(Path(path))
        self.slots = slots
        self.template = ChatTemplate.from_folder(Path(path))
        self._call_format = template_format(self.template.source)
        self._vocab = self.tokenizer.get_vocab_size()
        generation = getattr(config, "generation_config", None) or {}  # generation_config.json's end tokens
        ends = (self.tokenizer.eos_token_id, *(generation.get("eos_token_id") or []))
        self._stop_ids = sorted({i for i in ends if isinstance(i, int)})
        self._scheduler = _Scheduler(self.generator)

    # ------------------------------------------------------------ requests

    def chat(self, body: ChatCompletionBody, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        refused = exl2_constraints.refusal(body)
        if refused is not None:
            raise refused
        mode, tools = body.tool_mode, body.tools or []
        form, native = self._call_format
        text = self.template.prompt(*template_inputs(body, form, native))
        schema = answer_schema(body)
        names = {tool.function.name for tool in tools}
        shape = "auto" if mode == "auto" else "text"
        parallel = body.parallel_tool_calls is not False and form.parallel

        def writer(index: int) -> ChoiceWriter:
            return ChoiceWriter(index, shape, on_delta=on_delta, form=form, names=names, parallel=parallel)

        def filters() -> list[Any] | None:
            return None if schema is False else exl2_constraints.json_filters(self.model, self.tokenizer, schema)

        prompt = self._encode(text, add_bos=not (self.template.bos_token and text.startswith(self.template.bos_token)))
        return self._run(prompt, body, writer, filters, body.stops + self.template.stops, cancelled, "messages")

    def complete(self, body: CompletionBody, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        if body.logprobs is not None:
            raise EngineError(
                "'logprobs' is not supported by the exllamav2 runtime.", param="logprobs", code="unsupported_parameter"
            )
        text = body.text_prompt
        prompt = self._encode(text, add_bos=True)

        def writer(index: int) -> ChoiceWriter:
            return ChoiceWriter(index, "text", on_delta=on_delta)

        echo = text if body.echo else ""
        return self._run(prompt, body, writer, lambda: None, body.stops, cancelled, "prompt", echo=echo)

    def embed(self, body: EmbeddingBody) -> tuple[list[list[float]], Usage]:
        raise EngineError("this model (exllamav2) does not offer embeddings", param="model", code="model_not_found")

    def _encode(self, text: str, *, add_bos: bool) -> Any:
        ids = self.tokenizer.encode(text, add_bos=add_bos, encode_special_tokens=True)
        if ids.shape[-1] == 0:
            ids = self._torch.tensor([[self.tokenizer.bos_token_id]], dtype=self._torch.long)
        return ids

    def _run(
        self,
        prompt: Any,
        body: Any,
        writer: Any,
        filters: Any,
        stops: list[str],
        cancelled: threading.Event,
        param: str,
        *,
        echo: str = "",
    ) -> TextOutcome:
        """``body.n`` jobs over ``prompt`` (a (1, n) tensor), batched by the generator; streamed
        through each choice's writer as results arrive. ``echo``: the prompt text, sent first."""
        length = int(prompt.shape[-1])
        room = self.context - length
        if room <= 0:
            raise EngineError(
                f"The prompt ({length} tokens) does not fit the model's context of {self.context} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        budget = min(body.token_limit, room) if body.token_limit else room
        replies: queue.SimpleQueue = queue.SimpleQueue()
        jobs = []
        for index in range(body.n):
            jobs.append(
                self._job_class(
                    input_ids=prompt,
                    max_new_tokens=budget,
                    gen_settings=self._settings(body),
                    seed=None if body.seed is None else body.seed + index,
                    stop_conditions=[*self._stop_ids, *stops],
                    filters=filters(),
                    filter_prefer_eos=True,
                    identifier=(replies, index),
                )
            )
        writers = [writer(index) for index in range(body.n)]
        if echo:
            for out in writers:
                if out.on_delta is not None:
                    out.on_text(echo, None)
        texts = [""] * body.n
        tokens = [0] * body.n
        ends: list[str | None] = [None] * body.n
        for job in jobs:
            self._scheduler.submit(job)
        try:
            while any(end is None for end in ends):
                if cancelled.is_set():
                    break
                try:
                    event = replies.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if event.error is not None:
                    raise event.error
                i = event.index
                texts[i] += event.text
                tokens[i] += event.tokens
                if event.text and writers[i].on_delta is not None:
                    writers[i].on_text(event.text, None)
                if event.end is not None:
                    ends[i] = event.end
        finally:
            for job, end in zip(jobs, ends):
                if end is None:  # cancelled, or failed: free its pages now
                    self._scheduler.cancel(job)
        choices: list[Choice] = []
        for i in range(body.n):
            reason = "cancelled" if cancelled.is_set() else _finish_reason(ends[i])
            choices.append(writers[i].finish(echo + texts[i], reason, None))
        completion = sum(tokens)
        usage = Usage(length, completion, length + completion)
        first = choices[0]
        plain = len(choices) == 1 and first.tool_calls is None
        return TextOutcome(first.text, first.finish_reason, usage, None if plain else choices)

    def _settings(self, body: Any) -> Any:
        """OpenAI's sampling fields as exllamav2's (its defaults where a field is not given)."""
        settings = self._settings_class()
        if body.temperature == 0:
            settings = self._settings_class.greedy()
        elif body.temperature is not None:
            settings.temperature = body.temperature
        for ours, theirs in (
            ("top_p", "top_p"),
            ("top_k", "top_k"),
            ("min_p", "min_p"),
            ("presence_penalty", "token_presence_penalty"),
            ("frequency_penalty", "token_frequency_penalty"),
            ("repeat_penalty", "token_repetition_penalty"),
        ):
            value = getattr(body, ours)
            if value is not None:
                setattr(settings, theirs, value)
        if body.logit_bias:
            settings.token_bias = self._bias(body.logit_bias)
        return settings

    def _bias(self, bias: dict[str, float]) -> Any:
        table = {int(k): float(v) for k, v in bias.items()}
        outside = [k for k in table if not 0 <= k < self._vocab]
        if outside:
            raise EngineError(f"logit_bias token ids out of range: {outside[:5]}", param="logit_bias")
        tensor = self._torch.zeros(self.generator.padded_vocab_size, dtype=self._torch.float)
        for token, value in table.items():
            tensor[token] = value
        return tensor

    def close(self) -> None:
        """Only once no call is running (the node closes an engine after taking every slot)."""
        self._scheduler.close()
        self.model.unload()
        self._torch.cuda.empty_cache()


def _finish_reason(eos_reason: str | None) -> str:
    return "length" if eos_reason == "max_new_tokens" or eos_reason is None else "stop"


# ---------------------------------------------------------------- memory estimate

CACHE_BYTES = {"fp16": 2.0, "q8": 1.0625, "q6": 0.8125, "q4": 0.5625}  # per K or V element, with the scales
WORKING_BYTES = 512 * 2**20  # the forward pass's scratch buffers and torch's context, about


def estimate(path: Path, *, slots: int, context: int, kv_cache: str = "fp16", device: str = "gpu0") -> dict[str, int]:
    """Bytes on ``device`` for an EXL2 folder: its weight files as they are (EXL2 tensors load
    at their quantised size), the paged cache (``slots x context`` tokens, a whole number of
    pages, of every layer's K and V) and some working room. From config.json and the files'
    sizes alone, without torch; {} when the folder has no readable config."""
    try:
        config = json.loads((path / "config.json").read_text())
        weights = artifact_size(path)
    except (OSError, ValueError):
        return {}
    text = config.get("text_config") or config  # multimodal configs nest the language model's
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return {}
    trained = text.get("max_position_embeddings")
    if isinstance(trained, int) and trained > 0:
        context = min(context, trained)
    tokens = -(-slots * context // PAGE_SIZE) * PAGE_SIZE
    cache = math.ceil(2 * layers * kv_heads * head_dim * tokens * CACHE_BYTES.get(kv_cache, 2.0))
    return {device: weights + cache + WORKING_BYTES}


class ExLlamaV2Runtime:
    """Claims EXL2 folders only; the node loads one only where :meth:`probe` says available
    (nodes/agent.py refuses a model whose runtime is unavailable), so a CPU node never does."""

    name = NAME
    capabilities = list(CAPABILITIES)

    def __init__(self) -> None:
        self._import_error: str | None = None

    def probe(self) -> RuntimeStatus:
        return probe_exllamav2(self._import_error)

    def accepts(self, record: ModelRecord) -> bool:
        return record.format == FORMAT

    def can_load(self, record: ModelRecord) -> tuple[bool, str]:
        """Whether this node can load ``record`` with this runtime, and why not."""
        if not self.accepts(record):
            return False, f"{record.name} is {record.format}, not {FORMAT}"
        status = self.probe()
        return status.available, status.error or ""

    def estimate(self, record: ModelRecord, path: str, *, slots: int = 1) -> dict[str, int]:
        """GPU bytes a load will take (nodes/memory.py asks before loading): :func:`estimate`;
        {} (the node falls back to the registration's need or the files' size) for an unreadable folder."""
        context = int(setting(record.labels, CONTEXT_LABEL, CONTEXT_ENV) or DEFAULT_CONTEXT)
        kv_cache = setting(record.labels, CACHE_LABEL, CACHE_ENV) or "fp16"
        return estimate(Path(path), slots=max(1, slots), context=context, kv_cache=kv_cache)

    def load(self, record: ModelRecord, path: str, *, slots: int = 1) -> Exl2Engine:
        context = int(setting(record.labels, CONTEXT_LABEL, CONTEXT_ENV) or DEFAULT_CONTEXT)
        kv_cache = setting(record.labels, CACHE_LABEL, CACHE_ENV) or "fp16"
        try:
            import exllamav2  # noqa: F401  (the JIT build of its extension happens here, minutes the first time)
        except Exception as exc:  # a failed extension build raises anything from OSError to RuntimeError
            self._import_error = f"{type(exc).__name__}: {exc}"
            raise RuntimeError(f"exllamav2 failed to import: {self._import_error}") from exc
        return Exl2Engine(path, slots=max(1, slots), context=context, kv_cache=kv_cache)
