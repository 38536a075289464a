"""The model registry end to end: catalogs, registration, lifecycle, deletion, over real NATS
and the real huggingface_hub client talking to a local fake of the Hub (``HF_ENDPOINT``)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import pytest
from conftest import Stack, requires_llama, wait_until
from fake_hf import FakeHub

from events import codec, encode_token, storage, subjects
from events.messages import DownloadProgress, LoadedModel, NodeGoodbye, NodeHeartbeat
from nodes import cache
from registry.catalog import DEFAULT_PATH, CatalogError, load_catalog
from registry.hf import parse_quantization, parse_reference

pytestmark = pytest.mark.e2e

GB = 10**9
CATALOG_PAGE_REPOS = 120  # GGUF repos in the fake Hub: three pages of 50


@pytest.fixture(scope="module")
def hub(tiny_gguf: Path):
    hub = FakeHub()
    for i in range(CATALOG_PAGE_REPOS):
        hub.add_repo(
            f"fakeorg/model-{i:03d}-GGUF",
            {f"model-{i:03d}-Q4_K_M.gguf": 4 * GB + i, f"model-{i:03d}-Q8_0.gguf": 8 * GB + i, "README.md": b"# model"},
            downloads=10_000 - i,
            likes=i,
        )
    hub.add_repo("tests/Tiny-GGUF", {"tiny-q8_0.gguf": tiny_gguf.read_bytes(), "tiny-f16.gguf": 123_456})
    hub.add_repo("tests/Split-GGUF", {f"big-Q4_K_M-0000{i}-of-00003.gguf": 2 * GB for i in (1, 2, 3)})
    hub.add_repo("tests/Huge-GGUF", {"huge-Q8_0.gguf": 60 * GB})
    hub.add_repo(
        "tests/Safetensors-Only",
        {"model.safetensors": 5 * GB, "config.json": b"{}", "tokenizer.json": b"{}"},
        extra={"pipeline_tag": "text-generation"},
    )
    hub.add_repo("tests/Embedder-GGUF", {"embed-Q4_K_M.gguf": 50_000_000}, extra={"pipeline_tag": "feature-extraction"})
    hub.add_repo(
        "Systran/faster-whisper-base",
        {
            "model.bin": 145_217_532,
            "config.json": b"{}",
            "tokenizer.json": 2_203_239,
            "vocabulary.txt": 459_861,
            "README.md": b"# whisper",
        },
    )
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def stack(nats_url, hub, tmp_path_factory):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    stack = Stack(
        nats_url,
        tmp_path_factory.mktemp("registry-stack"),
        env=env,
        registry_args=("--hf-cache-ttl", "1", "--hf-timeout", "2"),
    )
    yield stack
    stack.close()


def register(stack: Stack, body: dict) -> httpx.Response:
    response = httpx.post(stack.url + "/v0/models/register", json=body, timeout=30)
    if response.status_code == 201:
        stack.registered.append(response.json()["id"])
    return response


def model(stack: Stack, name: str) -> httpx.Response:
    return httpx.get(f"{stack.url}/v0/models/{name}")


class EventWatcher:
    """A subscriber on ``registry.events.>``, as ``nats sub 'registry.events.>'`` would be."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.events: list[tuple[str, dict]] = []

    async def __aenter__(self):
        self.nc = await nats.connect(self.nats_url)
        await self.nc.subscribe(subjects.REGISTRY_EVENTS_ALL, cb=self._on)
        return self

    async def _on(self, msg) -> None:
        self.events.append((msg.subject, json.loads(msg.data)))

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def wait_for(self, subject: str, name: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for seen, event in self.events:
                if seen == subject and event["name"] == name:
                    return event
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {subject} for {name}; saw {[s for s, _ in self.events]}")


# ---------------------------------------------------------------- the curated catalog


def test_shipped_catalog_is_valid_and_covers_every_kind() -> None:
    entries = load_catalog()
    formats = {e.format for e in entries}
    assert {"gguf", "ctranslate2", "diffusers", "piper"} <= formats
    capabilities = {c for e in entries for c in e.capabilities}
    assert {"chat", "embedding", "transcription", "image", "speech"} <= capabilities


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda d: d["models"][1].update(size_bytes="big"), "size_bytes"),
        (lambda d: d["models"][1].update(extra_field=1), "extra_field"),
        (lambda d: d["models"][1].update(capabilities=["telepathy"]), "capabilities"),
        (lambda d: d["models"].append(dict(d["models"][0])), "duplicate id"),
        (lambda d: d["models"][0].update(engine="piper"), "pairs engine"),
    ],
)
def test_a_broken_catalog_is_refused_with_the_entry_named(tmp_path, change, complaint) -> None:
    data = json.loads(DEFAULT_PATH.read_text())
    change(data)
    bad = tmp_path / "catalog.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(CatalogError, match=complaint) as err:
        load_catalog(bad)
    if "models[1]" in str(err.value):
        assert data["models"][1]["id"] in str(err.value)


