"""formats.gguf, the plain-Python GGUF header reader, against files the ``gguf`` library wrote
and reads: the registry host has no ``gguf`` package, so the two must agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from formats import gguf as header

gguf = pytest.importorskip("gguf")


def _library_values(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own pseudo-fields (version, counts)
            continue
        value = field.contents()
        out[key] = value.decode() if isinstance(value, bytes) else value
    return out


def _every_type(path: Path, endian) -> Path:
    writer = gguf.GGUFWriter(str(path), "testarch", endianess=endian)
    writer.add_context_length(4096)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 0.5)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 0.25)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.strs", ["a", "bc", ""])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_every_value_type_reads_as_the_library_reads_it(tmp_path: Path, endian: str) -> None:
    path = _every_type(tmp_path / f"{endian}.gguf", getattr(gguf.GGUFEndian, endian))
    ours = dict(header.metadata(path))
    assert ours == _library_values(path)
    assert ours["t.str"] == "héllo" and ours["t.strs"] == ["a", "bc", ""]
    assert header.architecture(path) == "testarch"
    assert header.context_length(path) == 4096


def test_the_demo_model_and_a_projector(tiny_gguf: Path, tmp_path: Path) -> None:
    from tiny_models import build_tiny_mmproj

    assert dict(header.metadata(tiny_gguf)) == _library_values(tiny_gguf)
    assert header.architecture(tiny_gguf) == "llama"
    assert header.context_length(tiny_gguf) == 512
    projector = build_tiny_mmproj(tmp_path / "mmproj.gguf")
    assert header.architecture(projector) == header.PROJECTOR_ARCH
    assert header.context_length(projector) == 0  # a projector has no text context


def test_truncated_or_foreign_files_read_as_unknown(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:40])  # inside the first key
    other = tmp_path / "other.bin"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    for path in (cut, other, tmp_path / "missing.gguf"):
        assert header.architecture(path) is None
        assert header.context_length(path) == 0
    with pytest.raises(header.GgufError):
        dict(header.metadata(cut))
