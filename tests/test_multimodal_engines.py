"""The multimodal engines against the real libraries, on tiny models the tests build.

Sections: images (diffusers), speech to text (faster-whisper), response formats of transcripts,
text to speech (Piper voice on onnxruntime), artifact detection. Each section's fixtures skip
it when its extra is not installed; with ``.[image,asr,tts]`` installed everything runs.
Engines run with one thread: on small CPUs that is several times faster than the default.
"""

from __future__ import annotations

import io
import json
import threading
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog.testing
from tiny_models import build_tiny_piper_voice, build_tiny_whisper, make_mask_png, make_png, make_wav

from events.messages import ModelRecord, ModelSource
from formats.artifacts import UnrecognisedModel, artifact_size, detect
from nodes.runtimes.base import EngineError


def record(runtime: str, path: Path, **labels: str) -> ModelRecord:
    return ModelRecord(
        name=f"tiny-{runtime}",
        format=runtime,
        runtime=runtime,
        capabilities=[],
        source=ModelSource(kind="path", path=str(path)),
        labels=dict(labels),
    )


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


# =========================================================================== images (diffusers)


@pytest.fixture(scope="session")
def images_loaded(sd_dir: Path):
    """The engine, asked for two slots, and what its load logged."""
    from nodes.runtimes.diffusers_images import DiffusersRuntime

    runtime = DiffusersRuntime(threads=1, device="cpu")
    with structlog.testing.capture_logs() as logs:
        engine = runtime.load(record("diffusers", sd_dir, steps="2"), str(sd_dir), slots=2)
    yield engine, logs
    engine.close()


@pytest.fixture(scope="session")
def images(images_loaded):
    return images_loaded[0]


def test_diffusers_runs_one_call_at_a_time_whatever_was_asked(images_loaded) -> None:
    """Its pipelines share one scheduler: --parallel 2 gives one slot, and the node says so."""
    engine, logs = images_loaded
    assert engine.slots == 1
    lowered = [e for e in logs if e["event"] == "parallel lowered for this runtime"]
    assert len(lowered) == 1 and lowered[0]["requested"] == 2 and lowered[0]["slots"] == 1


def test_diffusers_runtime_probe_and_accepts(sd_dir: Path) -> None:
    from nodes.runtimes.diffusers_images import DiffusersRuntime

    runtime = DiffusersRuntime(threads=1)
    status = runtime.probe()
    assert status.available and status.name == "diffusers" and status.version
    assert runtime.accepts(record("diffusers", sd_dir))
    assert not runtime.accepts(record("llama_cpp", sd_dir))


def test_generate_returns_n_pngs_of_the_requested_size(images) -> None:
    out = images.generate("a lighthouse at dusk", 2, 64, 64, seed=1)
    assert len(out) == 2 and all(png_size(png) == (64, 64) for png in out)
    wide = images.generate("a lighthouse", 1, 96, 64, seed=1, steps=1, negative_prompt="fog")
    assert [png_size(png) for png in wide] == [(96, 64)]
    assert images.capabilities == ["image"] and images.artifact_bytes > 0
    assert images.default_steps == 2  # from the record's "steps" label


def test_generate_is_reproducible_with_a_seed(images) -> None:
    first = images.generate("a red cube", 1, 64, 64, seed=7)
    assert images.generate("a red cube", 1, 64, 64, seed=7) == first
    assert images.generate("a red cube", 1, 64, 64, seed=8) != first


def test_edit_repaints_only_the_transparent_area_of_the_mask(images) -> None:
    from PIL import Image, ImageChops

    source = make_png(64, 64)
    box = (16, 16, 48, 48)
    out = images.edit(source, make_mask_png(64, 64, box), "a hat", 2, seed=3)
    assert len(out) == 2
    original = Image.open(io.BytesIO(source)).convert("RGB")
    edited = Image.open(io.BytesIO(out[0])).convert("RGB")
    assert edited.size == (64, 64)
    changed = ImageChops.difference(original, edited).getbbox()
    assert changed is not None, "the masked area was not repainted"
    assert box[0] <= changed[0] and box[1] <= changed[1] and changed[2] <= box[2] and changed[3] <= box[3]