def test_registry_with_a_broken_catalog_stops_with_one_line(spawn, nats_url, tmp_path) -> None:
    bad = tmp_path / "catalog.json"
    bad.write_text('{"schema": 1, "models": [{"id": "x"}]}')
    proc = spawn("registry", "--nats-url", nats_url, "--catalog", str(bad))
    assert proc.popen.wait(30) == 1
    assert "does not match the catalog schema" in proc.output()


# ---------------------------------------------------------------- names and references


@pytest.mark.parametrize(
    ("filename", "quant"),
    [
        ("Qwen2.5-7B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("nomic-embed-text-v1.5.Q8_0.gguf", "Q8_0"),
        ("model-IQ3_XXS.gguf", "IQ3_XXS"),
        ("ggml-model-f16.gguf", "F16"),
        ("big-Q4_K_M-00001-of-00003.gguf", "Q4_K_M"),
        ("tiny.gguf", None),
    ],
)
def test_quantization_is_read_from_the_file_name(filename, quant) -> None:
    assert parse_quantization(filename) == quant


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("org/repo", ("org/repo", None, None)),
        ("org/repo:q4_k_m", ("org/repo", None, ":q4_k_m")),
        ("https://huggingface.co/org/repo", ("org/repo", None, None)),
        ("hf.co/org/repo", ("org/repo", None, None)),
        ("https://huggingface.co/org/repo/resolve/main/m-Q4_K_M.gguf", ("org/repo", "main", "m-Q4_K_M.gguf")),
        ("https://huggingface.co/org/repo/blob/v1/sub/m.gguf?download=true", ("org/repo", "v1", "sub/m.gguf")),
    ],
)
def test_references_to_repositories(text, parsed) -> None:
    assert parse_reference(text) == parsed


@pytest.mark.parametrize("text", ["just-a-name", "https://huggingface.co/datasets/org/data", "a/b/c"])
def test_bad_references_are_refused(text) -> None:
    with pytest.raises(ValueError):
        parse_reference(text)


# ---------------------------------------------------------------- registration


async def test_register_by_repo_and_file_then_duplicate_is_409(stack, nats_url, hub) -> None:
    async with EventWatcher(nats_url) as events:
        first = await asyncio.to_thread(register, stack, {"repo": "tests/Tiny-GGUF", "filename": "tiny-q8_0.gguf"})
        assert first.status_code == 201, first.text
        body = first.json()
        assert body["id"] == "tests/Tiny-GGUF:Q8_0"  # the naming rule: <repo>:<QUANT>
        assert body["state"] == "registered" and body["quantization"] == "Q8_0"
        assert body["source"] == {
            "kind": "hf",
            "repo": "tests/Tiny-GGUF",
            "filename": "tiny-q8_0.gguf",
            "revision": hub.repo("tests/Tiny-GGUF").sha,
        }
        assert body["sha256"] == hub.repo("tests/Tiny-GGUF").files["tiny-q8_0.gguf"].sha256
        added = await events.wait_for(subjects.MODEL_ADDED, "tests/Tiny-GGUF:Q8_0")
        assert added["record"]["size_bytes"] == body["size_bytes"] > 0

    again = register(stack, {"repo": "tests/Tiny-GGUF", "filename": "tiny-q8_0.gguf"})
    assert again.status_code == 409
    error = again.json()["error"]
    assert "already registered" in error["message"] and error["code"] == "model_already_registered"
    assert model(stack, "tests/Tiny-GGUF:Q8_0").json()["size_bytes"] == body["size_bytes"]  # never overwritten


