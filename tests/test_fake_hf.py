"""The fake Hub (tests/fake_hf.py), exercised only through the real huggingface_hub client over HTTP."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import httpx2
import pytest
from fake_hf import FakeHub
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

GGUF = b"GGUF" + bytes(range(256)) * 40  # 10 KiB of real content
CONFIG = b'{"model_type": "llama"}'


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    # HF_HUB_OFFLINE is read once at import; offline mode would refuse every request before it is sent.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fake = FakeHub()
    fake.add_repo(
        "acme/tiny-GGUF",
        {
            "tiny-q4_k_m.gguf": GGUF,
            "config.json": CONFIG,
            "big-q8_0.gguf": 7_000_000_000,  # declared size only
            "sub/dir/extra.safetensors": b"\x00" * 2048,
            "sub/readme.txt": b"hello",
        },
        downloads=5,
        likes=1,
    )
    fake.start()
    yield fake
    fake.stop()


def test_list_models_filters_sorts_and_follows_pages(hub: FakeHub) -> None:
    for i in range(70):
        # 7919 is prime: downloads are distinct for i < 1000
        hub.add_repo(f"org{i % 3}/Model-{i:02d}-GGUF", {"m.gguf": 1000 + i}, downloads=(i * 7919) % 1000)
    hub.add_repo("org1/Model-st", {"model.safetensors": 10}, downloads=10**9)  # no gguf tag
    hub.add_repo("org0/other-gguf", {"o.gguf": 10}, downloads=10**9)  # search does not match
    hub.clear_requests()

    got = list(HfApi(endpoint=hub.url).list_models(filter="gguf", search="MODEL-", sort="downloads", limit=60))

    expected = sorted(range(70), key=lambda i: -((i * 7919) % 1000))[:60]
    assert [m.id for m in got] == [f"org{i % 3}/Model-{i:02d}-GGUF" for i in expected]
    assert [m.downloads for m in got] == sorted((m.downloads for m in got), reverse=True)
    assert all("gguf" in m.tags and m.siblings[0].rfilename == "m.gguf" for m in got)
    assert hub.count("GET", "/api/models") == 3  # pages of 25, 25, 25: islice stops inside the third

    by_id = list(HfApi(endpoint=hub.url).list_models(filter=["gguf", "safetensors"]))
    assert [m.id for m in by_id] == ["acme/tiny-GGUF"]
    assert [m.id for m in HfApi(endpoint=hub.url).list_models(author="org1", sort="likes", limit=2)] == [
        "org1/Model-01-GGUF",
        "org1/Model-04-GGUF",
    ]


def test_model_info_files_metadata(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url)
    info = api.model_info("acme/tiny-GGUF", files_metadata=True)
    assert info.id == "acme/tiny-GGUF" and info.tags == ["gguf", "safetensors"] and info.downloads == 5
    assert info.library_name == "gguf" and len(info.sha) == 40 and info.last_modified.year == 2026
    files = {s.rfilename: s for s in info.siblings}
    assert files["tiny-q4_k_m.gguf"].size == len(GGUF)
    assert files["tiny-q4_k_m.gguf"].lfs.sha256 == hashlib.sha256(GGUF).hexdigest()
    assert files["big-q8_0.gguf"].size == 7_000_000_000 and files["big-q8_0.gguf"].lfs.size == 7_000_000_000
    assert files["config.json"].size == len(CONFIG) and files["config.json"].lfs is None
    assert info.used_storage == sum(s.size for s in info.siblings)

    assert api.model_info("acme/tiny-GGUF").siblings[0].size is None  # without blobs=true: names only
    assert api.model_info("acme/tiny-GGUF", revision=info.sha).sha == info.sha
    with pytest.raises(RevisionNotFoundError):
        api.model_info("acme/tiny-GGUF", revision="v9")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/missing")


def test_list_repo_tree(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url)
    top = {e.path: e for e in api.list_repo_tree("acme/tiny-GGUF")}
    assert set(top) == {"big-q8_0.gguf", "config.json", "sub", "tiny-q4_k_m.gguf"}
    assert top["tiny-q4_k_m.gguf"].lfs.sha256 == hashlib.sha256(GGUF).hexdigest()
    assert top["config.json"].size == len(CONFIG) and top["config.json"].lfs is None
    assert hasattr(top["sub"], "tree_id")  # a RepoFolder

    deep = {e.path for e in api.list_repo_tree("acme/tiny-GGUF", recursive=True)}
    assert {"sub", "sub/dir", "sub/readme.txt", "sub/dir/extra.safetensors"} <= deep
    assert {e.path for e in api.list_repo_tree("acme/tiny-GGUF", "sub/dir", expand=True)} == {
        "sub/dir/extra.safetensors"
    }

    hub.page_size = 2  # pages of 2: four requests for the seven entries
    hub.clear_requests()
    assert len(list(api.list_repo_tree("acme/tiny-GGUF", recursive=True))) == 7
    assert hub.count("GET", "/api/models/acme/tiny-GGUF/tree/") == 4


def test_hf_hub_download_and_metadata(hub: FakeHub, tmp_path) -> None:
    path = hf_hub_download("acme/tiny-GGUF", "tiny-q4_k_m.gguf", endpoint=hub.url, cache_dir=tmp_path)
    assert Path(path).read_bytes() == GGUF
    resolve = "/acme/tiny-GGUF/resolve/main/tiny-q4_k_m.gguf"
    assert hub.count("GET", resolve) == 1 and hub.count("HEAD", resolve) == 1

    # cached: a second call only re-checks the metadata
    assert hf_hub_download("acme/tiny-GGUF", "tiny-q4_k_m.gguf", endpoint=hub.url, cache_dir=tmp_path) == path
    assert hub.count("GET", resolve) == 1

    nested = hf_hub_download("acme/tiny-GGUF", "sub/readme.txt", endpoint=hub.url, cache_dir=tmp_path)
    assert Path(nested).read_bytes() == b"hello"

    meta = get_hf_file_metadata(hf_hub_url("acme/tiny-GGUF", "big-q8_0.gguf", endpoint=hub.url))
    assert meta.size == 7_000_000_000 and meta.commit_hash == hub.repo("acme/tiny-GGUF").sha
    assert meta.etag == hub.repo("acme/tiny-GGUF").files["big-q8_0.gguf"].sha256
    with pytest.raises(RemoteEntryNotFoundError):  # declared size only: no content to download
        hf_hub_download("acme/tiny-GGUF", "big-q8_0.gguf", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("acme/tiny-GGUF", "nope.gguf", endpoint=hub.url, cache_dir=tmp_path)


def test_ranged_get(hub: FakeHub) -> None:
    url = hf_hub_url("acme/tiny-GGUF", "tiny-q4_k_m.gguf", endpoint=hub.url)
    r = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == GGUF[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(GGUF)}"
    r = httpx.get(url, headers={"Range": "bytes=10000-"})
    assert r.status_code == 206 and r.content == GGUF[10000:]
    r = httpx.get(url, headers={"Range": f"bytes={len(GGUF)}-"})
    assert r.status_code == 416
    assert hub.count("GET", "/acme/tiny-GGUF/resolve/") == 3


def test_stop_refuses_and_restart_serves_again(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url)
    url = hub.url
    assert api.model_info("acme/tiny-GGUF", timeout=2).id == "acme/tiny-GGUF"

    hub.stop()
    started = time.monotonic()
    with pytest.raises(httpx2.ConnectError):
        api.model_info("acme/tiny-GGUF", timeout=2)
    assert time.monotonic() - started < 1

    assert hub.restart() == url
    assert api.model_info("acme/tiny-GGUF", timeout=2).id == "acme/tiny-GGUF"


def test_fail_status_and_delay(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url)
    hub.fail_status = 503
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info("acme/tiny-GGUF", timeout=2)  # a plain request: no retry
    assert err.value.response.status_code == 503
    hub.fail_status = None

    hub.delay_s = 0.5
    with pytest.raises(httpx2.TimeoutException):
        api.model_info("acme/tiny-GGUF", timeout=0.1)
