"""Registering local models of every kind by path, and nodes serving them in place."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from events.messages import RegisterModel
from formats.artifacts import artifact_size
from nodes import cache
from registry.sources import RegistrationError, from_path, model_roots


@pytest.fixture(scope="module")
def session_root(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The session's temporary files as the only models root: where every fixture's model lies."""
    return model_roots([tmp_path_factory.getbasetemp()])


@pytest.mark.parametrize(
    "fixture, name, runtime, capabilities",
    [
        ("sd_dir", "tiny-sd", "diffusers", ["image"]),
        ("whisper_dir", "tiny-whisper", "faster_whisper", ["transcription", "translation"]),
        ("voice_path", "voice", "piper", ["speech"]),
    ],
)
def test_a_folder_or_voice_registers_with_its_total_size_and_is_served_in_place(
    request, session_root, fixture, name, runtime, capabilities
) -> None:
    path: Path = request.getfixturevalue(fixture)
    record = from_path(RegisterModel(path=str(path)), session_root)
    assert (record.name, record.runtime, record.capabilities) == (name, runtime, capabilities)
    assert record.size_bytes == artifact_size(path) > 0
    assert record.source.kind == "path" and record.source.path == str(path.resolve())
    assert cache.problem(path, record) is None
    assert "expected" in cache.problem(path, msgspec.structs.replace(record, size_bytes=1))


def test_a_gguf_with_a_projector_beside_it_offers_vision(tiny_gguf: Path, tmp_path: Path, session_root) -> None:
    pytest.importorskip("gguf")
    from tiny_models import build_tiny_mmproj

    model = tmp_path / "chat.gguf"
    model.write_bytes(tiny_gguf.read_bytes())
    plain = from_path(RegisterModel(path=str(model)), session_root)
    assert "vision" not in plain.capabilities and plain.source.projector is None
    projector = build_tiny_mmproj(tmp_path / "mmproj-chat.gguf")
    record = from_path(RegisterModel(path=str(model)), session_root)
    assert record.capabilities[-1] == "vision" and record.source.projector == str(projector)
    with pytest.raises(RegistrationError) as err:  # the projector alone is not a model
        from_path(RegisterModel(path=str(projector)), session_root)
    assert "multimodal projector" in err.value.message
    with pytest.raises(RegistrationError):
        from_path(RegisterModel(path=str(model), projector=str(model)), session_root)  # not a projector


def test_an_unrecognised_folder_is_a_clear_422(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RegistrationError) as err:
        from_path(RegisterModel(path=str(tmp_path)), model_roots([tmp_path]))
    assert err.value.status == 422 and "unrecognised model folder" in err.value.message
