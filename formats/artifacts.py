"""Recognising a model artifact on disk: its format, runtime and capabilities.

A model is a file (GGUF; a Piper voice's .onnx with its .onnx.json beside it) or a folder
(a diffusers pipeline, a CTranslate2 Whisper model, a folder with one Piper voice). Contents
decide, not names: magic bytes for files, the marker files and their JSON for folders. The
format and runtime names are the ones the curated catalog uses (``supported_models.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from events import subjects

from . import exl2, gguf

ACCEPTED = (
    "a GGUF file, a Piper voice (.onnx with its .onnx.json beside it), or a folder holding a diffusers "
    "pipeline (model_index.json), a CTranslate2 Whisper model (model.bin, config.json, vocabulary), "
    "an EXL2 model (config.json, *.safetensors quantised by exllamav2) or one Piper voice"
)
# CTranslate2 writes these into a Whisper model's config.json (and not into its other models').
WHISPER_CONFIG_KEYS = ("alignment_heads", "lang_ids", "suppress_ids_begin")


class UnrecognisedModel(ValueError):
    pass


@dataclass(frozen=True)
class ArtifactKind:
    format: str
    runtime: str
    capabilities: list[str]


GGUF = ArtifactKind("gguf", "llama_cpp", [subjects.CHAT, subjects.COMPLETION, subjects.EMBEDDING])
DIFFUSERS = ArtifactKind("diffusers", "diffusers", [subjects.IMAGE])
PIPER = ArtifactKind("piper", "piper", [subjects.SPEECH])
EXL2 = ArtifactKind("exl2", "exllamav2", [subjects.CHAT, subjects.COMPLETION])


def detect(path: Path) -> ArtifactKind:
    """Recognise a model file or folder; raise UnrecognisedModel saying why and what is accepted."""
    path = Path(path)
    if not path.exists():
        raise UnrecognisedModel(f"no such file: {path}")
    if path.is_dir():
        return _detect_dir(path)
    if not path.is_file():
        raise UnrecognisedModel(f"not a model file: {path} (expected {ACCEPTED})")
    if path.stat().st_size == 0:
        raise UnrecognisedModel(f"empty file: {path}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == gguf.MAGIC:
        if gguf.architecture(path) == gguf.PROJECTOR_ARCH:
            raise UnrecognisedModel(
                f"{path} is a multimodal projector (mmproj), not a model: register the language model GGUF "
                "(with this file beside it, or named as its projector)"
            )
        return GGUF
    if path.suffix == ".onnx":
        config = Path(f"{path}.json")
        if not config.is_file():
            raise UnrecognisedModel(
                f"unrecognised model file: {path} (an ONNX file; a Piper voice also needs {config.name} beside it)"
            )
        _check_piper_config(config)
        return PIPER
    raise UnrecognisedModel(f"unrecognised model file: {path} (expected a GGUF file or a Piper voice .onnx)")


def find_projector(model: Path, explicit: str | None = None) -> Path | None:
    """The mmproj GGUF of a GGUF model: ``explicit`` when given, else the one ``mmproj*.gguf``
    beside the model (llama.cpp's and LM Studio's layout). Raises UnrecognisedModel when the
    named file is not a projector, or several candidates make the choice ambiguous."""
    if explicit:
        candidate = Path(explicit).expanduser().resolve()
        if not candidate.is_file() or gguf.architecture(candidate) != gguf.PROJECTOR_ARCH:
            raise UnrecognisedModel(f"{candidate} is not a multimodal projector GGUF (general.architecture 'clip')")
        return candidate
    found = sorted(p for p in Path(model).parent.glob("mmproj*.gguf") if gguf.architecture(p) == gguf.PROJECTOR_ARCH)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UnrecognisedModel(f"{Path(model).parent} holds several projectors ({names}); name one with projector")
    return found[0] if found else None


def artifact_size(path: Path) -> int:
    """Bytes of a model: the file, plus a Piper voice's config; or every file under a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    size = path.stat().st_size
    config = Path(f"{path}.json")
    if path.suffix == ".onnx" and config.is_file():
        size += config.stat().st_size
    return size


def _detect_dir(path: Path) -> ArtifactKind:
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        if not isinstance(index, dict) or "_class_name" not in index:
            raise UnrecognisedModel(f"{path / 'model_index.json'} is not a diffusers pipeline index (no _class_name)")
        return DIFFUSERS
    if (path / "model.bin").is_file() and (path / "config.json").is_file():
        return _detect_ctranslate2(path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return _detect_safetensors(path)
    voices = sorted(p for p in path.glob("*.onnx") if Path(f"{p}.json").is_file())
    if len(voices) == 1:
        _check_piper_config(Path(f"{voices[0]}.json"))
        return PIPER
    if len(voices) > 1:
        names = ", ".join(v.name for v in voices)
        raise UnrecognisedModel(f"{path} holds {len(voices)} Piper voices ({names}); register one .onnx file")
    raise UnrecognisedModel(f"unrecognised model folder: {path} (expected {ACCEPTED})")


def _detect_ctranslate2(path: Path) -> ArtifactKind:
    config = _read_json(path / "config.json")
    if not isinstance(config, dict) or not any(key in config for key in WHISPER_CONFIG_KEYS):
        raise UnrecognisedModel(f"{path} is a CTranslate2 model but not Whisper; only Whisper models are served")
    vocabulary = _whisper_vocabulary(path)
    if vocabulary is None:
        if not (path / "tokenizer.json").is_file():
            raise UnrecognisedModel(f"{path}: a CTranslate2 Whisper model needs vocabulary.json or vocabulary.txt")
        multilingual = bool(config.get("lang_ids"))
    else:
        # CTranslate2's own test: a multilingual Whisper vocabulary holds the empty-string token.
        multilingual = "" in vocabulary
    capabilities = [subjects.TRANSCRIPTION] + ([subjects.TRANSLATION] if multilingual else [])
    return ArtifactKind("ctranslate2", "faster_whisper", capabilities)


def _detect_safetensors(path: Path) -> ArtifactKind:
    """A transformers-style folder: EXL2 when exllamav2 quantised it, refused otherwise."""
    if exl2.is_exl2(path):
        if not any((path / name).is_file() for name in exl2.TOKENIZER_FILES):
            raise UnrecognisedModel(f"{path}: an EXL2 model needs its tokenizer ({' or '.join(exl2.TOKENIZER_FILES)})")
        return EXL2
    raise UnrecognisedModel(
        f"{path} holds safetensors weights that are not EXL2 (no exllamav2 quantization_config, no EXL2 tensors): "
        "convert them to GGUF (llama.cpp) or EXL2 (exllamav2) first"
    )


def _whisper_vocabulary(path: Path) -> list[str] | None:
    if (path / "vocabulary.json").is_file():
        tokens = _read_json(path / "vocabulary.json")
        if not isinstance(tokens, list):
            raise UnrecognisedModel(f"{path / 'vocabulary.json'} is not a list of tokens")
        return tokens
    if (path / "vocabulary.txt").is_file():
        text = (path / "vocabulary.txt").read_text(encoding="utf-8")
        lines = text.split("\n")  # one token per line; an empty line is the empty-string token
        return lines[:-1] if text.endswith("\n") else lines
    return None


def _check_piper_config(config: Path) -> None:
    raw = _read_json(config)
    missing = [k for k in ("audio", "phoneme_id_map", "num_symbols") if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise UnrecognisedModel(f"{config} is not a Piper voice config (missing {', '.join(missing)})")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UnrecognisedModel(f"cannot read {path}: {exc}") from None
