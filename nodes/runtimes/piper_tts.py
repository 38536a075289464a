"""Piper voices (``voice.onnx`` + ``voice.onnx.json``) run with onnxruntime: text to speech.

Piper's inference is reimplemented here (about thirty lines: phonemes -> ids -> one ONNX run
per sentence) so that the GPL-3.0 piper-tts package stays optional. It is needed only for
voices whose ``phoneme_type`` is "espeak" (most published voices), for its bundled espeak-ng
phonemizer; "text" voices map characters to ids directly.

Encoding to the OpenAI response formats: wav (``wave`` module) and pcm (raw s16le at 24 kHz,
the rate OpenAI documents for pcm) always; flac, mp3, opus (Ogg) and aac (ADTS) through PyAV
when its encoders are present.

``LLM_ROUTER_ENGINE_THREADS`` sets onnxruntime's intra-op threads (0 = its default), per call.

``slots`` calls run at once on one session (``InferenceSession.run`` is thread-safe); only
espeak phonemization, one global state in the process, takes turns under a lock.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
import re
import threading
import unicodedata
import wave
from pathlib import Path
from typing import Any

from events import subjects
from events.messages import ModelRecord

from . import cuda
from .base import EngineError
from .common import PackageRuntime

NAME = "piper"
CAPABILITIES = [subjects.SPEECH]
MAX_INPUT_CHARS = 4096  # OpenAI's limit for /v1/audio/speech
MIN_SPEED, MAX_SPEED = 0.25, 4.0
PCM_RATE = 24000  # OpenAI's "pcm" is 24 kHz signed 16-bit little-endian mono
BOS, EOS, PAD = "^", "$", "_"

# response_format -> (PyAV container, encoder names to try in order)
_AV_FORMATS = {
    "mp3": ("mp3", ("libmp3lame", "mp3", "libshine")),
    "opus": ("ogg", ("libopus", "opus")),
    "aac": ("adts", ("aac",)),
    "flac": ("flac", ("flac",)),
}

_log = logging.getLogger(__name__)
_espeak_lock = threading.Lock()  # espeak-ng is one global state in the process
_espeak: Any = None


class PiperVoiceConfig:
    """The parts of ``<voice>.onnx.json`` inference needs (the keys piper's PiperConfig reads)."""

    def __init__(self, raw: dict[str, Any], source: Path) -> None:
        try:
            self.sample_rate = int(raw["audio"]["sample_rate"])
            self.phoneme_id_map: dict[str, list[int]] = {k: list(v) for k, v in raw["phoneme_id_map"].items()}
            self.num_speakers = int(raw.get("num_speakers", 1))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source} is not a Piper voice config (missing or bad {exc})") from None
        self.phoneme_type = raw.get("phoneme_type", "espeak")
        self.espeak_voice = (raw.get("espeak") or {}).get("voice", "en-us")
        inference = raw.get("inference") or {}
        self.noise_scale = float(inference.get("noise_scale", 0.667))
        self.length_scale = float(inference.get("length_scale", 1.0))
        self.noise_w = float(inference.get("noise_w", 0.8))
        self.speaker_id_map: dict[str, int] = dict(raw.get("speaker_id_map") or {})
        self.default_speaker_id = int(raw.get("default_speaker_id", 0))
        clusters = raw.get("vowel_clusters") or []
        self.vowel_clusters = {tuple(c) for c in clusters} or None
        for symbol in (BOS, EOS, PAD):
            if symbol not in self.phoneme_id_map:
                raise ValueError(f"{source}: phoneme_id_map lacks {symbol!r}")