def test_edit_without_mask_uses_the_image_transparency_or_edits_the_whole_image(images) -> None:
    transparent = make_png(64, 64, transparent_box=(0, 0, 32, 32))
    assert [png_size(p) for p in images.edit(transparent, None, "sky", 1, seed=1)] == [(64, 64)]
    opaque = make_png(64, 64)
    assert [png_size(p) for p in images.edit(opaque, None, "sky", 2, 64, 64, seed=1)] == [(64, 64)] * 2


def test_variation_keeps_the_source_size_unless_told(images) -> None:
    out = images.variation(make_png(96, 64), 2, seed=5)
    assert [png_size(p) for p in out] == [(96, 64), (96, 64)]
    assert [png_size(p) for p in images.variation(make_png(96, 64), 1, 64, 64, seed=5)] == [(64, 64)]


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda e: e.generate("x", 1, 60, 64), "size"),
        (lambda e: e.generate("x", 1, 64, 4096), "size"),
        (lambda e: e.generate("x", 1, 32, 32), "size"),
        (lambda e: e.generate("x", 0, 64, 64), "n"),
        (lambda e: e.generate("x", 11, 64, 64), "n"),
        (lambda e: e.generate("   ", 1, 64, 64), "prompt"),
        (lambda e: e.generate("x", 1, 64, 64, steps=0), "steps"),
        (lambda e: e.generate("x", 1, 64, 64, seed=-1), "seed"),
        (lambda e: e.edit(b"not an image", None, "x", 1), "image"),
        (lambda e: e.edit(b"", None, "x", 1), "image"),
        (lambda e: e.edit(make_png(64, 64), make_mask_png(32, 32, (0, 0, 8, 8)), "x", 1), "mask"),
        (lambda e: e.edit(make_png(64, 64), make_mask_png(64, 64, (0, 0, 0, 0)), "x", 1), "mask"),
        (lambda e: e.edit(make_png(64, 64), b"GIF89a", "x", 1), "mask"),
        (lambda e: e.edit(make_png(64, 64), None, "", 1), "prompt"),
        (lambda e: e.variation(b"\x89PNG\r\n\x1a\n broken", 1), "image"),
        (lambda e: e.variation(make_png(64, 64), 1, 64, None), "size"),
    ],
)
def test_bad_image_requests_are_400_naming_the_parameter(images, call, param) -> None:
    with pytest.raises(EngineError) as info:
        call(images)
    assert info.value.status == 400 and info.value.param == param


def test_a_cancelled_image_request_stops(images) -> None:
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(EngineError) as info:
        images.generate("x", 1, 64, 64, cancelled=cancelled)
    assert info.value.status == 499 and info.value.code == "cancelled"


# =========================================================================== speech to text (faster-whisper)


@pytest.fixture(scope="session")
def whisper_en_dir(whisper_dir: Path) -> Path:
    return build_tiny_whisper(whisper_dir.parent / "tiny-whisper-en", multilingual=False)


@pytest.fixture(scope="session")
def asr(whisper_dir: Path):
    from nodes.runtimes.faster_whisper import FasterWhisperRuntime

    runtime = FasterWhisperRuntime(threads=1)
    engine = runtime.load(record("faster_whisper", whisper_dir, beam_size="1"), str(whisper_dir), slots=2)
    yield engine
    engine.close()


def test_whisper_transcribes_from_several_threads_at_once(asr, speech_wav: bytes) -> None:
    """Two slots are two CTranslate2 workers (the random tiny model samples, so texts vary)."""
    assert asr.slots == 2
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: asr.transcribe(speech_wav, language="en"), range(3)))
    assert all(r.duration == pytest.approx(2.0, abs=0.01) and isinstance(r.text, str) for r in results)


