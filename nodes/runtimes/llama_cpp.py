"""llama.cpp (llama-cpp-python) on GGUF files: chat, completion, embeddings, streaming.

A llama.cpp context is not thread-safe (two generations in one crash the process), so an
engine with ``slots=N`` holds N ``Llama`` instances over the same GGUF, one per slot, and
each call takes a free one for its duration. Embeddings run in instances of their own, in
embedding mode with mean pooling (llama architectures have no default pooling, so without
it llama.cpp returns one vector per token), created on demand up to N. The weights are
mmap-ed, so all instances share their pages on the CPU; what each slot adds is its own KV
cache of ``n_ctx`` tokens and compute buffers. A build with GPU offload (CUDA, Metal, ...) on a
machine with a GPU offloads every layer, or ``--gpu-layers`` of them; then each instance holds
its own copy of the offloaded weights. What a load will take is estimated, and what it took
read from llama.cpp, in :mod:`.llama_memory`; the backend is chosen in :mod:`.llama_backend`.

A model registered with a multimodal projector (``source.projector``, an mmproj GGUF) also
offers "vision": chats go through llama-cpp-python's LLaVA-1.5 chat handler (libmtmd), which
turns ``image_url`` parts into image embeddings. It only ever sees data: URLs: the node's guarded
:class:`~nodes.remote_media.ImageFetcher` fetches an http(s) URL first (refusing internal
addresses), since the handler would fetch any URL it is given. The handler formats every chat
of the model with the LLaVA-1.5 prompt, not the GGUF's template.
The handler holds the projector's libmtmd context, bound to one ``Llama`` and used for every
image it encodes, so each slot gets a handler of its own: each slot also loads the projector.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from events import subjects
from events.messages import ModelRecord, RuntimeStatus, Usage
from events.openai import ChatCompletionBody, CompletionBody, EmbeddingBody
from formats.gguf import GgufError, context_length, layout

from .. import system
from ..remote_media import ImageFetcher, ImageFetchError
from . import llama_backend, llama_memory
from .base import EngineError, OnDelta, TextOutcome
from .common import probe_packages, setting

NAME = "llama_cpp"
CAPABILITIES = [subjects.CHAT, subjects.COMPLETION, subjects.EMBEDDING]


def _threads() -> int:
    return int(os.environ.get("LLM_ROUTER_LLAMA_THREADS", "0")) or max(1, (os.cpu_count() or 2) // 2)


class _TokenCounter:
    """A logits processor run before every sampled token: counts tokens, enforces the token
    limit, the context window and cancel.

    It sees the prompt length on its first call and every sampling step after. To stop it
    leaves only the end-of-generation token possible, so llama.cpp stops at the next token
    even while the stream yields nothing (partial UTF-8 is held back, and random-weight models
    produce plenty of it). llama-cpp-python 0.3 checks ``max_tokens`` only after a complete
    UTF-8 character, so a run of incomplete ones goes past the limit and on to a full context,
    where ``llama_decode`` fails: the limit and the context are enforced here instead. The
    count is its own, not ``len(input_ids)``: llama.cpp pads the context to a multiple of 256
    while llama-cpp-python's token array keeps the size asked for, and stops growing there.
    """

    def __init__(self, cancelled: threading.Event, eos: int, *, limit: int | None, n_ctx: int) -> None:
        self.cancelled = cancelled
        self.eos = eos
        self.limit = limit
        self.n_ctx = n_ctx
        self.prompt_tokens = 0
        self.sampled = 0
        self.truncated = False  # stopped for the token limit or a full context, not by the model

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.sampled == 0:
            self.prompt_tokens = len(input_ids)
        self.sampled += 1
        position = self.prompt_tokens + self.sampled - 1  # where the token sampled now is evaluated
        if (self.limit is not None and self.sampled > self.limit) or position >= self.n_ctx:
            self.truncated = True
        if self.truncated or self.cancelled.is_set():
            scores[:] = -float("inf")
            scores[self.eos] = 0.0
        return scores

    def usage(self, finish_reason: str, limit: int | None) -> Usage:
        # An end token, natural or forced, produces no text and is not billed;
        # llama-cpp-python samples one token past max_tokens before it notices the limit.
        completion = max(0, self.sampled - (1 if finish_reason == "stop" or self.truncated else 0))
        if limit:
            completion = min(completion, limit)
        return Usage(self.prompt_tokens, completion, self.prompt_tokens + completion)


class _Instances:
    """``Llama`` instances handed out one call at a time: never two threads in one context.

    ``make`` builds one; up to ``size`` are built, ``eager`` ones at once (so a load fails at
    load, and a slot's memory is taken then), the rest when every built one is busy.
    """

    def __init__(self, make: Callable[[], Any], size: int, *, eager: int = 0) -> None:
        self._make = make
        self._size = size
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._built: list[Any] = []
        self._lock = threading.Lock()
        try:
            for _ in range(eager):
                self._free.put(self._build())
        except BaseException:
            self.close()
            raise

    def _build(self) -> Any:
        instance = self._make()
        self._built.append(instance)
        return instance

    @contextmanager
    def use(self) -> Iterator[Any]:
        try:
            instance = self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                instance = self._build() if len(self._built) < self._size else None
            if instance is None:
                instance = self._free.get()  # every one is busy: wait for the first returned
        try:
            yield instance
        finally:
            self._free.put(instance)

    def first(self) -> Any:
        """Any built instance, for what does not touch its context (vocabulary, tokens)."""
        return self._built[0]

    def close(self) -> None:
        """Only once no call is running (the node closes an engine after taking every slot)."""
        with self._lock:
            built, self._built = self._built, []
        for instance in built:
            instance.close()


class LlamaEngine:
    """``slots`` calls run at once, each in its own context; each slot costs one KV cache of
    ``n_ctx`` tokens (plus compute buffers, and the projector of a vision model) in memory."""

    def __init__(
        self,
        path: str,
        *,
        n_ctx: int,
        n_threads: int,
        projector: str | None = None,
        slots: int = 1,
        images: ImageFetcher | None = None,
        n_gpu_layers: int = 0,
    ) -> None:
        """``images``: fetches a vision chat's http(s) image URLs (default: public addresses only);
        ``n_gpu_layers``: layers offloaded to the GPU (0: CPU only)."""
        import llama_cpp

        if slots < 1:
            raise ValueError(f"slots must be 1 or more, not {slots}")
        self._llama_cpp = llama_cpp
        self.path = path
        self.n_threads = n_threads
        self.slots = slots
        self.capabilities = list(CAPABILITIES)
        self.artifact_bytes = Path(path).stat().st_size
        self.vision = projector is not None
        self.images = images if images is not None else ImageFetcher()
        if projector is not None:
            if not Path(projector).is_file():
                raise RuntimeError(f"the multimodal projector {projector} of {path} is missing")
            self.capabilities.append(subjects.VISION)
        # Never allocate a context longer than the model was trained for.
        self.n_ctx = min(n_ctx, context_length(path) or n_ctx)

        def generator() -> Any:
            handler = _vision_handler(projector) if projector is not None else None
            try:
                return llama_cpp.Llama(
                    model_path=path,
                    n_ctx=self.n_ctx,
                    n_threads=n_threads,
                    n_gpu_layers=n_gpu_layers,
                    verbose=False,
                    chat_handler=handler,
                )
            except ValueError as exc:
                raise RuntimeError(f"llama.cpp could not load {path}: {exc}") from exc

        def embedder() -> Any:
            return llama_cpp.Llama(
                model_path=path,
                n_ctx=self.n_ctx,
                n_threads=n_threads,
                n_gpu_layers=n_gpu_layers,
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                verbose=False,
            )

        with llama_memory.reported() as allocated:
            self._generators = _Instances(generator, slots, eager=slots)
        self.memory_bytes = allocated  # per device, as llama.cpp reported allocating it
        self._embedders = _Instances(embedder, slots)
        first = self._generators.first()
        self._n_vocab = first.n_vocab()
        self._eos = first.token_eos()

    # ------------------------------------------------------------ generation

    def _sampling(self, body: ChatCompletionBody | CompletionBody, counter: _TokenCounter) -> dict[str, Any]:
        processors: list[Any] = []
        if body.logit_bias:
            # Applied here, not through llama-cpp-python's logit_bias argument: combined with a
            # logits_processor, 0.3.x drops both (it assigns the result of list.extend, None).
            processors.append(_logit_bias_processor(body.logit_bias, self._n_vocab))
        processors.append(counter)
        kwargs: dict[str, Any] = {
            "stop": body.stop or [],
            "seed": body.seed,
            "logits_processor": self._llama_cpp.LogitsProcessorList(processors),
        }
        if body.temperature is not None:
            kwargs["temperature"] = body.temperature
        if body.top_p is not None:
            kwargs["top_p"] = body.top_p
        if body.presence_penalty is not None:
            kwargs["presence_penalty"] = body.presence_penalty
        if body.frequency_penalty is not None:
            kwargs["frequency_penalty"] = body.frequency_penalty
        return kwargs

    def _drain(
        self,
        chunks: Iterator[dict],
        text_of: Any,
        on_delta: OnDelta | None,
        cancelled: threading.Event,
        counter: _TokenCounter,
        limit: int | None,
        param: str,
    ) -> TextOutcome:
        parts: list[str] = []
        finish_reason = "length"
        try:
            for chunk in chunks:
                if cancelled.is_set():
                    break
                choice = chunk["choices"][0]
                text = text_of(choice)
                if text:
                    parts.append(text)
                    if on_delta is not None:
                        on_delta(text)
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
        except ValueError as exc:  # e.g. prompt longer than the context window
            raise EngineError(str(exc), param=param) from exc
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # stops generation at once when we left the loop early
        if counter.prompt_tokens >= counter.n_ctx:  # a padded context let it in; nothing fits after it
            raise EngineError(
                f"The prompt ({counter.prompt_tokens}+ tokens) does not fit the model's context of {counter.n_ctx} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        if counter.truncated:
            finish_reason = "length"
        if cancelled.is_set():
            finish_reason = "cancelled"
        return TextOutcome("".join(parts), finish_reason, counter.usage(finish_reason, limit))

    def chat(self, body: ChatCompletionBody, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        counter = _TokenCounter(cancelled, self._eos, limit=body.token_limit, n_ctx=self.n_ctx)
        # Before taking a slot: fetching a remote image must not hold a context.
        messages = [_message(m, images=self.images if self.vision else None) for m in body.messages]
        sampling = self._sampling(body, counter)
        with self._generators.use() as llm:
            chunks = llm.create_chat_completion(messages=messages, max_tokens=body.token_limit, stream=True, **sampling)
            return self._drain(
                chunks, lambda c: c["delta"].get("content"), on_delta, cancelled, counter, body.token_limit, "messages"
            )

    def complete(self, body: CompletionBody, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        if not isinstance(body.prompt, str):
            if len(body.prompt) != 1:
                raise EngineError("only one prompt per request is supported", param="prompt")
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
        counter = _TokenCounter(cancelled, self._eos, limit=body.token_limit, n_ctx=self.n_ctx)
        sampling = self._sampling(body, counter)
        with self._generators.use() as llm:
            chunks = llm.create_completion(
                prompt=prompt, suffix=body.suffix, max_tokens=body.token_limit, echo=body.echo, stream=True, **sampling
            )
            return self._drain(
                chunks, lambda c: c.get("text"), on_delta, cancelled, counter, body.token_limit, "prompt"
            )

    # ------------------------------------------------------------ embeddings

    def embed(self, body: EmbeddingBody) -> tuple[list[list[float]], Usage]:
        try:
            with self._embedders.use() as embedder:
                result = embedder.create_embedding(body.inputs)
        except ValueError as exc:
            raise EngineError(str(exc), param="input") from exc
        vectors = [item["embedding"] for item in result["data"]]
        if body.dimensions is not None:
            if body.dimensions > len(vectors[0]):
                raise EngineError(
                    f"dimensions {body.dimensions} exceeds the model's {len(vectors[0])}", param="dimensions"
                )
            vectors = [v[: body.dimensions] for v in vectors]
        prompt_tokens = int(result["usage"]["prompt_tokens"])
        return vectors, Usage(prompt_tokens, 0, prompt_tokens)

    def close(self) -> None:
        self._generators.close()
        self._embedders.close()


def _vision_handler(projector: str) -> Any:
    """A LLaVA-1.5 chat handler; it binds its libmtmd context to the first ``Llama`` it serves."""
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    try:
        return Llava15ChatHandler(clip_model_path=projector, verbose=False)
    except Exception as exc:  # libmtmd reports a bad projector as a generic failure
        raise RuntimeError(f"llama.cpp could not load the projector {projector}: {exc}") from exc


def _logit_bias_processor(bias: dict[str, float], n_vocab: int) -> Any:
    try:
        table = {int(k): float(v) for k, v in bias.items()}
    except ValueError:
        raise EngineError("logit_bias keys must be token ids", param="logit_bias") from None
    outside = [k for k in table if not 0 <= k < n_vocab]
    if outside:
        raise EngineError(f"logit_bias token ids out of range: {outside[:5]}", param="logit_bias")

    def apply(input_ids: Any, scores: Any) -> Any:
        for token, value in table.items():
            scores[token] += value
        return scores

    return apply


def _message(message: Any, *, images: ImageFetcher | None) -> dict[str, Any]:
    """A chat message for llama-cpp-python: text parts joined, image parts kept for a vision model
    (``images``: None for a model without one), every image as a data: URL."""
    content = message.content
    if isinstance(content, list):
        if images is not None and any(part.get("type") == "image_url" for part in content):
            return {"role": message.role, "content": [_part(part, images) for part in content]}
        texts = []
        for part in content:
            if part.get("type") != "text":
                raise EngineError(
                    f"this model does not accept content parts of type {part.get('type')!r}", param="messages"
                )
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    out: dict[str, Any] = {"role": message.role, "content": content or ""}
    if message.name:
        out["name"] = message.name
    return out


def _part(part: dict[str, Any], images: ImageFetcher) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url.startswith(("data:image/", "http://", "https://")):
            raise EngineError("image_url.url must be a data:image/... URL or an http(s) URL", param="messages")
        if not url.startswith("data:"):
            try:
                url = images.data_url(url)
            except ImageFetchError as exc:
                raise EngineError(str(exc), param="messages", code=exc.code) from None
        return {"type": "image_url", "image_url": {"url": url}}
    raise EngineError(f"this model does not accept content parts of type {kind!r}", param="messages")


class LlamaCppRuntime:
    name = NAME
    capabilities = [*CAPABILITIES, subjects.VISION]  # vision: models registered with a projector

    def __init__(
        self,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        images: ImageFetcher | None = None,
        gpu_layers: int | None = None,
    ) -> None:
        """``images``: how vision chats fetch http(s) image URLs (the node's --allow-fetch-host,
        --no-remote-images); default: from public addresses only. ``gpu_layers``: at most this
        many layers offloaded (``--gpu-layers``; None: all, where the build and machine can)."""
        self.n_ctx = n_ctx
        self.n_threads = n_threads or _threads()
        self.images = images
        self.gpu_layers = gpu_layers
        self.backend, self.device = "cpu", "ram"

    def probe(self) -> RuntimeStatus:
        status = probe_packages(NAME, self.capabilities, [("llama_cpp", "llama-cpp-python")])
        if status.available and self.gpu_layers != 0:  # --gpu-layers 0: the CPU, whatever the build
            self.backend, self.device = llama_backend.runs_on(llama_backend.build_backend(), len(system.gpus()))
        status.backend, status.device = self.backend, self.device
        return status

    def context(self, record: ModelRecord, path: str) -> int:
        """The context a model gets: its ``n_ctx`` label, else the runtime's, at most the trained one."""
        asked = setting(record.labels, "n_ctx", "LLM_ROUTER_LLAMA_CTX")
        n_ctx = int(asked) if asked and asked.isdigit() and int(asked) > 0 else self.n_ctx
        return min(n_ctx, context_length(path) or n_ctx)

    def _gpu_layers(self) -> int:
        on_gpu = self.device != "ram"
        supports = False
        if on_gpu:
            import llama_cpp

            supports = bool(llama_cpp.llama_supports_gpu_offload())
        return llama_backend.gpu_layers(self.gpu_layers, supports_offload=supports, on_gpu=on_gpu)

    def estimate(self, record: ModelRecord, path: str, *, slots: int = 1) -> dict[str, int]:
        """Bytes per device the model will take (llama_memory.estimate); {} for an unreadable GGUF."""
        try:
            shape = layout(path)
        except (OSError, GgufError):
            return {}
        projector = record.source.projector if subjects.VISION in record.capabilities else None
        on_gpu = self.device != "ram"  # the build has a GPU library and the machine a GPU
        plan = llama_memory.Plan(
            n_ctx=self.context(record, path),
            slots=slots,
            gpu_layers=llama_backend.gpu_layers(self.gpu_layers, supports_offload=on_gpu, on_gpu=on_gpu),
            gpu_device=self.device if on_gpu else "gpu0",
            projector_bytes=llama_memory.file_bytes(projector),
        )
        return llama_memory.estimate(shape, plan)

    def accepts(self, record: ModelRecord) -> bool:
        return record.format == "gguf"

    def load(self, record: ModelRecord, path: str, *, slots: int = 1) -> LlamaEngine:
        """``slots``: contexts, so requests run at once; each costs one KV cache of ``n_ctx``."""
        projector = record.source.projector if subjects.VISION in record.capabilities else None
        return LlamaEngine(
            path,
            n_ctx=self.context(record, path),
            n_threads=self.n_threads,
            projector=projector,
            slots=slots,
            images=self.images,
            n_gpu_layers=self._gpu_layers(),
        )
