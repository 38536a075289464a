"""Turning a registration request into a model record: catalog id, Hugging Face repo/URL, or path.

Registration stores metadata only; nodes fetch the files. Naming rule for models registered
from Hugging Face (documented in the README):

- a GGUF variant: ``<org>/<repo>:<QUANT>`` (``bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M``),
  or ``<org>/<repo>:<file stem>`` when the file name has no quantisation in it;
- a repository without GGUF files (safetensors): ``<org>/<repo>``, state ``pending_conversion``;
- a catalog entry: its catalog id (``qwen2.5-0.5b-instruct``);
- a local file: its file stem (a Piper voice ``en-amy.onnx``: ``en-amy``); a local folder
  (diffusers pipeline, CTranslate2 Whisper): its name.

``name`` in the request overrides all of these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from events import subjects
from events.messages import CatalogEntry, ModelFile, ModelRecord, ModelSource, RegisterModel
from formats import exl2
from formats.artifacts import UnrecognisedModel, artifact_size, detect, find_projector

from .hf import (
    PREFERRED_QUANT,
    HfNotFound,
    HfUnavailable,
    HuggingFace,
    RepoListing,
    is_projector,
    parse_quantization,
    parse_reference,
    split_parts,
)

# Memory a model needs beyond its file (KV cache, buffers), when nobody measured it.
MEMORY_FACTOR = 1.5
EMBEDDING_PIPELINES = {"feature-extraction", "sentence-similarity"}
CHAT_CAPABILITIES = [subjects.CHAT, subjects.COMPLETION]


class RegistrationError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def estimated_memory(size_bytes: int) -> int:
    return math.ceil(size_bytes * MEMORY_FACTOR)


def chosen_source(request: RegisterModel) -> str:
    given = [k for k in ("catalog_id", "repo", "url", "path") if getattr(request, k)]
    if len(given) != 1:
        raise RegistrationError(
            400, "give exactly one of catalog_id, repo, url or path" + (f" (got {', '.join(given)})" if given else "")
        )
    if request.projector and given[0] != "path":
        raise RegistrationError(400, "projector goes with path (a local GGUF and its mmproj)")
    if request.filename and given[0] not in ("repo",):
        raise RegistrationError(400, "filename goes with repo (a URL names its file itself)")
    return given[0]


async def from_catalog(request: RegisterModel, catalog: dict[str, CatalogEntry], hf: HuggingFace) -> ModelRecord:
    """A GGUF entry is one file and needs no lookup; a folder model or a voice is listed on the
    Hub, so that nodes know every file it needs, with exact sizes and digests."""
    entry = catalog.get(request.catalog_id or "")
    if entry is None:
        raise RegistrationError(404, f"no catalog entry {request.catalog_id!r} (GET /v0/models/hub lists them)")
    files: list[ModelFile] = []
    size, revision = entry.size_bytes, request.revision or entry.revision
    if entry.format != "gguf":
        listing = await _listing(entry.repo, revision, hf)
        if entry.recommended_filename not in listing.files:
            raise RegistrationError(404, f"file {entry.recommended_filename!r} not found in repository {entry.repo!r}")
        files = model_files(entry.format, listing, entry.recommended_filename)
        size, revision = sum(f.size for f in files) or size, listing.revision
    return ModelRecord(
        name=request.name or entry.id,
        format=entry.format,
        runtime=entry.engine,
        capabilities=list(entry.capabilities),
        source=ModelSource(
            kind="hf", repo=entry.repo, filename=entry.recommended_filename, revision=revision, files=files
        ),
        size_bytes=size,
        required_memory_bytes=entry.required_memory_bytes,
        quantization=entry.quantization,
        catalog_id=entry.id,
        description=request.description or entry.description,
        tags=list(entry.tags),
        labels=dict(request.labels),
    )


def confined(path: str, roots: Sequence[Path], *, what: str = "path") -> Path:
    """``path`` resolved (symlinks and ``..``), or a 400 unless it lies under one of ``roots``
    (``--model-root``): registering a path must not let anyone point nodes at any file of the host.
    Checked before the path is looked at, so a refusal says nothing about what exists there."""
    resolved = Path(path).expanduser().resolve()
    if not roots:
        raise RegistrationError(
            400,
            "registering a local path is off: this registry has no models root "
            "(start it with --model-root DIR, or set LLM_ROUTER_MODEL_ROOTS)",
        )
    if not any(resolved.is_relative_to(root) for root in roots):
        leads = "" if str(resolved) == str(Path(path).expanduser().absolute()) else f" (from {path})"
        names = ", ".join(str(root) for root in roots)
        raise RegistrationError(400, f"{what} {resolved}{leads} is outside this registry's models roots ({names})")
    return resolved


def model_roots(roots: Iterable[str | Path]) -> list[Path]:
    """Models roots as they are compared: absolute, symlinks resolved."""
    return list(dict.fromkeys(Path(root).expanduser().resolve() for root in roots if str(root)))


def from_path(request: RegisterModel, roots: Sequence[Path]) -> ModelRecord:
    """``roots``: the resolved models roots (:func:`model_roots`); the model, its projector and,
    for a folder, every file in it must lie under one."""
    path = confined(request.path or "", roots)
    try:
        kind = detect(path)
    except UnrecognisedModel as exc:
        raise RegistrationError(422, str(exc)) from None
    if path.is_dir():
        for inside in path.rglob("*"):  # a symlink in the folder leads its reader elsewhere
            confined(str(inside), roots, what="a file of the model folder,")
    capabilities = list(kind.capabilities)
    projector = None
    if kind.format == "gguf":
        explicit = str(confined(request.projector, roots, what="projector")) if request.projector else None
        try:
            projector = find_projector(path, explicit)
        except UnrecognisedModel as exc:
            raise RegistrationError(422, str(exc)) from None
        if projector is not None:
            confined(str(projector), roots, what="projector")  # a mmproj beside it may be a symlink
            capabilities.append(subjects.VISION)
    elif request.projector:
        raise RegistrationError(400, "projector goes with a GGUF model")
    size = artifact_size(path)  # a folder's total; a Piper voice with its .onnx.json
    # A folder keeps its whole name (``whisper-small.en``); a file drops its extension.
    return ModelRecord(
        name=request.name or (path.name if path.is_dir() else path.stem),
        format=kind.format,
        runtime=kind.runtime,
        capabilities=capabilities,
        source=ModelSource(kind="path", path=str(path), projector=str(projector) if projector else None),
        size_bytes=size,
        required_memory_bytes=estimated_memory(size),
        quantization=_path_quantization(path, kind.format),
        description=request.description,
        labels=dict(request.labels),
    )


def _path_quantization(path: Path, format: str) -> str | None:
    if format == "gguf":
        return parse_quantization(path.name)
    if format == "exl2":
        return exl2.bits_label(exl2.read_config(path))
    return None


async def from_hugging_face(request: RegisterModel, hf: HuggingFace) -> ModelRecord:
    try:
        repo, revision, selector = parse_reference(request.url or request.repo or "")
    except ValueError as exc:
        raise RegistrationError(400, str(exc)) from None
    revision = request.revision or revision
    filename = request.filename or (selector if selector and not selector.startswith(":") else None)
    quant = selector[1:].upper() if selector and selector.startswith(":") else None
    if quant and EXL2_BRANCH.fullmatch(quant) and not revision:  # org/repo:4.0bpw: an EXL2 repo's branch
        revision, quant = selector[1:], None  # type: ignore[index]
    listing = await _listing(repo, revision, hf)
    ggufs = listing.gguf_files()
    folder = _folder_model(listing, filename) if not ggufs or (filename and not filename.endswith(".gguf")) else None
    if folder is not None:
        return _multi_file_record(request, listing, *folder)
    if filename is None:
        if not ggufs:
            if listing.has_safetensors():
                config = await _exl2_config(listing, hf)
                if config is not None:
                    return _exl2_record(request, listing, config)
                return _pending_conversion(request, listing)
            raise RegistrationError(422, f"repository {repo!r} has no GGUF or safetensors files")
        filename = _pick_variant(listing, ggufs, quant)
    if filename not in listing.files:
        there = f"GGUF files there: {', '.join(ggufs)}" if ggufs else "it has no GGUF files"
        raise RegistrationError(404, f"file {filename!r} not found in repository {repo!r} ({there})")
    if not filename.endswith(".gguf"):
        if filename.endswith((".safetensors", ".safetensors.index.json")):
            return _pending_conversion(request, listing)
        raise RegistrationError(422, f"file {filename!r} in {repo!r} is neither GGUF nor safetensors")

    parts = split_parts(listing, filename)
    missing = [p for p in parts if p not in listing.files]
    if missing:
        raise RegistrationError(422, f"split GGUF {filename!r} in {repo!r} is incomplete: missing {', '.join(missing)}")
    projector = _projector(listing)
    files = model_files("gguf", listing, filename) if len(parts) > 1 or projector else []
    capabilities = _capabilities(listing)
    if projector is not None:  # llama.cpp's vision layout: the projector beside the model
        files.append(
            ModelFile(path=projector, size=listing.files[projector].size, sha256=listing.files[projector].sha256)
        )
        if subjects.CHAT in capabilities:
            capabilities.append(subjects.VISION)
    size = sum(f.size for f in files) or sum(listing.files[p].size for p in parts)
    quantization = parse_quantization(filename)
    default_name = f"{listing.repo}:{quantization or Path(filename).name.removesuffix('.gguf')}"
    return ModelRecord(
        name=request.name or default_name,
        format="gguf",
        runtime="llama_cpp",
        capabilities=capabilities,
        source=ModelSource(
            kind="hf", repo=listing.repo, filename=filename, revision=listing.revision, files=files, projector=projector
        ),
        size_bytes=size,
        required_memory_bytes=estimated_memory(size),
        sha256=listing.files[filename].sha256 if len(parts) == 1 else None,
        quantization=quantization,
        description=request.description,
        tags=["gguf"],
        labels=dict(request.labels),
    )


async def _listing(repo: str, revision: str | None, hf: HuggingFace) -> RepoListing:
    try:
        return await hf.repo(repo, revision)
    except HfNotFound as exc:
        raise RegistrationError(404, str(exc)) from None
    except HfUnavailable as exc:
        raise RegistrationError(503, f"{exc}; retry when Hugging Face is reachable") from None


# ---------------------------------------------------------------- models of several files

EXL2_BRANCH = re.compile(r"\d+(\.\d+)?BPW(_H\d+)?", re.IGNORECASE)  # turboderp's branch names: 4.0bpw, 6.5bpw_h8


async def _exl2_config(listing: RepoListing, hf: HuggingFace) -> dict | None:
    """The config.json of a safetensors repository when exllamav2 quantised it (else None)."""
    if "config.json" not in listing.files:
        return None
    try:
        config = await hf.json_file(listing.repo, listing.revision, "config.json")
    except HfNotFound:
        return None
    except HfUnavailable as exc:
        raise RegistrationError(503, f"{exc}; retry when Hugging Face is reachable") from None
    return config if exl2.quantization_config(config) is not None else None


def _exl2_record(request: RegisterModel, listing: RepoListing, config: dict) -> ModelRecord:
    """An EXL2 folder: every file at the repository's top level but its docs (weights, config, tokenizer)."""
    files = model_files("exl2", listing, "config.json")
    size = sum(f.size for f in files)
    bits = exl2.bits_label(config)
    return ModelRecord(
        name=request.name or (f"{listing.repo}:{bits}" if bits else listing.repo),
        format="exl2",
        runtime="exllamav2",
        capabilities=list(CHAT_CAPABILITIES),
        source=ModelSource(
            kind="hf", repo=listing.repo, filename="config.json", revision=listing.revision, files=files
        ),
        size_bytes=size,
        required_memory_bytes=estimated_memory(size),
        quantization=bits,
        description=request.description,
        tags=["exl2"],
        labels=dict(request.labels),
    )