def test_missing_file_names_the_file_and_repo(stack) -> None:
    response = register(stack, {"repo": "tests/Tiny-GGUF", "filename": "tiny-Q2_K.gguf"})
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert "tiny-Q2_K.gguf" in message and "tests/Tiny-GGUF" in message and "tiny-q8_0.gguf" in message
    unknown = register(stack, {"repo": "tests/No-Such-Repo"})
    assert unknown.status_code == 404 and "tests/No-Such-Repo" in unknown.json()["error"]["message"]


def test_safetensors_only_repo_is_pending_conversion_and_never_served(stack) -> None:
    response = register(stack, {"url": "https://huggingface.co/tests/Safetensors-Only"})
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["id"] == "tests/Safetensors-Only" and record["state"] == "pending_conversion"
    chat = httpx.post(
        stack.url + "/v1/chat/completions",
        json={"model": "tests/Safetensors-Only", "messages": [{"role": "user", "content": "x"}]},
    )
    assert chat.status_code == 503 and "awaiting conversion" in chat.json()["error"]["message"]
    assert "tests/Safetensors-Only" not in stack.models()


def test_register_by_url_quant_selector_and_catalog_id(stack) -> None:
    by_url = register(stack, {"url": f"{stack.env['HF_ENDPOINT']}/tests/Embedder-GGUF/resolve/main/embed-Q4_K_M.gguf"})
    assert by_url.status_code == 201, by_url.text
    assert by_url.json()["id"] == "tests/Embedder-GGUF:Q4_K_M" and by_url.json()["capabilities"] == ["embedding"]

    split = register(stack, {"repo": "tests/Split-GGUF:q4_k_m"})
    assert split.status_code == 201, split.text
    assert split.json()["size_bytes"] == 6 * GB  # every part of a split GGUF

    entry = load_catalog()[0]
    by_id = register(stack, {"catalog_id": entry.id})
    assert by_id.status_code == 201 and by_id.json()["id"] == entry.id
    assert by_id.json()["source"]["repo"] == entry.repo
    hub_entry = next(e for e in httpx.get(stack.url + "/v0/models/hub").json()["data"] if e["id"] == entry.id)
    assert hub_entry["lifecycle_status"] == "registered" and hub_entry["status"] == "available"
    assert register(stack, {"catalog_id": "no-such-entry"}).status_code == 404


def test_huge_model_is_registered_with_warnings(stack) -> None:
    response = register(stack, {"repo": "tests/Huge-GGUF"})
    assert response.status_code == 201, response.text
    warnings = " ".join(response.json()["warnings"])
    assert "over 50.0 GB" in warnings
    assert "more than any live node has" in warnings  # the test node has far less than 90 GB