@pytest.fixture(scope="session")
def speech_wav() -> bytes:
    pytest.importorskip("numpy")
    return make_wav(seconds=2.0)


def test_faster_whisper_runtime_probe_and_accepts(whisper_dir: Path) -> None:
    from nodes.runtimes.faster_whisper import FasterWhisperRuntime

    runtime = FasterWhisperRuntime(threads=1)
    status = runtime.probe()
    assert status.available and status.version
    assert runtime.accepts(record("faster_whisper", whisper_dir))
    assert not runtime.accepts(record("piper", whisper_dir))


def test_transcription_returns_text_segments_and_duration(asr, speech_wav: bytes) -> None:
    assert asr.capabilities == ["transcription", "translation"] and asr.compute_type == "int8"
    assert asr.beam_size == 1  # from the record's "beam_size" label
    result = asr.transcribe(speech_wav, language="en", temperature=0.2)
    assert result.task == "transcribe" and result.language == "en"
    assert result.duration == pytest.approx(2.0, abs=0.01)
    assert isinstance(result.text, str) and result.segments and result.words is None
    for i, seg in enumerate(result.segments):
        assert seg.id == i and 0 <= seg.start <= seg.end <= result.duration
        assert seg.tokens and all(isinstance(t, int) for t in seg.tokens)
        assert seg.temperature == pytest.approx(0.2)


def test_language_detection_translation_and_word_timestamps(asr, speech_wav: bytes) -> None:
    from nodes.runtimes.transcript_formats import LANGUAGES

    detected = asr.transcribe(speech_wav, temperature=0.2)
    assert detected.language in LANGUAGES
    translated = asr.transcribe(speech_wav, task="translate", language="german", temperature=0.2)
    assert translated.task == "translate" and translated.language == "de"
    worded = asr.transcribe(speech_wav, language="en", prompt="Hello.", word_timestamps=True, temperature=0.2)
    assert isinstance(worded.words, list)
    assert all(0 <= w.start <= w.end <= worded.duration for w in worded.words)


def test_audio_in_other_containers_is_decoded(asr, speech_wav: bytes) -> None:
    av = pytest.importorskip("av")
    out = io.BytesIO()
    with av.open(io.BytesIO(speech_wav)) as src, av.open(out, "w", format="flac") as dst:
        stream = dst.add_stream("flac", rate=16000, layout="mono")
        for frame in src.decode(audio=0):
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    result = asr.transcribe(out.getvalue(), language="en", temperature=0.2)
    assert result.duration == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"audio": b""}, "file"),
        ({"audio": b"definitely not audio" * 50}, "file"),
        ({"audio": "png"}, "file"),
        ({"language": "xx"}, "language"),
        ({"temperature": 1.5}, "temperature"),
        ({"task": "summarise"}, "task"),
    ],
)
def test_bad_transcription_requests_are_400(asr, speech_wav: bytes, kwargs: dict, param: str) -> None:
    kwargs = dict(kwargs)
    audio = kwargs.pop("audio", speech_wav)
    if audio == "png":
        audio = make_png(16, 16)
    with pytest.raises(EngineError) as info:
        asr.transcribe(audio, **kwargs)
    assert info.value.status == 400 and info.value.param == param


def test_english_only_model_transcribes_but_cannot_translate(whisper_en_dir: Path, speech_wav: bytes) -> None:
    from nodes.runtimes.faster_whisper import FasterWhisperEngine

    engine = FasterWhisperEngine(str(whisper_en_dir), threads=1, beam_size=1)
    try:
        assert engine.capabilities == ["transcription"] and engine.languages == ["en"]
        assert engine.transcribe(speech_wav).language == "en"  # temperature 0: the fallback schedule
        with pytest.raises(EngineError):
            engine.transcribe(speech_wav, task="translate")
        with pytest.raises(EngineError) as info:
            engine.transcribe(speech_wav, language="de")
        assert info.value.param == "language"
    finally:
        engine.close()