FOLDER_KINDS = {  # format: (runtime, capabilities)
    "diffusers": ("diffusers", [subjects.IMAGE]),
    "ctranslate2": ("faster_whisper", [subjects.TRANSCRIPTION, subjects.TRANSLATION]),
    "piper": ("piper", [subjects.SPEECH]),
}
_DOCS = (".md", ".gitattributes", ".gitignore")


def _folder_model(listing: RepoListing, filename: str | None) -> tuple[str, str] | None:
    """(format, entry file) of a repository holding a model runtimes load as several files."""
    files = listing.files
    if filename and filename.endswith(".onnx") and filename + ".json" in files:
        return "piper", filename
    if filename is None and "model_index.json" in files:
        return "diffusers", "model_index.json"
    if (
        filename is None
        and {"model.bin", "config.json"} <= set(files)
        and any(name.startswith("vocabulary.") or name == "tokenizer.json" for name in files)
    ):
        return "ctranslate2", "model.bin"
    return None


def model_files(format: str, listing: RepoListing, entry: str) -> list[ModelFile]:
    """Every file a node needs for the model whose runtime loads ``entry`` (or its folder)."""

    def file(name: str, local: str | None = None) -> ModelFile:
        info = listing.files[name]
        return ModelFile(path=name, size=info.size, sha256=info.sha256, local=local)

    if format == "gguf":
        return [file(part) for part in split_parts(listing, entry)]
    if format == "piper":
        return [file(entry), file(entry + ".json")]
    if format in ("ctranslate2", "exl2"):
        folder = str(PurePosixPath(entry).parent)
        return [
            file(n)
            for n in sorted(listing.files)
            if str(PurePosixPath(n).parent) == folder
            and not n.endswith(_DOCS)
            and not PurePosixPath(n).name.startswith(".")
        ]
    if format == "diffusers":
        return [file(entry)] + _pipeline_components(listing, file)
    return [file(entry)]


