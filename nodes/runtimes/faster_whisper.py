"""faster-whisper (CTranslate2 Whisper) on model folders: speech to text, and translation to English.

The audio arrives as bytes in any container PyAV decodes (wav, mp3, m4a, ogg, webm, flac...);
it is decoded and resampled to 16 kHz mono here, so a bad upload is a 400 before any model work.

Per-model settings come from the model record's labels, then environment variables:

- ``compute_type`` / ``LLM_ROUTER_WHISPER_COMPUTE_TYPE``: CTranslate2 compute type; default
  "int8" on CPU (the fastest there, on any saved precision) and "float16" on CUDA;
- ``beam_size`` / ``LLM_ROUTER_WHISPER_BEAM_SIZE``: beam width (default 5, faster-whisper's);
- ``LLM_ROUTER_ENGINE_THREADS``: CTranslate2 CPU threads (0 = its default), per slot.

``slots`` (the node's ``--parallel``) becomes CTranslate2's ``num_workers``: that many
transcriptions run at once, from as many threads, with the weights shared (same device).
"""

from __future__ import annotations

import io
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from events import subjects
from events.messages import ModelRecord
from formats.artifacts import artifact_size

from . import cuda
from .base import EngineError
from .common import PackageRuntime, setting
from .transcript_formats import LANGUAGES

NAME = "faster_whisper"
SAMPLE_RATE = 16000
TASKS = ("transcribe", "translate")
CAPABILITIES = [subjects.TRANSCRIPTION, subjects.TRANSLATION]  # translation: multilingual models only
# OpenAI's "temperature 0": start greedy, raise the temperature when decoding fails its checks.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
DEFAULT_BEAM_SIZE = 5


@dataclass
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


@dataclass
class Transcript:
    """What one request produced; ``transcript_formats`` renders it as OpenAI's response formats."""

    task: str
    text: str
    language: str  # ISO 639-1 code of the spoken language (detected unless given)
    duration: float  # seconds of input audio
    segments: list[Segment] = field(default_factory=list)
    words: list[Word] | None = None  # only when word timestamps were requested


class FasterWhisperEngine:
    """Blocking; the node agent calls it from a worker thread."""

    def __init__(
        self,
        path: str,
        *,
        threads: int = 0,
        compute_type: str | None = None,
        beam_size: int = DEFAULT_BEAM_SIZE,
        device: str | None = None,
        slots: int = 1,
    ) -> None:
        import ctranslate2
        from faster_whisper import WhisperModel

        if slots < 1:
            raise ValueError(f"slots must be 1 or more, not {slots}")
        self.slots = slots

        self.path = path
        self.device = device or ("cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu")
        self.compute_type = compute_type or ("float16" if self.device == "cuda" else "int8")
        supported = ctranslate2.get_supported_compute_types(self.device)
        if self.compute_type not in supported:
            raise ValueError(
                f"compute type {self.compute_type!r} is not supported on {self.device} (supported: {', '.join(sorted(supported))})"
            )
        self.beam_size = beam_size
        if not Path(path).is_dir():  # else faster-whisper would take it for a hub repository id
            raise RuntimeError(f"no CTranslate2 Whisper model folder at {path}")
        try:
            self._model = WhisperModel(
                path,
                device=self.device,
                compute_type=self.compute_type,
                cpu_threads=threads,
                num_workers=slots,
                local_files_only=True,
            )
        except (RuntimeError, OSError, ValueError) as exc:
            raise RuntimeError(f"faster-whisper could not load {path}: {exc}") from exc
        self.multilingual = bool(self._model.model.is_multilingual)
        self.languages = list(self._model.supported_languages)
        self.capabilities = [subjects.TRANSCRIPTION] + ([subjects.TRANSLATION] if self.multilingual else [])
        self.artifact_bytes = artifact_size(Path(path))

    def transcribe(
        self,
        audio: bytes,
        *,
        task: str = "transcribe",
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        word_timestamps: bool = False,
        cancelled: threading.Event | None = None,
    ) -> Transcript:
        """Speech in ``audio`` to text; ``task="translate"`` gives English text from any language."""
        if task not in TASKS:
            raise EngineError(f"task must be one of {', '.join(TASKS)}, not {task!r}", param="task")
        if task == "translate" and not self.multilingual:
            raise EngineError("this model is English-only: it cannot translate", param="model")
        language = self._language(language)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1:
            raise EngineError(f"temperature must be a number from 0 to 1, not {temperature!r}", param="temperature")
        samples = decode(audio)
        duration = len(samples) / SAMPLE_RATE
        segments_iter, info = self._model.transcribe(
            samples,
            task=task,
            language=language,
            initial_prompt=prompt or None,
            temperature=list(FALLBACK_TEMPERATURES) if temperature == 0 else float(temperature),
            beam_size=self.beam_size,
            word_timestamps=word_timestamps,
        )
        segments: list[Segment] = []
        words: list[Word] = []
        for seg in segments_iter:  # decoding happens as this generator is consumed
            if cancelled is not None and cancelled.is_set():
                raise EngineError("request cancelled", status=499, code="cancelled")
            # Random or confused models can emit timestamps past the end of the audio.
            start, end = _clamp(seg.start, duration), _clamp(seg.end, duration)
            segments.append(
                Segment(
                    id=len(segments),
                    seek=int(seg.seek),
                    start=start,
                    end=max(start, end),
                    text=seg.text,
                    tokens=[int(t) for t in seg.tokens],
                    temperature=float(seg.temperature or 0.0),
                    avg_logprob=float(seg.avg_logprob),
                    compression_ratio=float(seg.compression_ratio),
                    no_speech_prob=float(seg.no_speech_prob),
                )
            )
            for w in seg.words or []:
                w_start = _clamp(w.start, duration)
                words.append(Word(w.word, w_start, max(w_start, _clamp(w.end, duration)), float(w.probability)))
        return Transcript(
            task=task,
            text="".join(s.text for s in segments).strip(),
            language=info.language,
            duration=duration,
            segments=segments,
            words=words if word_timestamps else None,
        )

    def close(self) -> None:
        model, self._model = self._model, None
        if model is not None:
            model.model.unload_model()

    def _language(self, language: str | None) -> str | None:
        """An ISO 639-1 code the model knows; English names ("german") are accepted too."""
        if language is None or language == "":
            return None if self.multilingual else "en"
        code = language.strip().lower()
        code = _NAME_TO_CODE.get(code, code)
        if code not in self.languages:
            known = "en only (an English-only model)" if not self.multilingual else "ISO 639-1 codes such as en, de, fr"
            raise EngineError(f"unsupported language {language!r}: expected {known}", param="language")
        return code