def test_a_real_transcript_renders_in_every_format(asr, speech_wav: bytes) -> None:
    from nodes.runtimes.transcript_formats import RESPONSE_FORMATS, render

    result = asr.transcribe(speech_wav, language="en", word_timestamps=True, temperature=0.2)
    verbose = render(result, "verbose_json")
    assert json.loads(json.dumps(verbose))["language"] == "english"
    assert set(verbose) == {"task", "language", "duration", "text", "segments", "words"}
    for fmt in RESPONSE_FORMATS:
        assert render(result, fmt) is not None


# =========================================================================== transcript formats (no engine)


def sample_transcript(task: str = "transcribe", words: bool = False):
    from nodes.runtimes.faster_whisper import Segment, Transcript, Word

    segments = [
        Segment(0, 0, 0.0, 1.5, " Hello there.", [50364, 2425, 456], 0.0, -0.25, 1.1, 0.01),
        Segment(1, 0, 1.5, 3661.042, " General Kenobi!", [3904, 39500], 0.2, -0.5, 1.3, 0.02),
    ]
    return Transcript(
        task=task,
        text="Hello there. General Kenobi!",
        language="de",
        duration=3662.0,
        segments=segments,
        words=[Word(" Hello", 0.0, 0.6, 0.9), Word(" there.", 0.6, 1.5, 0.8)] if words else None,
    )


def test_srt_and_vtt_cues() -> None:
    from nodes.runtimes.transcript_formats import to_srt, to_vtt

    assert to_srt(sample_transcript()) == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:00:01,500 --> 01:01:01,042\nGeneral Kenobi!\n"
    )
    assert to_vtt(sample_transcript()) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n00:00:01.500 --> 01:01:01.042\nGeneral Kenobi!\n"
    )


def test_verbose_json_matches_openai_shape() -> None:
    from nodes.runtimes.transcript_formats import to_json, to_text, to_verbose_json

    body = to_verbose_json(sample_transcript())
    assert list(body) == ["task", "language", "duration", "text", "segments"]  # no words unless asked
    assert body["language"] == "german" and body["duration"] == 3662.0
    assert list(body["segments"][0]) == [
        "id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
        "no_speech_prob",
    ]  # fmt: skip
    with_words = to_verbose_json(sample_transcript("translate", words=True))
    assert with_words["task"] == "translate" and with_words["language"] == "english"
    assert with_words["words"] == [
        {"word": " Hello", "start": 0.0, "end": 0.6},
        {"word": " there.", "start": 0.6, "end": 1.5},
    ]
    assert to_json(sample_transcript()) == {"text": "Hello there. General Kenobi!"}
    assert to_text(sample_transcript()) == "Hello there. General Kenobi!\n"


def test_unknown_transcript_format_is_400() -> None:
    from nodes.runtimes.transcript_formats import render

    with pytest.raises(EngineError) as info:
        render(sample_transcript(), "docx")
    assert info.value.param == "response_format"


# =========================================================================== text to speech (Piper voice)


@pytest.fixture(scope="session")
def tts(voice_path: Path):
    from nodes.runtimes.piper_tts import PiperRuntime

    runtime = PiperRuntime(threads=1)
    engine = runtime.load(record("piper", voice_path), str(voice_path), slots=2)
    yield engine
    engine.close()


def test_piper_speaks_from_several_threads_at_once(tts) -> None:
    """One onnxruntime session serves concurrent runs (InferenceSession.run is thread-safe)."""
    assert tts.slots == 2
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda text: tts.speak(text), ["Hello world.", "Another sentence here.", "Three."]))
    assert all(rate == 22050 and pcm.size > 0 for pcm, rate in results)


def test_piper_runtime_probe_accepts_and_loads_a_folder(voice_path: Path) -> None:
    from nodes.runtimes.piper_tts import PiperRuntime

    runtime = PiperRuntime(threads=1)
    assert runtime.probe().available
    assert runtime.accepts(record("piper", voice_path)) and not runtime.accepts(record("diffusers", voice_path))
    engine = runtime.load(record("piper", voice_path), str(voice_path.parent))
    assert engine.sample_rate == 22050 and engine.capabilities == ["speech"]