class PiperEngine:
    """Blocking; the node agent calls it from a worker thread."""

    def __init__(self, onnx_path: str, *, threads: int = 0, config_path: str | None = None, slots: int = 1) -> None:
        import onnxruntime

        if slots < 1:
            raise ValueError(f"slots must be 1 or more, not {slots}")
        self.slots = slots
        path = Path(onnx_path)
        config_file = Path(config_path) if config_path else Path(f"{path}.json")
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot read the Piper voice config {config_file}: {exc}") from exc
        try:
            self.config = PiperVoiceConfig(raw, config_file)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
        if self.config.phoneme_type not in ("text", "espeak"):
            raise RuntimeError(
                f"{config_file}: phoneme_type {self.config.phoneme_type!r} is not supported (text and espeak are)"
            )
        if self.config.phoneme_type == "espeak":
            _espeak_phonemizer()  # fail at load, not on the first request, when piper-tts is missing
        options = onnxruntime.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(str(path), options, providers=_providers(onnxruntime))
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise RuntimeError(f"onnxruntime could not load the voice {path}: {exc}") from exc
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.path = str(path)
        self.sample_rate = self.config.sample_rate
        self.capabilities = list(CAPABILITIES)
        self.artifact_bytes = Path(path).stat().st_size + config_file.stat().st_size
        self.formats = available_formats()

    # ------------------------------------------------------------ synthesis

    def speak(
        self, text: str, *, speed: float = 1.0, voice: str | None = None, cancelled: threading.Event | None = None
    ) -> tuple[Any, int]:
        """Speech for ``text``: (mono int16 numpy samples, sample rate of the voice).

        ``voice`` picks a speaker of a multi-speaker voice by name or number; any other value
        (e.g. OpenAI's "alloy") uses the default speaker, since the model itself is the voice.
        """
        import numpy as np

        if not isinstance(text, str) or not text.strip():
            raise EngineError("input must be non-empty text", param="input")
        if len(text) > MAX_INPUT_CHARS:
            raise EngineError(f"input is {len(text)} characters; the limit is {MAX_INPUT_CHARS}", param="input")
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not MIN_SPEED <= speed <= MAX_SPEED:
            raise EngineError(f"speed must be from {MIN_SPEED} to {MAX_SPEED}, not {speed!r}", param="speed")
        scales = np.array(
            [self.config.noise_scale, self.config.length_scale / speed, self.config.noise_w], dtype=np.float32
        )
        speaker = self._speaker(voice)
        pieces = []
        for phonemes in self._phonemize(text):
            if cancelled is not None and cancelled.is_set():
                raise EngineError("request cancelled", status=499, code="cancelled")
            ids = self._ids(phonemes)
            if len(ids) <= 3:  # only ^ _ $: nothing the voice knows how to say
                continue
            feed = {
                "input": np.array([ids], dtype=np.int64),
                "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": scales,
            }
            if "sid" in self._inputs:
                feed["sid"] = np.array([speaker], dtype=np.int64)
            audio = np.asarray(self._session.run(None, feed)[0], dtype=np.float32).reshape(-1)
            peak = float(np.max(np.abs(audio))) if audio.size else 0.0
            # Piper normalises each sentence to full scale (SynthesisConfig.normalize_audio).
            pieces.append(audio / peak if peak > 1e-8 else np.zeros_like(audio))
        if not pieces:
            raise EngineError("input has nothing this voice can pronounce", param="input")
        audio = np.concatenate(pieces)
        return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16), self.sample_rate

    def encode(self, pcm: Any, sample_rate: int, response_format: str = "mp3") -> bytes:
        """Mono int16 samples to the bytes of an OpenAI speech response format."""
        import numpy as np

        samples = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if response_format == "wav":
            return _wav(samples, sample_rate)
        if response_format == "pcm":
            return _resample(samples, sample_rate, PCM_RATE).astype("<i2").tobytes()
        if response_format not in self.formats:
            raise EngineError(
                f"response_format {response_format!r} is not available here; available: {', '.join(self.formats)}",
                param="response_format",
            )
        return _av_encode(samples, sample_rate, response_format)

    def close(self) -> None:
        self._session = None

    # ------------------------------------------------------------ helpers

    def _phonemize(self, text: str) -> list[list[str]]:
        """Phonemes per sentence, as piper does: espeak IPA, or the text's own code points."""
        if self.config.phoneme_type == "text":
            return [list(unicodedata.normalize("NFD", text))]
        phonemizer = _espeak_phonemizer()
        with _espeak_lock:
            return phonemizer.phonemize(self.config.espeak_voice, text, vowel_clusters=self.config.vowel_clusters)

    def _ids(self, phonemes: list[str]) -> list[int]:
        """``^`` then each phoneme's ids followed by the pad ``_``, then ``$`` (piper's layout)."""
        id_map = self.config.phoneme_id_map
        ids = [*id_map[BOS], *id_map[PAD]]
        missing = set()
        for phoneme in phonemes:
            if phoneme not in id_map:
                missing.add(phoneme)
                continue
            ids.extend(id_map[phoneme])
            ids.extend(id_map[PAD])
        ids.extend(id_map[EOS])
        if missing:
            _log.debug("phonemes missing from the voice's id map, skipped: %s", sorted(missing))
        return ids

    def _speaker(self, voice: str | None) -> int:
        if self.config.num_speakers <= 1 or voice is None:
            return self.config.default_speaker_id
        if voice in self.config.speaker_id_map:
            return int(self.config.speaker_id_map[voice])
        if re.fullmatch(r"\d+", voice) and int(voice) < self.config.num_speakers:
            return int(voice)
        return self.config.default_speaker_id