_NAME_TO_CODE = {name: code for code, name in LANGUAGES.items()}


def _clamp(t: float, duration: float) -> float:
    return round(min(max(float(t), 0.0), duration), 3)


def decode(audio: bytes) -> Any:
    """Any PyAV-decodable audio to a float32 16 kHz mono numpy array; EngineError if it is not audio."""
    import av
    from faster_whisper import decode_audio

    if not audio:
        raise EngineError("the audio file is empty", param="file")
    try:
        samples = decode_audio(io.BytesIO(audio), sampling_rate=SAMPLE_RATE)
    except IndexError:  # PyAV found a container but no audio stream in it (e.g. an image)
        raise EngineError("the file has no audio stream", param="file") from None
    except (av.error.FFmpegError, ValueError) as exc:
        raise EngineError(f"could not decode the audio file: {exc}", param="file") from None
    if len(samples) == 0:
        raise EngineError("the audio file holds no audio samples", param="file")
    return samples


class FasterWhisperRuntime(PackageRuntime):
    name = NAME
    capabilities = CAPABILITIES
    packages = [("faster_whisper", "faster-whisper"), ("ctranslate2", "ctranslate2"), ("av", "av")]

    def runs_on_gpu(self) -> bool:
        """Load picks CUDA (float16) when CTranslate2 sees a device; its Linux and Windows wheels
        are built with CUDA, so a visible device is the test (cuDNN missing shows at load)."""
        return sys.platform in ("linux", "win32") and cuda.cuda_device_count() > 0

    def load(self, record: ModelRecord, path: str, *, slots: int = 1) -> FasterWhisperEngine:
        labels = record.labels or {}
        beam = setting(labels, "beam_size", "LLM_ROUTER_WHISPER_BEAM_SIZE")
        try:
            beam_size = int(beam) if beam is not None else DEFAULT_BEAM_SIZE
        except ValueError:
            raise ValueError(f"model setting beam_size must be an integer, not {beam!r}") from None
        if beam_size < 1:
            raise ValueError(f"model setting beam_size must be 1 or more, not {beam_size}")
        return FasterWhisperEngine(
            path,
            threads=self.threads,
            compute_type=setting(labels, "compute_type", "LLM_ROUTER_WHISPER_COMPUTE_TYPE"),
            beam_size=beam_size,
            device=self.device,
            slots=slots,
        )