def test_speech_is_a_wav_at_the_voice_sample_rate(tts) -> None:
    import numpy as np

    pcm, rate = tts.speak("Hello world. This is a test!")
    assert rate == 22050 and pcm.dtype == np.int16 and pcm.size > 0 and np.abs(pcm).max() > 0
    wav = tts.encode(pcm, rate, "wav")
    with wave.open(io.BytesIO(wav)) as reader:
        assert reader.getframerate() == 22050 and reader.getnchannels() == 1 and reader.getsampwidth() == 2
        assert reader.getnframes() == pcm.size


def test_other_sample_rates_come_from_the_voice_config(voice_path: Path) -> None:
    from nodes.runtimes.piper_tts import PiperEngine

    voice16 = build_tiny_piper_voice(voice_path.parent.parent / "voice16k", sample_rate=16000)
    engine = PiperEngine(str(voice16), threads=1)
    pcm, rate = engine.speak("hi")
    with wave.open(io.BytesIO(engine.encode(pcm, rate, "wav"))) as reader:
        assert reader.getframerate() == 16000


def test_speed_changes_the_length(tts) -> None:
    normal, _ = tts.speak("speed test", speed=1.0)
    fast, _ = tts.speak("speed test", speed=2.0)
    slow, _ = tts.speak("speed test", speed=0.5)
    assert fast.size == pytest.approx(normal.size / 2, rel=0.05)
    assert slow.size == pytest.approx(normal.size * 2, rel=0.05)


def test_pcm_is_24khz_s16le_and_compressed_formats_decode(tts) -> None:
    pcm, rate = tts.speak("format test")
    raw = tts.encode(pcm, rate, "pcm")
    assert len(raw) == 2 * round(pcm.size * 24000 / rate)
    assert "wav" in tts.formats and "pcm" in tts.formats
    compressed = [f for f in ("mp3", "opus", "aac", "flac") if f in tts.formats]
    if not compressed:
        pytest.skip("PyAV with audio encoders is not installed")
    av = pytest.importorskip("av")
    for fmt in compressed:
        data = tts.encode(pcm, rate, fmt)
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            samples = sum(frame.samples for frame in container.decode(stream))
            assert samples / stream.rate == pytest.approx(pcm.size / rate, abs=0.1), fmt


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda e: e.speak(""), "input"),
        (lambda e: e.speak("  \n "), "input"),
        (lambda e: e.speak("a" * 4097), "input"),
        (lambda e: e.speak("hi", speed=0.2), "speed"),
        (lambda e: e.speak("hi", speed=4.5), "speed"),
        (lambda e: e.encode(e.speak("hi")[0], 22050, "ogg_vorbis"), "response_format"),
    ],
)
def test_bad_speech_requests_are_400(tts, call, param) -> None:
    with pytest.raises(EngineError) as info:
        call(tts)
    assert info.value.status == 400 and info.value.param == param
    if param == "response_format":
        assert "wav" in str(info.value)  # names what is available


def test_espeak_voice_with_speakers(voice_path: Path) -> None:
    pytest.importorskip("piper.phonemize_espeak")
    from nodes.runtimes.piper_tts import PiperEngine

    onnx = build_tiny_piper_voice(voice_path.parent.parent / "espeak-voice", phoneme_type="espeak", num_speakers=2)
    engine = PiperEngine(str(onnx), threads=1)
    first, rate = engine.speak("Hello world. Second sentence!", voice="speaker0")
    second, _ = engine.speak("Hello world. Second sentence!", voice="speaker1")
    assert rate == 22050 and first.size == second.size and (first != second).any()
    assert engine.speak("Hello world.", voice="alloy")[0].size > 0  # OpenAI voice names: default speaker


# =========================================================================== load failures