def _providers(onnxruntime: Any) -> list[str]:
    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _espeak_phonemizer() -> Any:
    global _espeak
    with _espeak_lock:
        if _espeak is None:
            try:
                from piper.phonemize_espeak import EspeakPhonemizer
            except ImportError:
                raise RuntimeError(
                    "this voice uses espeak phonemes: install piper-tts (GPL-3.0), which bundles espeak-ng"
                ) from None
            _espeak = EspeakPhonemizer()
        return _espeak


# ------------------------------------------------------------ audio encoding


def available_formats() -> list[str]:
    """Speech response formats this machine can encode: wav and pcm always, the rest via PyAV."""
    formats = ["wav", "pcm"]
    for fmt in _AV_FORMATS:
        if _av_encoder(fmt) is not None:
            formats.append(fmt)
    return formats


def _av_encoder(response_format: str) -> Any:
    """The first PyAV encoder present for the format (av.codec.Codec), or None."""
    try:
        import av
    except ImportError:
        return None
    _container, names = _AV_FORMATS[response_format]
    for name in names:
        try:
            return av.codec.Codec(name, "w")
        except (av.codec.codec.UnknownCodecError, ValueError):
            continue
    return None


def _wav(samples: Any, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


def _resample(samples: Any, rate: int, target: int) -> Any:
    """Linear-interpolation resampling; good enough for speech between 16 and 48 kHz."""
    import numpy as np

    if rate == target or samples.size == 0:
        return samples
    n_out = round(samples.size * target / rate)
    positions = np.arange(n_out) * (rate / target)
    return np.interp(positions, np.arange(samples.size), samples.astype(np.float32)).round().astype(np.int16)


def _av_encode(samples: Any, sample_rate: int, response_format: str) -> bytes:
    import av

    container_format, _names = _AV_FORMATS[response_format]
    codec = _av_encoder(response_format)
    rates = sorted(codec.audio_rates or [])
    # Encoders with a fixed rate list (opus: 8-48 kHz steps) get the nearest rate at or above.
    rate = sample_rate if not rates or sample_rate in rates else next((r for r in rates if r >= sample_rate), rates[-1])
    out = io.BytesIO()
    with av.open(out, "w", format=container_format) as container:
        stream = container.add_stream(codec.name, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = sample_rate
        # PyAV resamples to the encoder's rate and sample format and cuts its frame size.
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


class PiperRuntime(PackageRuntime):
    name = NAME
    capabilities = CAPABILITIES
    packages = [("onnxruntime", "onnxruntime"), ("numpy", "numpy")]

    def runs_on_gpu(self) -> bool:
        """Sessions take CUDAExecutionProvider when offered: onnxruntime-gpu (the tts-gpu extra)
        and a visible device."""
        return _installed("onnxruntime-gpu") and cuda.cuda_device_count() > 0

    def load(self, record: ModelRecord, path: str, *, slots: int = 1) -> PiperEngine:
        """``path``: the voice's .onnx file, or a folder holding exactly one voice pair."""
        return PiperEngine(str(voice_file(Path(path))), threads=self.threads, slots=slots)


def voice_file(path: Path) -> Path:
    """The .onnx of a Piper voice given as the file itself or as a folder with one voice."""
    if path.is_dir():
        voices = sorted(p for p in path.glob("*.onnx") if Path(f"{p}.json").is_file())
        if len(voices) != 1:
            raise RuntimeError(f"{path} must hold exactly one <voice>.onnx with its .onnx.json; found {len(voices)}")
        return voices[0]
    return path
