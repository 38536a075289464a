"""One generation on a llama.cpp context, token by token: sampling, an optional grammar, the
token limit, the context window, stop strings, cancellation and real logprobs.

llama-cpp-python's ``create_completion`` is not used for this: it re-decodes every generated
token each step, can only report logprobs from a context that keeps the logits of every
position (``logits_all``, n_ctx x n_vocab floats per slot), and stops at ``max_tokens`` only
after a complete UTF-8 character. Here the loop runs over ``Llama.generate`` (which keeps the
prompt's KV cache between calls), decodes incrementally, and stops exactly at the limit, so a
grammar is never forced to an end token it would refuse. Logprobs come from the logits the
sampler chain is given at each step (a logits processor, first in the chain: the model's own
distribution, before biases, penalties or the grammar), computed only when asked.
"""

from __future__ import annotations

import codecs
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from events.messages import TokenLogprob, TopLogprob, Usage

from .base import EngineError

# Called with each piece of text that is safe to send (no partial character, nothing that may
# be the start of a stop string) and the logprobs of the tokens it completes (None unless asked).
OnText = Callable[[str, list[TokenLogprob] | None], None]


# The sampler settings that a request body, Sampling and llama-cpp-python's generate and
# create_chat_completion all name alike (temperature is generate's ``temp``).
SAMPLER_SETTINGS = ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty")


@dataclass
class Sampling:
    """What the sampler chain is built from (OpenAI's fields and llama.cpp's extensions)."""

    temperature: float
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    processors: list[Any] = field(default_factory=list)  # logit bias
    grammar: str | None = None  # GBNF


@dataclass
class Generation:
    text: str
    finish_reason: str  # stop, length, cancelled
    completion_tokens: int
    logprobs: list[TokenLogprob] | None


class Pieces:
    """Every token's text bytes, looked up once (the vocabulary never changes)."""

    def __init__(self, llm: Any) -> None:
        self._model = llm._model
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self._cache.get(token)
        if piece is None:
            piece = self._cache[token] = self._model.detokenize([token])
        return piece


class _Logprobs:
    """Captures the distribution of each step as the sampler chain sees it, and turns it into
    the logprob of the token that was sampled and the ``top`` alternatives."""

    def __init__(self, top: int, pieces: Pieces) -> None:
        self.top = top
        self.pieces = pieces
        self.logits: np.ndarray | None = None

    def __call__(self, input_ids: Any, scores: np.ndarray) -> np.ndarray:
        self.logits = np.array(scores, dtype=np.float64)  # later processors change scores in place
        return scores

    def entry(self, token: int) -> TokenLogprob:
        logits = self.logits
        assert logits is not None
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        alternatives = []
        if self.top:
            best = np.argpartition(-logprobs, self.top - 1)[: self.top]
            for i in best[np.argsort(-logprobs[best])]:
                alternatives.append(_top(int(i), float(logprobs[i]), self.pieces))
        chosen = _top(token, float(logprobs[token]), self.pieces)
        return TokenLogprob(chosen.token, chosen.logprob, chosen.utf8, alternatives)


def _top(token: int, logprob: float, pieces: Pieces) -> TopLogprob:
    raw = pieces(token)
    return TopLogprob(raw.decode("utf-8", errors="replace"), logprob, raw)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def generate(
    llm: Any,
    prompt: list[int],
    sampling: Sampling,
    *,
    n_ctx: int,
    limit: int | None,
    stops: list[str],
    cancelled: threading.Event,
    pieces: Pieces,
    top_logprobs: int | None = None,
    on_text: OnText | None = None,
    fresh: bool = False,
    param: str = "messages",
) -> Generation:
    """Generate after ``prompt`` (token ids) on ``llm``, which the caller holds alone.

    ``top_logprobs``: None for no logprobs, else how many alternatives each token lists.
    ``fresh``: evaluate the prompt again instead of reusing the context's cache of it, so that
    a seeded request gives the same tokens whatever the context held before.
    """
    import llama_cpp

    room = n_ctx - len(prompt)
    if room <= 0:
        raise EngineError(
            f"The prompt ({len(prompt)} tokens) does not fit the model's context of {n_ctx} tokens.",
            param=param,
            code="context_length_exceeded",
        )
    budget = min(limit, room) if limit else room
    capture = _Logprobs(top_logprobs, pieces) if top_logprobs is not None else None
    processors = ([capture] if capture else []) + sampling.processors
    grammar = llama_cpp.LlamaGrammar.from_string(sampling.grammar, verbose=False) if sampling.grammar else None
    if fresh:
        llm.reset()
    # Unseeded: the next of the context's own sequence of seeds, as llama-cpp-python does.
    llm.set_seed(sampling.seed if sampling.seed is not None else random.Random(llm._seed).randint(0, 2**32))

    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    text, sent = "", 0
    tokens = 0
    logprobs: list[TokenLogprob] | None = [] if capture else None
    pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not sent yet
    finish = "length"
    vocab = llm._model.vocab
    steps = llm.generate(
        prompt,
        temp=sampling.temperature,
        **{name: getattr(sampling, name) for name in SAMPLER_SETTINGS},
        logits_processor=llama_cpp.LogitsProcessorList(processors) if processors else None,
        grammar=grammar,
    )
    try:
        for token in steps:
            if cancelled.is_set():
                finish = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            tokens += 1
            if capture is not None:
                pending.append(capture.entry(token))
            text += decoder.decode(pieces(token))
            cut = _first_stop(text, stops, sent)
            if cut is not None:
                text, finish = text[:cut], "stop"
                break
            safe = len(text) - _held_back(text, stops) if stops else len(text)
            if on_text is not None and (safe > sent or pending):
                on_text(text[sent:safe], pending or None)
                if logprobs is not None:
                    logprobs.extend(pending)
                pending = []
                sent = safe
            if tokens >= budget:
                break
    except ValueError as exc:  # llama.cpp refused the prompt or a decode
        raise EngineError(str(exc), param=param) from exc
    finally:
        steps.close()  # stops generation at once when we left the loop early
    if cancelled.is_set():
        finish = "cancelled"
    if logprobs is not None:
        logprobs.extend(pending)
    if on_text is not None and (len(text) > sent or pending):
        on_text(text[sent:], pending or None)
    return Generation(text, finish, tokens, logprobs)


def _first_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the first stop string in ``text`` begins (searching only what may hold a new one)."""
    best = None
    for stop in stops:
        at = text.find(stop, max(0, sent - len(stop)))
        if at >= 0 and (best is None or at < best):
            best = at
    return best


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