def _pipeline_components(listing: RepoListing, file) -> list[ModelFile]:
    """Per component folder: its configs, and one set of weights, safetensors first, fp16 when
    offered (stored under the plain name, so the pipeline loads without a variant)."""
    chosen: list[ModelFile] = []
    folders = sorted({PurePosixPath(n).parts[0] for n in listing.files if len(PurePosixPath(n).parts) == 2})
    for folder in folders:
        names = sorted(n for n in listing.files if PurePosixPath(n).parent == PurePosixPath(folder))
        chosen += [file(n) for n in names if n.endswith((".json", ".txt"))]
        for suffix in (".safetensors", ".bin"):
            fp16 = [n for n in names if n.endswith(".fp16" + suffix)]
            plain = [
                n
                for n in names
                if n.endswith(suffix) and ".fp16." not in n and "." not in PurePosixPath(n).name[: -len(suffix)]
            ]
            if fp16 or plain:
                chosen += (
                    [file(n, n.replace(".fp16" + suffix, suffix)) for n in fp16] if fp16 else [file(n) for n in plain]
                )
                break
    return chosen


def _multi_file_record(request: RegisterModel, listing: RepoListing, format: str, entry: str) -> ModelRecord:
    files = model_files(format, listing, entry)
    size = sum(f.size for f in files)
    runtime, capabilities = FOLDER_KINDS[format]
    default_name = (
        f"{listing.repo}:{PurePosixPath(entry).name.removesuffix('.onnx')}" if format == "piper" else listing.repo
    )
    return ModelRecord(
        name=request.name or default_name,
        format=format,
        runtime=runtime,
        capabilities=list(capabilities),
        source=ModelSource(kind="hf", repo=listing.repo, filename=entry, revision=listing.revision, files=files),
        size_bytes=size,
        required_memory_bytes=estimated_memory(size),
        description=request.description,
        tags=[format],
        labels=dict(request.labels),
    )