def test_broken_artifacts_fail_to_load_with_a_clear_error(
    sd_dir: Path, whisper_dir: Path, voice_path: Path, tmp_path: Path
) -> None:
    from nodes.runtimes.diffusers_images import DiffusersEngine
    from nodes.runtimes.faster_whisper import FasterWhisperEngine
    from nodes.runtimes.piper_tts import PiperEngine

    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text((sd_dir / "model_index.json").read_text())
    with pytest.raises(RuntimeError, match="diffusers could not load"):
        DiffusersEngine(str(tmp_path / "sd"), threads=1)
    (tmp_path / "whisper").mkdir()
    for name in ("config.json", "vocabulary.json", "tokenizer.json"):
        (tmp_path / "whisper" / name).write_bytes((whisper_dir / name).read_bytes())
    (tmp_path / "whisper" / "model.bin").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="faster-whisper could not load"):
        FasterWhisperEngine(str(tmp_path / "whisper"), threads=1)
    with pytest.raises(RuntimeError, match="no CTranslate2 Whisper model folder"):
        FasterWhisperEngine(str(tmp_path / "missing"), threads=1)
    (tmp_path / "v.onnx").write_bytes(b"garbage")
    (tmp_path / "v.onnx.json").write_text(Path(f"{voice_path}.json").read_text())
    with pytest.raises(RuntimeError, match="onnxruntime could not load"):
        PiperEngine(str(tmp_path / "v.onnx"), threads=1)
    (tmp_path / "v.onnx.json").write_text("{}")
    with pytest.raises(RuntimeError, match="not a Piper voice config"):
        PiperEngine(str(tmp_path / "v.onnx"), threads=1)


# =========================================================================== artifact detection


def test_detect_recognises_each_multimodal_kind(sd_dir: Path, whisper_dir: Path, voice_path: Path) -> None:
    sd = detect(sd_dir)
    assert (sd.format, sd.runtime, sd.capabilities) == ("diffusers", "diffusers", ["image"])
    whisper = detect(whisper_dir)
    assert (whisper.format, whisper.runtime) == ("ctranslate2", "faster_whisper")
    assert whisper.capabilities == ["transcription", "translation"]
    for path in (voice_path, voice_path.parent):
        voice = detect(path)
        assert (voice.format, voice.runtime, voice.capabilities) == ("piper", "piper", ["speech"])
    assert artifact_size(sd_dir) > 1_000_000 and artifact_size(voice_path) > voice_path.stat().st_size


def test_detect_english_only_whisper_has_no_translation(whisper_en_dir: Path) -> None:
    assert detect(whisper_en_dir).capabilities == ["transcription"]


def test_detect_still_recognises_gguf(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from nodes.demo_model import write_tiny_gguf

    assert detect(write_tiny_gguf(tmp_path / "tiny.gguf")).runtime == "llama_cpp"


def test_detect_rejects_what_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnrecognisedModel, match="unrecognised model folder.*diffusers pipeline.*Whisper.*Piper"):
        detect(tmp_path)
    with pytest.raises(UnrecognisedModel, match="unrecognised model file"):
        detect(tmp_path / "notes.txt")
    with pytest.raises(UnrecognisedModel, match="no such file"):
        detect(tmp_path / "missing.gguf")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(b"\x08\x07")
    with pytest.raises(UnrecognisedModel, match=r"lonely\.onnx\.json"):
        detect(lonely)
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes(b"x")
    (ct2 / "config.json").write_text(json.dumps({"add_source_bos": False}))
    with pytest.raises(UnrecognisedModel, match="not Whisper"):
        detect(ct2)


def test_detect_refuses_a_folder_with_two_voices(voice_path: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.onnx").write_bytes(voice_path.read_bytes())
        (tmp_path / f"{name}.onnx.json").write_text(Path(f"{voice_path}.json").read_text())
    with pytest.raises(UnrecognisedModel, match="2 Piper voices"):
        detect(tmp_path)