@pytest.mark.parametrize(
    "body",
    [
        {"repo": "tests/Tiny-GGUF", "url": "https://huggingface.co/tests/Tiny-GGUF"},
        {},
        {"repo": "x/y", "file": "z"},
        {"repo": "not a repo"},
    ],
)
def test_bad_registration_requests_are_400(stack, body) -> None:
    response = register(stack, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- catalogs over HTTP


def test_hub_lists_the_catalog_with_status_and_search(stack) -> None:
    entries = load_catalog()
    data = httpx.get(stack.url + "/v0/models/hub").json()["data"]
    assert [e["id"] for e in data] == [e.id for e in entries]
    assert all(e["status"] in ("available", "downloading", "downloaded") for e in data)
    whisper = httpx.get(stack.url + "/v0/models/hub", params={"search": "whisper"}).json()["data"]
    assert whisper and all("whisper" in (e["id"] + e["repo"]).lower() for e in whisper)


def test_hf_catalog_pages_variants_and_cache(stack, hub) -> None:
    first = httpx.get(stack.url + "/v0/models/hf", params={"per_page": 50}, timeout=30)
    assert first.status_code == 200, first.text
    page = first.json()
    # At once (this stack's cache lives 1 s, for the stale test below): answered from the cache.
    before = len(hub.requests)
    assert httpx.get(stack.url + "/v0/models/hf", params={"per_page": 50}).json()["models"] == page["models"]
    assert len(hub.requests) == before
    assert len(page["models"]) == 50 and page["has_more"] and not page["stale"]
    assert page["models"][0]["id"] == "fakeorg/model-000-GGUF"  # most downloaded first
    variant = next(v for v in page["models"][0]["variants"] if v["quantization"] == "Q4_K_M")
    assert variant["filename"] == "model-000-Q4_K_M.gguf" and variant["size_bytes"] == 4 * GB
    assert variant["last_modified"] and variant["url"].endswith(
        "/fakeorg/model-000-GGUF/resolve/" + hub.repo("fakeorg/model-000-GGUF").sha + "/model-000-Q4_K_M.gguf"
    )

    last = httpx.get(stack.url + "/v0/models/hf", params={"per_page": 50, "page": 3}, timeout=30).json()
    ids = [m["id"] for m in last["models"]]
    gguf_test_repos = ["tests/Embedder-GGUF", "tests/Huge-GGUF", "tests/Split-GGUF", "tests/Tiny-GGUF"]
    assert ids[:20] == [f"fakeorg/model-{i}-GGUF" for i in range(100, 120)]
    assert sorted(ids[20:]) == gguf_test_repos and not last["has_more"]

    found = httpx.get(stack.url + "/v0/models/hf", params={"search": "model-11"}, timeout=30).json()
    assert sorted(m["id"] for m in found["models"]) == [f"fakeorg/model-{i}-GGUF" for i in range(110, 120)]

    bad = httpx.get(stack.url + "/v0/models/hf", params={"per_page": 1000})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "per_page"


def test_hf_down_gives_the_cached_page_marked_stale(stack, hub) -> None:
    fresh = httpx.get(stack.url + "/v0/models/hf", params={"per_page": 10}, timeout=30).json()
    assert not fresh["stale"]
    hub.stop()
    try:
        time.sleep(1.2)  # past the 1 s cache TTL of this stack
        stale = httpx.get(stack.url + "/v0/models/hf", params={"per_page": 10}, timeout=30)
        assert stale.status_code == 200
        assert stale.json()["stale"] is True and stale.json()["models"] == fresh["models"]
        never = httpx.get(stack.url + "/v0/models/hf", params={"per_page": 7}, timeout=30)
        assert never.status_code == 503 and "retry" in never.json()["error"]["message"]
        assert never.headers["retry-after"]
        hub_page = httpx.get(stack.url + "/v0/models/hub")  # the curated hub never needs Hugging Face
        assert hub_page.status_code == 200 and hub_page.json()["data"]
    finally:
        hub.restart()


# ---------------------------------------------------------------- lifecycle from node reports


async def test_lifecycle_follows_node_reports(stack, nats_url) -> None:
    """A node (here: this test, speaking the node contract) reports a download, then the file."""
    entry = load_catalog()[1]
    name = register(stack, {"catalog_id": entry.id}).json()["id"]

    def hub_status() -> str:
        return next(e for e in httpx.get(stack.url + "/v0/models/hub").json()["data"] if e["id"] == entry.id)["status"]

    node_id = "reporting-node"

    def beat(state: str | None, artifact: int = 0) -> bytes:
        models = (
            [LoadedModel(name=name, runtime="llama_cpp", capabilities=["chat"], state=state, artifact_bytes=artifact)]
            if state
            else []
        )
        return codec.encode(
            NodeHeartbeat(
                node_id=node_id,
                hostname="h",
                started_at=time.time(),
                sent_at=time.time(),
                interval_s=2,
                models=models,
                memory_total_bytes=8 * GB,
            )
        )

    nc = await nats.connect(nats_url)
    try:
        await nc.publish(subjects.node_heartbeat(node_id), beat("downloading"))
        progress = DownloadProgress(
            node_id=node_id, model=name, bytes_done=61_728, bytes_total=123_456, speed_bps=1e6, eta_s=12
        )
        await nc.publish(subjects.downloads_progress(node_id, name), codec.encode(progress))
        record = await asyncio.to_thread(
            wait_until, lambda: (r := model(stack, name).json())["state"] == "downloading" and r["download"] and r, 10
        )
        assert record["download"]["bytes_done"] == 61_728
        chat = await asyncio.to_thread(
            httpx.post,
            stack.url + "/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "x"}]},
        )
        assert chat.status_code == 503 and chat.headers["retry-after"]
        assert "is downloading (50%, 61.7 KB of 123.5 KB" in chat.json()["error"]["message"]
        assert await asyncio.to_thread(hub_status) == "downloading"
        one = (await asyncio.to_thread(httpx.get, f"{stack.url}/v1/models/{name}")).json()
        assert one["ready"] is False and one["download_progress"]["bytes_total"] == 123_456

        await nc.publish(subjects.node_heartbeat(node_id), beat("ready", artifact=123_456))
        await asyncio.to_thread(wait_until, lambda: model(stack, name).json()["state"] == "ready", 10)
        assert await asyncio.to_thread(hub_status) == "downloaded"
        await nc.publish(subjects.node_goodbye(node_id), codec.encode(NodeGoodbye(node_id=node_id)))
        await asyncio.to_thread(wait_until, lambda: model(stack, name).json()["state"] == "registered", 10)
        assert await asyncio.to_thread(hub_status) == "available"
    finally:
        await nc.close()


def test_a_catalog_model_of_several_files_lists_them_with_exact_sizes(stack) -> None:
    record = register(stack, {"catalog_id": "faster-whisper-base"}).json()
    files = {f["path"]: f["size"] for f in record["source"]["files"]}
    assert files == {"model.bin": 145_217_532, "config.json": 2, "tokenizer.json": 2_203_239, "vocabulary.txt": 459_861}
    assert record["size_bytes"] == sum(files.values()) and record["runtime"] == "faster_whisper"
    assert record["source"]["revision"]  # pinned to the commit the listing came from


def test_a_pipeline_repository_needs_configs_and_one_set_of_weights() -> None:
    """What nodes fetch of a diffusers repository laid out like stabilityai/sd-turbo."""
    from registry.hf import RepoFile, RepoListing
    from registry.sources import model_files

    names = [
        "model_index.json",
        "README.md",
        "sd_turbo.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    listing = RepoListing(
        repo="org/sd",
        revision="abc",
        files={n: RepoFile(n, 10, None) for n in names},
        pipeline_tag="text-to-image",
        tags=[],
        last_modified=None,
    )
    chosen = {f.path: f.local_path for f in model_files("diffusers", listing, "model_index.json")}
    assert chosen == {
        "model_index.json": "model_index.json",
        "scheduler/scheduler_config.json": "scheduler/scheduler_config.json",
        "text_encoder/config.json": "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors": "text_encoder/model.safetensors",
        "tokenizer/merges.txt": "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json": "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json": "tokenizer/vocab.json",
        "unet/config.json": "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors": "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json": "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors": "vae/diffusion_pytorch_model.safetensors",
    }


# ---------------------------------------------------------------- deletion


@requires_llama
async def test_delete_reaches_running_and_returning_nodes(nats_url, hub, tmp_path) -> None:
    stack = await asyncio.to_thread(
        Stack, nats_url, tmp_path, env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}, node=False
    )
    try:
        name = (
            await asyncio.to_thread(
                register, stack, {"repo": "tests/Tiny-GGUF", "filename": "tiny-q8_0.gguf", "name": "deletable"}
            )
        ).json()["id"]
        record = (await asyncio.to_thread(model, stack, name)).json()
        copies = {}
        for node in ("a", "b"):  # each node already has a complete copy in its cache
            models_root = tmp_path / node / "node" / "models"
            copy = models_root / cache.model_dir(Path(""), name) / "tiny-q8_0.gguf"
            copy.parent.mkdir(parents=True)
            copy.write_bytes(hub.repo("tests/Tiny-GGUF").files["tiny-q8_0.gguf"].content)
            assert copy.stat().st_size == record["size_bytes"]
            copies[node] = copy
        node_a = await asyncio.to_thread(stack.start_node, "a")
        node_b = await asyncio.to_thread(stack.start_node, "b")
        await asyncio.to_thread(wait_until, lambda: len(model(stack, name).json()["nodes"]) == 2, 20)
        assert name in await asyncio.to_thread(stack.models)

        # A blob the registry hosts for the model goes too.
        nc = await nats.connect(nats_url)
        blobs = await nc.jetstream().object_store(storage.OBJ_MODEL_BLOBS)
        await blobs.put(f"{encode_token(name)}/tiny-q8_0.gguf", b"GGUF blob")
        await nc.close()

        await asyncio.to_thread(node_b.stop)  # offline while the model is deleted
        async with EventWatcher(nats_url) as events:
            response = await asyncio.to_thread(httpx.delete, f"{stack.url}/v1/models/{name}")
            assert response.status_code == 200
            assert response.json() == {"id": name, "object": "model", "deleted": True}
            assert name not in await asyncio.to_thread(stack.models)  # gone at once
            assert (await asyncio.to_thread(model, stack, name)).status_code == 404
            await events.wait_for(subjects.MODEL_DELETED, name)
        stack.registered.remove(name)
        await asyncio.to_thread(
            wait_until, lambda: not copies["a"].exists(), 10, message="running node deletes its copy"
        )
        assert not (tmp_path / "a" / "node" / "models" / "tests").exists()  # no empty directories left
        assert copies["b"].exists()

        nc = await nats.connect(nats_url)
        blobs = await nc.jetstream().object_store(storage.OBJ_MODEL_BLOBS)
        remaining = [o.name for o in await blobs.list(ignore_deletes=True)] if await _has_objects(blobs) else []
        assert not any(n.startswith(encode_token(name) + "/") for n in remaining)
        await nc.close()

        await asyncio.to_thread(stack.start_node, "b")  # replays the delete it missed
        await asyncio.to_thread(
            wait_until, lambda: not copies["b"].exists(), 15, message="returning node deletes its copy"
        )
        assert node_a.popen.poll() is None

        missing = await asyncio.to_thread(httpx.delete, f"{stack.url}/v0/models/{name}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    finally:
        await asyncio.to_thread(stack.close)


async def _has_objects(blobs) -> bool:
    from nats.js.errors import NotFoundError

    try:
        await blobs.list(ignore_deletes=True)
    except NotFoundError:
        return False
    return True


# ---------------------------------------------------------------- the CLI


def cli(stack: Stack | None, *args: str, url: str | None = None) -> subprocess.CompletedProcess:
    base = url or stack.url
    return subprocess.run(
        [sys.executable, "-m", "llm_router", "model", "--url", base, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_cli_model_commands(stack, tiny_gguf) -> None:
    listing = cli(stack, "list", "--search", "model-00", "--per-page", "5")
    assert listing.returncode == 0, listing.stderr
    assert (
        "fakeorg/model-000-GGUF" in listing.stdout and "Q4_K_M" in listing.stdout and "More: --page 2" in listing.stdout
    )

    hub_table = cli(stack, "hub", "--search", "piper")
    assert hub_table.returncode == 0 and "piper" in hub_table.stdout

    added = cli(stack, "add", "tests/Tiny-GGUF", "--file", "tiny-f16.gguf")
    assert added.returncode == 0, added.stderr
    assert "tests/Tiny-GGUF:F16" in added.stdout
    stack.registered.append("tests/Tiny-GGUF:F16")
    shown = cli(stack, "--json", "show", "tests/Tiny-GGUF:F16")
    assert shown.returncode == 0 and json.loads(shown.stdout)["source"]["filename"] == "tiny-f16.gguf"
    assert "tests/Tiny-GGUF:F16" in cli(stack, "ls").stdout

    twice = cli(stack, "add", "tests/Tiny-GGUF", "--file", "tiny-f16.gguf")
    assert twice.returncode == 1 and twice.stderr.count("\n") == 1 and "already registered" in twice.stderr
    missing = cli(stack, "add", "tests/Tiny-GGUF", "--file", "nope.gguf")
    assert missing.returncode == 1 and "'nope.gguf' not found in repository 'tests/Tiny-GGUF'" in missing.stderr

    local = cli(stack, "--json", "add", str(tiny_gguf), "--name", "cli-local")
    assert local.returncode == 0, local.stderr
    stack.registered.append("cli-local")
    assert json.loads(local.stdout)["source"] == {"kind": "path", "path": str(tiny_gguf)}

    removed = cli(stack, "rm", "tests/Tiny-GGUF:F16")
    assert removed.returncode == 0 and "deleted tests/Tiny-GGUF:F16" in removed.stdout
    stack.registered.remove("tests/Tiny-GGUF:F16")
    gone = cli(stack, "show", "tests/Tiny-GGUF:F16")
    assert gone.returncode == 1 and gone.stderr.startswith("llm-router: ") and gone.stderr.count("\n") == 1


def test_cli_without_a_gateway_says_so(stack) -> None:
    down = cli(None, "hub", url="http://127.0.0.1:9")
    assert down.returncode == 3 and "cannot reach the gateway" in down.stderr and down.stderr.count("\n") == 1