def _projector(listing: RepoListing) -> str | None:
    """The repository's multimodal projector GGUF: the only one, or its f16 among several."""
    projectors = sorted(n for n in listing.files if n.endswith(".gguf") and is_projector(n))
    if len(projectors) > 1:
        projectors = [n for n in projectors if "f16" in n.lower() and "bf16" not in n.lower()]
    return projectors[0] if len(projectors) == 1 else None


def _pick_variant(listing: RepoListing, ggufs: list[str], quant: str | None) -> str:
    firsts = [f for f in ggufs if f == split_parts(listing, f)[0]]
    if quant:
        matching = [f for f in firsts if parse_quantization(f) == quant]
        if not matching:
            offered = sorted({q for f in firsts if (q := parse_quantization(f))})
            raise RegistrationError(
                404,
                f"no {quant} GGUF in repository {listing.repo!r} (quantisations there: {', '.join(offered) or 'none'})",
            )
        return matching[0]
    if len(firsts) == 1:
        return firsts[0]
    preferred = [f for f in firsts if parse_quantization(f) == PREFERRED_QUANT]
    if preferred:
        return preferred[0]
    raise RegistrationError(
        422, f"repository {listing.repo!r} has {len(firsts)} GGUF files; choose one with filename: {', '.join(firsts)}"
    )


def _capabilities(listing: RepoListing) -> list[str]:
    if listing.pipeline_tag in EMBEDDING_PIPELINES or "sentence-transformers" in listing.tags:
        return [subjects.EMBEDDING]
    return list(CHAT_CAPABILITIES)


def _pending_conversion(request: RegisterModel, listing: RepoListing) -> ModelRecord:
    """Weights no runtime here reads yet: registered, never distributed, until converted."""
    weights = [f for f in listing.files.values() if f.name.endswith(".safetensors")]
    size = sum(f.size for f in weights)
    return ModelRecord(
        name=request.name or listing.repo,
        format="safetensors",
        runtime="none",
        capabilities=_capabilities(listing),
        source=ModelSource(kind="hf", repo=listing.repo, filename=request.filename, revision=listing.revision),
        state="pending_conversion",
        size_bytes=size,
        required_memory_bytes=estimated_memory(size),
        description=request.description,
        tags=["safetensors"],
        labels=dict(request.labels),
    )
