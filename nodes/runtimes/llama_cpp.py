"""llama.cpp (llama-cpp-python) on GGUF files: chat, completion, embeddings, streaming.

Chats and completions run through our own token loop (nodes/runtimes/llama_generate.py: exact
token limits, stop strings, grammars, logprobs), with the prompt made by the GGUF's chat
template (tools and earlier calls given to it, or written into the prompt, by
nodes/runtimes/tool_calls.py). ``response_format`` and forced tool calls become grammars
(nodes/runtimes/grammars.py); ``n`` choices run one after another in the same slot, reusing
the prompt's KV cache.

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
Chats of a vision model go through the handler's own completion, which offers none of the
above: such a request that asks for them is refused.
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
from events.messages import Choice, ModelRecord, RuntimeStatus, Usage
from events.openai import ChatCompletionBody, CompletionBody, EmbeddingBody
from formats.gguf import GgufError, context_length, layout

from .. import system
from ..remote_media import ImageFetcher, ImageFetchError
from . import grammars, llama_backend, llama_memory
from .base import EngineError, OnDelta, TextOutcome
from .chat_inputs import answer_schema, template_inputs, text_message
from .choices import ChoiceWriter
from .common import probe_packages, setting
from .llama_generate import SAMPLER_SETTINGS, Pieces, Sampling, generate
from .tool_calls import MAX_PARALLEL_CALLS, template_format

NAME = "llama_cpp"
CAPABILITIES = [subjects.CHAT, subjects.COMPLETION, subjects.EMBEDDING]


def _threads() -> int:
    return int(os.environ.get("LLM_ROUTER_LLAMA_THREADS", "0")) or max(1, (os.cpu_count() or 2) // 2)


class _TokenCounter:
    """For vision chats, which run llama-cpp-python's own completion (through the LLaVA
    handler): a logits processor run before every sampled token that counts tokens, enforces
    the token limit, the context window and cancel.

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

        def instance(**mode: Any) -> Any:
            """One ``Llama`` over the GGUF, as every slot's instance has it, in ``mode``."""
            return llama_cpp.Llama(
                model_path=path, n_ctx=self.n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, verbose=False, **mode
            )

        def generator() -> Any:
            handler = _vision_handler(projector) if projector is not None else None
            try:
                return instance(chat_handler=handler)
            except ValueError as exc:
                raise RuntimeError(f"llama.cpp could not load {path}: {exc}") from exc

        def embedder() -> Any:
            return instance(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)

        with llama_memory.reported() as allocated:
            self._generators = _Instances(generator, slots, eager=slots)
        self.memory_bytes = allocated  # per device, as llama.cpp reported allocating it
        self._embedders = _Instances(embedder, slots)
        first = self._generators.first()
        self._n_vocab = first.n_vocab()
        self._eos = first.token_eos()
        self._vocab = first._model.vocab
        self._pieces = Pieces(first)
        template = first.metadata.get("tokenizer.chat_template")
        self._formatter = _formatter(first, template) if template else None
        self._call_format = template_format(template)

    # ------------------------------------------------------------ generation

    def _sampling(
        self, body: ChatCompletionBody | CompletionBody, index: int, grammar: str | None, *, chat: bool
    ) -> Sampling:
        processors: list[Any] = []
        if body.logit_bias:
            processors.append(_logit_bias_processor(body.logit_bias, self._n_vocab))
        seed = None if body.seed is None else (body.seed + index) & 0xFFFFFFFF
        return Sampling(
            temperature=body.temperature if body.temperature is not None else (0.2 if chat else 0.8),
            seed=seed,
            processors=processors,
            grammar=grammar,
            **_requested(body, SAMPLER_SETTINGS),
        )

    def _check_grammar(self, grammar: str) -> None:
        """llama.cpp's parser returns no sampler for a grammar it cannot read, and sampling with
        none would crash the process: try it once first."""
        llama_cpp = self._llama_cpp
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            raise EngineError("the output's grammar could not be built (llama.cpp refused it)", status=500)
        llama_cpp.llama_sampler_free(sampler)

    def _run(
        self,
        prompt: list[int],
        body: ChatCompletionBody | CompletionBody,
        writer: Callable[[int], ChoiceWriter],
        *,
        grammar: str | None,
        stops: list[str],
        top_logprobs: int | None,
        cancelled: threading.Event,
        chat: bool,
        echo: str = "",
    ) -> TextOutcome:
        """``body.n`` choices after ``prompt``, one after another in one slot (the prompt's KV
        cache is reused); ``writer(i)`` shapes choice i."""
        choices: list[Choice] = []
        completion = 0
        param = "messages" if chat else "prompt"
        if grammar is not None:
            self._check_grammar(grammar)
        with self._generators.use() as llm:
            for index in range(body.n):
                out = writer(index)
                if echo and out.on_delta is not None:
                    out.on_text(echo, None)
                generation = generate(
                    llm,
                    prompt,
                    self._sampling(body, index, grammar, chat=chat),
                    n_ctx=self.n_ctx,
                    limit=body.token_limit,
                    stops=stops,
                    cancelled=cancelled,
                    pieces=self._pieces,
                    top_logprobs=top_logprobs,
                    on_text=out.on_text if out.on_delta is not None else None,
                    fresh=body.seed is not None and index == 0,
                    param=param,
                )
                completion += generation.completion_tokens
                choices.append(out.finish(echo + generation.text, generation.finish_reason, generation.logprobs))
                if cancelled.is_set():
                    break
        usage = Usage(len(prompt), completion, len(prompt) + completion)
        first = choices[0]
        plain = len(choices) == 1 and first.tool_calls is None and first.logprobs is None
        return TextOutcome(first.text, first.finish_reason, usage, None if plain else choices)

    def _prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> tuple[list[int], list[str]]:
        """The chat as tokens, through the GGUF's chat template, and the template's stop strings."""
        from llama_cpp import llama_chat_format

        try:
            if self._formatter is not None:
                result = self._formatter(messages=messages, tools=tools)
            else:  # no template in the file: llama-cpp-python's default
                result = llama_chat_format.format_llama2(messages=messages)
        except Exception as exc:  # jinja2 errors and the template's own raise_exception
            raise EngineError(f"the model's chat template refused these messages: {exc}", param="messages") from None
        tokens = self._generators.first().tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        stop = result.stop
        return tokens, [stop] if isinstance(stop, str) else [s for s in stop or [] if s]

    def chat(self, body: ChatCompletionBody, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        if self.vision:
            return self._vision_chat(body, on_delta, cancelled)
        mode, tools = body.tool_mode, body.tools or []
        form, native = self._call_format
        prompt, stops = self._prompt(*template_inputs(body, form, native))
        parallel = body.parallel_tool_calls is not False and form.parallel
        answer = answer_schema(body)
        grammar = None
        if mode in ("required", "named"):
            named = body.tool_choice.function.name if mode == "named" else None  # type: ignore[union-attr]
            grammar = grammars.tool_grammar(
                tools, form, named=named, parallel=MAX_PARALLEL_CALLS if parallel and not named else 1
            )
        elif mode == "auto" and answer is not False:
            grammar = grammars.tool_grammar(
                tools, form, parallel=MAX_PARALLEL_CALLS if parallel else 1, otherwise=answer
            )
        elif answer is not False:
            grammar = grammars.json_grammar(answer)
        names = {tool.function.name for tool in tools}
        shape = {"none": "text", "auto": "auto"}.get(mode, "forced")

        def writer(index: int) -> ChoiceWriter:
            return ChoiceWriter(index, shape, on_delta=on_delta, form=form, names=names, parallel=parallel)

        top = (body.top_logprobs or 0) if body.logprobs else None
        return self._run(
            prompt,
            body,
            writer,
            grammar=grammar,
            stops=body.stops + stops,
            top_logprobs=top,
            cancelled=cancelled,
            chat=True,
        )

    def complete(self, body: CompletionBody, on_delta: OnDelta | None, cancelled: threading.Event) -> TextOutcome:
        text = body.text_prompt
        llm = self._generators.first()
        prompt = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) if text else []
        prompt = prompt or [llm.token_bos()]

        def writer(index: int) -> ChoiceWriter:
            return ChoiceWriter(index, "text", on_delta=on_delta)

        return self._run(
            prompt,
            body,
            writer,
            grammar=None,
            stops=body.stops,
            top_logprobs=body.logprobs,
            cancelled=cancelled,
            chat=False,
            echo=text if body.echo else "",
        )

    # ------------------------------------------------------------ vision chats (LLaVA handler)

    def _vision_chat(
        self, body: ChatCompletionBody, on_delta: OnDelta | None, cancelled: threading.Event
    ) -> TextOutcome:
        field = body.shaping_field
        if field is not None:
            raise EngineError(
                f"'{field}' is not supported for a model with a vision projector (its chats go through the LLaVA handler).",
                param=field,
                code="unsupported_parameter",
            )
        counter = _TokenCounter(cancelled, self._eos, limit=body.token_limit, n_ctx=self.n_ctx)
        # Before taking a slot: fetching a remote image must not hold a context.
        messages = [_vision_message(m, self.images) for m in body.messages]
        processors: list[Any] = []
        if body.logit_bias:
            # Applied here, not through llama-cpp-python's logit_bias argument: combined with a
            # logits_processor, 0.3.x drops both (it assigns the result of list.extend, None).
            processors.append(_logit_bias_processor(body.logit_bias, self._n_vocab))
        processors.append(counter)
        kwargs: dict[str, Any] = {
            "stop": body.stops,
            "seed": body.seed,
            "logits_processor": self._llama_cpp.LogitsProcessorList(processors),
            **_requested(body, ("temperature", *SAMPLER_SETTINGS)),
        }
        with self._generators.use() as llm:
            chunks = llm.create_chat_completion(messages=messages, max_tokens=body.token_limit, stream=True, **kwargs)
            return self._drain(chunks, on_delta, cancelled, counter, body.token_limit)

    def _drain(
        self,
        chunks: Iterator[dict],
        on_delta: OnDelta | None,
        cancelled: threading.Event,
        counter: _TokenCounter,
        limit: int | None,
    ) -> TextOutcome:
        parts: list[str] = []
        finish_reason = "length"
        try:
            for chunk in chunks:
                if cancelled.is_set():
                    break
                choice = chunk["choices"][0]
                text = choice["delta"].get("content")
                if text:
                    parts.append(text)
                    if on_delta is not None:
                        on_delta(text)
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
        except ValueError as exc:  # e.g. prompt longer than the context window
            raise EngineError(str(exc), param="messages") from exc
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # stops generation at once when we left the loop early
        if counter.prompt_tokens >= counter.n_ctx:  # a padded context let it in; nothing fits after it
            raise EngineError(
                f"The prompt ({counter.prompt_tokens}+ tokens) does not fit the model's context of {counter.n_ctx} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        if counter.truncated:
            finish_reason = "length"
        if cancelled.is_set():
            finish_reason = "cancelled"
        return TextOutcome("".join(parts), finish_reason, counter.usage(finish_reason, limit))

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


def _requested(body: ChatCompletionBody | CompletionBody, settings: tuple[str, ...]) -> dict[str, Any]:
    """The ``settings`` that ``body`` sets; one it leaves unset (None) keeps the engine's default."""
    values = {name: getattr(body, name) for name in settings}
    return {name: value for name, value in values.items() if value is not None}


def _formatter(llm: Any, template: str) -> Any:
    """The GGUF's chat template, as llama-cpp-python would use it (its tokens, its end token)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos, bos = llm.token_eos(), llm.token_bos()
    return Jinja2ChatFormatter(
        template=template,
        eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )


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


def _vision_message(message: Any, images: ImageFetcher) -> dict[str, Any]:
    """A chat message for the LLaVA handler: one with images keeps its parts, every image as a
    data: URL; any other is a text message (:func:`.chat_inputs.text_message`)."""
    content = message.content
    if isinstance(content, list) and any(part.get("type") == "image_url" for part in content):
        return {"role": message.role, "content": [_part(part, images) for part in content]}
    return text_message(message)


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
        status.gpu = self.device != "ram"  # its layers go to a GPU (main's flag; the device says which)
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
