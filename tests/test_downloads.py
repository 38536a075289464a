"""Node model resolution and downloads, end to end: real NATS, real nodes as processes, and the
real huggingface_hub client downloading from the local fake Hub (``HF_ENDPOINT``).

Order of sources: cache → shared dir → object store → allowed origin → "not found".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nats
import pytest
from conftest import Stack, requires_llama, wait_until, wait_until_async
from fake_hf import FakeHub

from broker import provision
from broker.blobs import blob_name
from events import storage
from nodes import cache

pytestmark = [pytest.mark.e2e, requires_llama]

TINY_REPO, TINY_FILE = "dl/Tiny-GGUF", "tiny-q8_0.gguf"
BIG_REPO, BIG_FILE = "dl/Big-GGUF", "big-q8_0.gguf"
BIG_SIZE = 10_000_000  # the tiny GGUF padded with zeros: llama.cpp still loads it
HUGE_REPO, HUGE_FILE = "dl/Huge-GGUF", "huge-q8_0.gguf"
HUGE_SIZE = 160_000_000  # a read of several synced 32 MiB stretches


@pytest.fixture(scope="module")
def hub(tiny_gguf: Path):
    hub = FakeHub()
    tiny = tiny_gguf.read_bytes()
    hub.add_repo(TINY_REPO, {TINY_FILE: tiny})
    hub.add_repo(BIG_REPO, {BIG_FILE: tiny + bytes(BIG_SIZE - len(tiny))})
    hub.add_repo(HUGE_REPO, {HUGE_FILE: tiny + os.urandom(HUGE_SIZE - len(tiny))})
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def stack(nats_url, hub, tmp_path_factory):
    stack = Stack(
        nats_url, tmp_path_factory.mktemp("downloads"), env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}, node=False
    )
    yield stack
    stack.close()


@pytest.fixture
def fresh(hub, stack):
    """The fake Hub with its counters at zero; the test's registrations are deleted after it."""
    hub.clear_requests()
    hub.bytes_served.clear()
    hub.bytes_per_s = 0.0
    yield hub
    hub.bytes_per_s = 0.0
    for name in stack.registered:
        stack.admin("delete", {"name": name})
    stack.registered.clear()


def register(stack: Stack, name: str, repo: str = TINY_REPO, filename: str = TINY_FILE, **extra) -> dict:
    response = httpx.post(
        stack.url + "/v0/models/register", json={"repo": repo, "filename": filename, "name": name, **extra}, timeout=30
    )
    assert response.status_code == 201, response.text
    stack.registered.append(name)
    return response.json()


def content(hub: FakeHub, repo: str = TINY_REPO, filename: str = TINY_FILE) -> bytes:
    return hub.repo(repo).files[filename].content


def node_models_dir(stack: Stack, node: str) -> Path:
    return stack.data_dir / node / "node" / "models"


def served_by(stack: Stack, name: str) -> list[str]:
    return httpx.get(f"{stack.url}/v0/models/{name}").json()["nodes"]


def heartbeat_entry(stack: Stack, node_id: str, name: str) -> dict | None:
    nodes = httpx.get(stack.url + "/v0/nodes").json()["data"]
    beat = next((n for n in nodes if n["node_id"] == node_id), None)
    return next((m for m in beat["models"] if m["name"] == name), None) if beat else None


def chat(stack: Stack, name: str) -> httpx.Response:
    return httpx.post(
        stack.url + "/v1/chat/completions",
        timeout=30,
        json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )


def resolve_gets(hub: FakeHub, repo: str) -> int:
    return hub.count("GET", f"/{repo}/resolve/")


def file_requests(hub: FakeHub) -> int:
    """Requests for file contents or file metadata (not the registry's repository lookups)."""
    return hub.count("GET", "/dl/") + hub.count("HEAD", "/dl/")


# ---------------------------------------------------------------- local sources


def test_a_valid_cache_is_used_without_any_download(stack, fresh) -> None:
    name = "cached"
    register(stack, name)
    copy = cache.artifact_path(node_models_dir(stack, "n-cached"), _record(stack, name))
    copy.parent.mkdir(parents=True)
    copy.write_bytes(content(fresh))
    node = stack.start_node("n-cached")
    wait_until(
        lambda: node.node_id in served_by(stack, name),
        30,
        message=lambda: f"served from the cache; node output:\n{node.output()[-3000:]}",
    )
    assert file_requests(fresh) == 0  # not even a metadata request
    assert chat(stack, name).status_code == 200
    node.stop()


@pytest.mark.parametrize("damage", ["empty", "same size, other bytes"])
def test_a_damaged_cache_is_fetched_again(stack, fresh, damage) -> None:
    name = f"damaged-{damage.split()[0].strip(',')}"
    record = register(stack, name, predownload=True)
    copy = cache.artifact_path(node_models_dir(stack, f"n-{name}"), _record(stack, name))
    copy.parent.mkdir(parents=True)
    good = content(fresh)
    copy.write_bytes(b"" if damage == "empty" else bytes(len(good)))
    node = stack.start_node(f"n-{name}")
    wait_until(lambda: served_by(stack, name) == [node.node_id], 20, message="re-downloaded and served")
    assert copy.read_bytes() == good and record["sha256"] == hashlib.sha256(good).hexdigest()
    assert resolve_gets(fresh, TINY_REPO) == 1
    assert not cache.part_path(copy).exists() and not cache.journal_path(copy).exists()
    node.stop()


def test_a_shared_dir_is_used_in_place(stack, fresh, tmp_path) -> None:
    name = "shared-in-place"
    register(stack, name)
    shared = tmp_path / "nfs"
    original = cache.artifact_path(shared, _record(stack, name))
    original.parent.mkdir(parents=True)
    original.write_bytes(content(fresh))
    node = stack.start_node("n-shared", "--shared-models-dir", str(shared))
    wait_until(lambda: served_by(stack, name) == [node.node_id], 15, message="served from the shared dir")
    loaded = heartbeat_entry(stack, node.node_id, name)
    assert os.stat(loaded["artifact_path"]).st_ino == original.stat().st_ino  # the same file, not a copy
    assert not cache.model_dir(node_models_dir(stack, "n-shared"), name).exists()
    assert file_requests(fresh) == 0
    node.stop()


def test_nodes_sharing_a_dir_download_once(stack, fresh, tmp_path) -> None:
    """Two nodes on one shared dir: one takes the lease and downloads, the other uses its file."""
    name = "shared-download"
    register(stack, name, repo=BIG_REPO, filename=BIG_FILE, predownload=True)
    fresh.bytes_per_s = 10_000_000
    shared = tmp_path / "nfs"
    shared.mkdir()
    nodes = [stack.start_node(n, "--shared-models-dir", str(shared)) for n in ("n-share-a", "n-share-b")]
    wait_until(lambda: sorted(served_by(stack, name)) == sorted(n.node_id for n in nodes), 30, message="both serve")
    assert resolve_gets(fresh, BIG_REPO) == 1
    original = cache.artifact_path(shared, _record(stack, name))
    for node in nodes:
        assert os.stat(heartbeat_entry(stack, node.node_id, name)["artifact_path"]).st_ino == original.stat().st_ino
    # Deleting the model unloads it everywhere, but a shared dir is never deleted from.
    stack.admin("delete", {"name": name})
    stack.registered.remove(name)
    wait_until(lambda: all(heartbeat_entry(stack, n.node_id, name) is None for n in nodes), 15, message="unloaded")
    assert original.exists()
    for node in nodes:
        node.stop()


def test_when_the_lease_holder_dies_another_node_resumes_its_part(stack, fresh, tmp_path) -> None:
    name = "lease-takeover"
    register(stack, name, repo=BIG_REPO, filename=BIG_FILE, predownload=True)
    fresh.bytes_per_s = 2_500_000  # 4 s for the file
    shared = tmp_path / "nfs"
    shared.mkdir()
    nodes = {n.node_id: n for n in (stack.start_node(f"n-lease-{x}", "--shared-models-dir", str(shared)) for x in "ab")}
    holder = wait_until(lambda: asyncio.run(_lease_holder(stack.nats_url)), 10, message="a lease")
    part = cache.part_path(cache.artifact_path(shared, _record(stack, name)))
    wait_until(lambda: part.exists() and part.stat().st_size > BIG_SIZE * 0.3, 10, interval=0.05)
    nodes.pop(holder).kill()
    survivor = next(iter(nodes.values()))
    wait_until(lambda: served_by(stack, name) == [survivor.node_id], 40, message="taken over after the lease expired")
    assert resolve_gets(fresh, BIG_REPO) == 2  # the holder's GET, then the survivor's ranged one
    assert sum(fresh.bytes_served.values()) - BIG_SIZE < BIG_SIZE * 0.10
    survivor.stop()


# ---------------------------------------------------------------- remote sources


def test_the_object_store_comes_before_the_origin(stack, fresh, nats_url) -> None:
    name = "from-object-store"
    data = content(fresh)
    asyncio.run(_put_blob(nats_url, blob_name(name, TINY_FILE), data))
    node = stack.start_node("n-objstore")
    register(stack, name, predownload=True)  # the node hears model.added and fetches it at once
    wait_until(lambda: served_by(stack, name) == [node.node_id], 20, message="downloaded from the object store")
    assert resolve_gets(fresh, TINY_REPO) == 0
    report = _progress(stack, name)[0]
    assert report["state"] == "done" and report["source"].startswith("object store")
    copy = cache.artifact_path(node_models_dir(stack, "n-objstore"), _record(stack, name))
    assert copy.read_bytes() == data

    # HTTP clients get the same file from the gateway, with ranges.
    whole = httpx.get(f"{stack.url}/v0/models/blob/{name}")
    assert whole.status_code == 200 and whole.content == data
    part = httpx.get(f"{stack.url}/v0/models/blob/{name}", headers={"Range": "bytes=4-99"})
    assert part.status_code == 206 and part.content == data[4:100]
    other = httpx.get(f"{stack.url}/v0/models/blob/{name}", params={"file": "../secret"})
    assert other.status_code == 404 and other.json()["error"]["param"] == "file"
    node.stop()


def test_eight_requests_for_a_missing_model_make_one_download_from_the_origin(stack, fresh) -> None:
    name = "on-first-request"
    register(stack, name)
    node = stack.start_node("n-origin", "--predownload", "none")
    fresh.bytes_per_s = 2_000_000  # the download outlasts all eight requests, even on a loaded machine
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: chat(stack, name), range(8)))
    assert {a.status_code for a in answers} == {503}, [a.text for a in answers]
    assert all(a.headers.get("retry-after") for a in answers)
    assert any("downloading from" in a.json()["error"]["message"] for a in answers)
    wait_until(lambda: served_by(stack, name) == [node.node_id], 20, message="downloaded on request")
    assert resolve_gets(fresh, TINY_REPO) == 1
    assert chat(stack, name).status_code == 200
    report = _progress(stack, name)[0]
    assert report["state"] == "done" and report["source"].startswith(fresh.url)
    too_long = httpx.get(f"{stack.url}/v0/downloads", params={"model": "m" * 300})  # bounded before a subject
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "model", too_long.text

    # The node itself shares one download between concurrent orders.
    second = "ordered-eight-times"
    register(stack, second)
    fresh.clear_requests()
    fresh.bytes_per_s = 2_000_000  # slow enough that all eight orders overlap the download
    replies = asyncio.run(_order_many(stack.nats_url, node.node_id, second, 8))
    assert sorted(r["state"] for r in replies) == ["running"] * 7 + ["started"]
    assert len({r["task_id"] for r in replies}) == 1
    wait_until(lambda: served_by(stack, second) == [node.node_id], 20, message="ordered download served")
    assert resolve_gets(fresh, TINY_REPO) == 1
    node.stop()


def test_a_model_found_nowhere_is_a_fast_404_and_retried_on_the_next_request(stack, fresh, nats_url) -> None:
    name = "nowhere"
    register(stack, name)
    node = stack.start_node("n-nowhere", "--allow-origin", "none")
    httpx.get(stack.url + "/healthz")
    started = time.perf_counter()
    answer = chat(stack, name)
    elapsed = time.perf_counter() - started
    error = answer.json()["error"]
    assert answer.status_code == 404 and error["code"] == "model_not_found", answer.text
    assert "not in the object store" in error["message"] and "is not allowed" in error["message"]
    assert elapsed < 0.1, f"took {elapsed * 1000:.0f} ms"
    assert file_requests(fresh) == 0
    wait_until(lambda: httpx.get(f"{stack.url}/v0/models/{name}").json()["state"] == "error", 10)

    # Once the file is somewhere, the next request starts the download.
    asyncio.run(_put_blob(nats_url, blob_name(name, TINY_FILE), content(fresh)))
    time.sleep(1.1)  # past the gateway's one-second sharing of the last answer
    retried = chat(stack, name)
    assert retried.status_code == 503 and "downloading from object store" in retried.json()["error"]["message"], (
        retried.text
    )
    wait_until(lambda: served_by(stack, name) == [node.node_id], 15, message="served after the retry")
    node.stop()


async def test_an_object_store_read_resumes_at_its_chunk_sequence(nats_url) -> None:
    """What a restarted node does with the sequence it recorded next to its ``.part``."""
    import io

    from broker.blobs import ResumePoint, blob_info, read_blob

    data = os.urandom(6 * 1024 * 1024)
    await _put_blob(nats_url, "resume-test/blob.bin", data)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await blob_info(js, "resume-test/blob.bin")
        out, points = io.BytesIO(), []

        class Crash(Exception):
            pass

        def crash_after_a_third(n: int, point: ResumePoint) -> None:
            points.append(ResumePoint(point.nuid, point.offset, point.next_seq))
            if point.offset >= len(data) // 3:
                raise Crash

        with pytest.raises(Crash):
            await read_blob(js, info, out, on_chunk=crash_after_a_third, digest=hashlib.sha256())
        stopped = points[-1]
        out.truncate(stopped.offset)
        out.seek(stopped.offset)
        reread = []
        digest = hashlib.sha256(out.getvalue())  # what a node hashes of its .part before resuming
        await read_blob(js, info, out, resume=stopped, on_chunk=lambda n, _: reread.append(n), digest=digest)
        assert out.getvalue() == data
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()  # hashed beside the writes, all of it
        assert sum(reread) == len(data) - stopped.offset  # nothing before the resume point again
        await (await js.object_store(storage.OBJ_MODEL_BLOBS)).delete("resume-test/blob.bin")
    finally:
        await nc.close()


async def test_a_read_records_only_points_whose_bytes_are_synced(nats_url, tmp_path, monkeypatch) -> None:
    """``on_synced`` gets a point once the bytes before it are on disk (a point recorded earlier
    could be resumed past zeros after a crash); resuming from the last one gives the object."""
    import broker.blobs as blobs

    monkeypatch.setattr(blobs, "WRITEBACK_BYTES", 8 * 1024 * 1024)
    syncs: list[int] = []  # the real fdatasync, counted

    def datasync(fd: int) -> None:
        os.fdatasync(fd)
        syncs.append(fd)

    monkeypatch.setattr(blobs, "_datasync", datasync)
    data = os.urandom(40 * 1024 * 1024)
    await _put_blob(nats_url, "synced-test/blob.bin", data)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await blobs.blob_info(js, "synced-test/blob.bin")
        written, synced, syncs_before = [], [], []
        target = tmp_path / "blob.bin"

        def on_synced(point) -> None:
            synced.append(point)
            syncs_before.append(len(syncs))

        with open(target, "wb") as out:
            await blobs.read_blob(
                js, info, out, on_chunk=lambda n, point: written.append(point.offset), on_synced=on_synced
            )
        assert synced, "no point was recorded"
        assert syncs_before == list(range(1, len(synced) + 1)), "a point recorded before its sync"
        assert [p.offset for p in synced] == sorted(p.offset for p in synced)
        assert all(p.offset in written for p in synced)
        last = max((p for p in synced if p.offset < len(data)), key=lambda p: p.offset)  # one to resume from
        with open(target, "r+b") as out:
            out.truncate(last.offset)
            out.seek(last.offset)
            await blobs.read_blob(js, info, out, resume=last)
        assert target.read_bytes() == data
        await (await js.object_store(storage.OBJ_MODEL_BLOBS)).delete("synced-test/blob.bin")
    finally:
        await nc.close()


async def test_a_cancelled_read_returns_only_when_its_threads_are_done(nats_url) -> None:
    """Cancelling a read (a cancelled download, a lost lease) must not leave a thread hashing
    into the digest or writing the file after ``read_blob`` has raised."""
    import io

    import broker.blobs as blobs

    class SlowDigest:  # the hashlib interface, slow enough to be caught mid-update
        def __init__(self) -> None:
            self.active = 0
            self.updates = 0

        def update(self, chunk: bytes) -> None:
            self.active += 1
            time.sleep(0.1)
            self.updates += 1
            self.active -= 1

    await _put_blob(nats_url, "cancel-test/blob.bin", os.urandom(24 * 1024 * 1024))
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await blobs.blob_info(js, "cancel-test/blob.bin")
        digest = SlowDigest()
        read = asyncio.create_task(blobs.read_blob(js, info, io.BytesIO(), digest=digest))
        await wait_until_async(lambda: digest.active > 0, message="a hash running")
        await asyncio.sleep(0.2)  # the next batch is in: the read now waits for this hash (0.8 s)
        assert digest.active > 0
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        assert digest.active == 0, "a hash was still running after the read raised"
        updates = digest.updates
        await asyncio.sleep(0.3)
        assert digest.updates == updates, "the digest was updated after the read raised"
        await (await js.object_store(storage.OBJ_MODEL_BLOBS)).delete("cancel-test/blob.bin")
    finally:
        await nc.close()


def test_chunks_fit_the_server_and_are_never_a_whole_number_of_go_pages() -> None:
    """nats-server copies a chunk of a whole number of 8 KiB pages a second time on delivery."""
    from broker.blobs import CHUNK_BYTES, HEADER_ROOM, chunk_size

    payloads = (
        64 * 1024 + HEADER_ROOM,
        256 * 1024,
        1024 * 1024,
        1024 * 1024 + 4095,
        1024 * 1024 + 4097,
        8 << 20,
        10**6,
    )
    for max_payload in payloads:
        size = chunk_size(max_payload)
        assert -size % 8192 >= 2, (max_payload, size)  # room for the CR LF in its page-rounded buffer
        assert size <= min(CHUNK_BYTES, max_payload - HEADER_ROOM), (max_payload, size)
        assert size >= 60 * 1024, (max_payload, size)


_READ_INTO_A_SMALL_DISK = """
import asyncio, errno, sys
import nats
from broker.blobs import blob_info, read_blob

async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    info = await blob_info(js, sys.argv[2])
    written, subscriptions = [], len(nc._subs)
    with open(sys.argv[3], "wb") as out:
        try:
            await read_blob(js, info, out, on_chunk=lambda n, point: written.append(n))
        except OSError as exc:
            print("ENOSPC" if exc.errno == errno.ENOSPC else f"errno {exc.errno}", sum(written))
        else:
            print("read", sum(written))
    print("subscriptions left", len(nc._subs) - subscriptions)
    await nc.close()

asyncio.run(main())
"""


async def test_a_disk_too_small_for_an_object_fails_before_a_byte_is_written(nats_url, tmp_path) -> None:
    """The rest of the file is reserved before the read (posix_fallocate): on a 12 MiB
    filesystem (a tmpfs in a mount namespace of its own) a 24 MiB object fails at once, not
    after its first 8 MiB batch."""
    small = tmp_path / "small"
    small.mkdir()
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here: {probe.stderr.decode().strip()}")
    await _put_blob(nats_url, "small-disk/blob.bin", os.urandom(24 * 1024 * 1024))
    script = tmp_path / "read.py"
    script.write_text(_READ_INTO_A_SMALL_DISK)
    command = (
        f"mount -t tmpfs -o size=12m tmpfs {small} && "
        f"{sys.executable} {script} {nats_url} small-disk/blob.bin {small / 'blob.bin'}"
    )
    root = Path(__file__).resolve().parent.parent
    result = await asyncio.to_thread(
        subprocess.run,
        ["unshare", "-m", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ENOSPC", "0", "subscriptions", "left", "0"], (
        result.stdout,
        result.stderr[-2000:],
    )


def test_a_node_killed_mid_download_resumes_and_never_serves_a_partial_file(stack, fresh) -> None:
    name = "resumed"
    record = register(stack, name, repo=BIG_REPO, filename=BIG_FILE, predownload=True)
    fresh.bytes_per_s = 5_000_000  # about 2 s for the whole file
    node = stack.start_node("n-resume")
    wait_until(
        lambda: (r := _progress(stack, name)) and r[0]["state"] == "running" and r[0]["bytes_done"] >= BIG_SIZE * 0.45,
        20,
        interval=0.05,
        message="half of the download",
    )
    node.kill()
    final = cache.artifact_path(node_models_dir(stack, "n-resume"), _record(stack, name))
    part = cache.part_path(final)
    assert not final.exists() and 0 < part.stat().st_size < BIG_SIZE
    assert chat(stack, name).status_code != 200

    restarted = stack.start_node("n-resume")
    wait_until(lambda: served_by(stack, name) == [restarted.node_id], 20, message="resumed download served")
    resent = sum(fresh.bytes_served.values()) - BIG_SIZE
    assert resent < BIG_SIZE * 0.10, f"{resent} bytes downloaded twice"
    assert hashlib.sha256(final.read_bytes()).hexdigest() == record["sha256"]
    assert not part.exists()
    assert chat(stack, name).status_code == 200
    restarted.stop()


def test_a_node_killed_mid_object_store_read_resumes_at_its_last_synced_chunk(stack, fresh, nats_url) -> None:
    """A node frozen and killed -9 in the middle of reading a model from the object store
    resumes at the point its journal recorded (the full-size, preallocated ``.part`` does not
    mislead it) and never asks the origin. That a recorded point's bytes were synced first is
    ``test_a_read_records_only_points_whose_bytes_are_synced``."""
    name = "resumed-from-store"
    data = content(fresh, HUGE_REPO, HUGE_FILE)
    asyncio.run(_put_blob(nats_url, blob_name(name, HUGE_FILE), data))
    node = stack.start_node("n-store-resume")
    record = register(stack, name, repo=HUGE_REPO, filename=HUGE_FILE, predownload=True)
    final = cache.artifact_path(node_models_dir(stack, "n-store-resume"), _record(stack, name))
    journal, part = cache.journal_path(final), cache.part_path(final)
    deadline = time.monotonic() + 30
    while _journal_offset(journal) == 0:  # written once the first 32 MiB are synced
        assert time.monotonic() < deadline and not final.exists(), "no synced point recorded"
        time.sleep(0.001)
    os.kill(node.pid, signal.SIGSTOP)
    node.kill()
    recorded = _journal_offset(journal)
    assert not final.exists() and part.stat().st_size == HUGE_SIZE  # reserved whole from the start
    assert 0 < recorded < HUGE_SIZE

    restarted = stack.start_node("n-store-resume")
    resumed = json.loads(restarted.wait_for(r'"event": "download resumed"', 30).string)
    assert resumed["offset"] == recorded
    wait_until(lambda: served_by(stack, name) == [restarted.node_id], 30, message="resumed download served")
    assert hashlib.sha256(final.read_bytes()).hexdigest() == record["sha256"]
    assert resolve_gets(fresh, HUGE_REPO) == 0
    assert not part.exists() and not journal.exists()
    restarted.stop()


def _journal_offset(journal: Path) -> int:
    try:
        return int(json.loads(journal.read_text()).get("offset", 0))
    except (OSError, ValueError):
        return 0


def test_models_of_several_files_are_fetched_file_by_file(stack, fresh, whisper_dir, voice_path, sd_dir) -> None:
    """A CTranslate2 Whisper repository, a Piper voice in a repository of many voices, and a
    diffusers pipeline."""
    whisper_files = {p.name: p.read_bytes() for p in whisper_dir.iterdir() if p.is_file()}
    fresh.add_repo("dl/tiny-whisper-ct2", {**whisper_files, "README.md": b"# tiny"})
    voice = {
        "en/tiny/voice.onnx": voice_path.read_bytes(),
        "en/tiny/voice.onnx.json": voice_path.with_name(voice_path.name + ".json").read_bytes(),
        "de/other/voice.onnx": b"another voice",
        "de/other/voice.onnx.json": b"{}",
    }
    fresh.add_repo("dl/voices", voice)
    stt = httpx.post(
        stack.url + "/v0/models/register",
        timeout=30,
        json={"repo": "dl/tiny-whisper-ct2", "name": "stt", "predownload": True},
    ).json()
    stack.registered.append("stt")
    assert stt["format"] == "ctranslate2" and sorted(f["path"] for f in stt["source"]["files"]) == sorted(whisper_files)
    tts = httpx.post(
        stack.url + "/v0/models/register",
        timeout=30,
        json={"repo": "dl/voices", "filename": "en/tiny/voice.onnx", "name": "tts", "predownload": True},
    ).json()
    stack.registered.append("tts")
    assert tts["format"] == "piper" and len(tts["source"]["files"]) == 2
    pipeline = {p.relative_to(sd_dir).as_posix(): p.read_bytes() for p in sd_dir.rglob("*") if p.is_file()}
    fresh.add_repo("dl/tiny-sd", pipeline)
    sd = httpx.post(
        stack.url + "/v0/models/register", timeout=30, json={"repo": "dl/tiny-sd", "name": "sd", "predownload": True}
    ).json()
    stack.registered.append("sd")
    assert sd["format"] == "diffusers" and len(sd["source"]["files"]) == len(pipeline)
    node = stack.start_node("n-files")
    wait_until(
        lambda: all(served_by(stack, m) == [node.node_id] for m in ("stt", "tts", "sd")), 60, message="all three served"
    )
    assert resolve_gets(fresh, "dl/tiny-whisper-ct2") == len(whisper_files)  # not the README
    assert resolve_gets(fresh, "dl/voices") == 2  # not the other voice
    speech = httpx.post(
        stack.url + "/v1/audio/speech",
        json={"model": "tts", "input": "hello there", "response_format": "wav"},
        timeout=60,
    )
    assert speech.status_code == 200 and speech.content[:4] == b"RIFF"
    from tiny_models import make_wav

    text = httpx.post(
        stack.url + "/v1/audio/transcriptions",
        data={"model": "stt"},
        timeout=60,
        files={"file": ("a.wav", make_wav(seconds=1.0), "audio/wav")},
    )
    assert text.status_code == 200, text.text
    image = httpx.post(
        stack.url + "/v1/images/generations",
        timeout=60,
        json={"model": "sd", "prompt": "a red square", "size": "64x64", "steps": 1},
    )
    assert image.status_code == 200, image.text
    node.stop()


def test_a_vision_gguf_repository_brings_its_projector(stack, fresh, tiny_gguf, tmp_path) -> None:
    import base64

    from tiny_models import build_tiny_mmproj, make_png

    projector = build_tiny_mmproj(tmp_path / "mmproj-model-f16.gguf").read_bytes()
    fresh.add_repo("dl/Vision-GGUF", {"model-Q8_0.gguf": content(fresh), "mmproj-model-f16.gguf": projector})
    record = register(stack, "seeing", repo="dl/Vision-GGUF", filename="model-Q8_0.gguf", predownload=True)
    assert "vision" in record["capabilities"] and record["source"]["projector"] == "mmproj-model-f16.gguf"
    assert record["size_bytes"] == len(content(fresh)) + len(projector)
    node = stack.start_node("n-vision")
    # This node serves it (in a full run another live node of the session may be placed it too).
    wait_until(lambda: node.node_id in served_by(stack, "seeing"), 45, message="vision model served")
    assert resolve_gets(fresh, "dl/Vision-GGUF") == 2
    image = "data:image/png;base64," + base64.b64encode(make_png(32, 32)).decode()
    answer = httpx.post(
        stack.url + "/v1/chat/completions",
        timeout=60,
        json={
            "model": "seeing",
            "max_tokens": 2,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is it?"},
                        {"type": "image_url", "image_url": {"url": image}},
                    ],
                }
            ],
        },
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] > 16  # the projector's 16 image tokens were used
    node.stop()


# ---------------------------------------------------------------- download now


def test_cli_download_all_follows_every_node_until_ready(stack, fresh) -> None:
    name = "download-now"
    register(stack, name, repo=BIG_REPO, filename=BIG_FILE)
    fresh.bytes_per_s = 6_000_000
    nodes = [stack.start_node(n) for n in ("n-cli-a", "n-cli-b")]
    result = _cli(stack, "download", name, "--all")
    assert result.returncode == 0, result.stderr + result.stdout
    for node in nodes:
        assert f"node {node.node_id}: done" in result.stdout
    assert f"{name} is ready on" in result.stdout
    assert sorted(served_by(stack, name)) == sorted(n.node_id for n in nodes)
    assert resolve_gets(fresh, BIG_REPO) == 2  # one per node: their caches are their own

    again = _cli(stack, "download", name, "--node", nodes[0].node_id)  # already there: done at once
    assert again.returncode == 0, again.stderr

    missing = _cli(stack, "download", "not-registered", "--all")
    assert missing.returncode == 1 and "not registered" in missing.stderr
    for node in nodes:
        node.stop()


def test_download_now_over_nats_and_http_reports_within_seconds(stack, fresh) -> None:
    name = "download-task"
    register(stack, name, repo=BIG_REPO, filename=BIG_FILE)
    fresh.bytes_per_s = 2_000_000
    node = stack.start_node("n-task")
    started = time.monotonic()
    answer = httpx.post(f"{stack.url}/v0/models/{name}/download", json={"node": node.node_id}, timeout=30)
    assert answer.status_code == 202, answer.text
    task = answer.json()["task"]
    assert task["nodes"][0]["state"] == "started"

    def running():
        report = httpx.get(f"{stack.url}/v0/downloads/{task['task_id']}").json()["progress"][node.node_id]
        return report and report["bytes_total"] == BIG_SIZE and report

    first = wait_until(running, 5, interval=0.05, message="first progress")
    assert time.monotonic() - started < 5 and first["task_id"] == task["task_id"]
    busy = wait_until(lambda: "is downloading (" in (r := chat(stack, name)).text and r, 5, message="503 with progress")
    assert busy.status_code == 503 and "%" in busy.json()["error"]["message"] and busy.headers["retry-after"]
    wait_until(lambda: served_by(stack, name) == [node.node_id], 20)

    unknown = httpx.post(f"{stack.url}/v0/models/{name}/download", json={"node": "no-such-node"})
    assert unknown.status_code == 404 and "no live node" in unknown.json()["error"]["message"]
    node.stop()


# ---------------------------------------------------------------- helpers


def _record(stack: Stack, name: str):
    import msgspec

    from events.messages import ModelRecord

    view = httpx.get(f"{stack.url}/v0/models/{name}").json()
    return msgspec.convert({k: view[k] for k in ModelRecord.__struct_fields__ if k in view}, ModelRecord)


def _progress(stack: Stack, name: str) -> list[dict]:
    return httpx.get(f"{stack.url}/v0/downloads", params={"model": name}).json()["data"]


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_router", "model", "--url", stack.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


async def _put_blob(nats_url: str, name: str, data: bytes) -> None:
    nc = await nats.connect(nats_url)
    try:
        await provision(nc.jetstream())  # when no component has yet (the test runs alone)
        store = await nc.jetstream().object_store(storage.OBJ_MODEL_BLOBS)
        await store.put(name, data)
    finally:
        await nc.close()


async def _order_many(nats_url: str, node_id: str, model: str, count: int) -> list[dict]:
    from events import subjects

    nc = await nats.connect(nats_url)
    try:
        subject = subjects.admin_node(node_id, subjects.NODE_DOWNLOAD)
        msgs = await asyncio.gather(
            *(
                nc.request(subject, json.dumps({"model": model, "task_id": f"t{i}"}).encode(), timeout=10)
                for i in range(count)
            )
        )
        return [json.loads(m.data) for m in msgs]
    finally:
        await nc.close()


async def _lease_holder(nats_url: str) -> str | None:
    """The node id holding a download lease, if any (``nats kv ls leases`` shows the same)."""
    from nats.js.errors import NoKeysError

    nc = await nats.connect(nats_url)
    try:
        leases = await nc.jetstream().key_value(storage.KV_LEASES)
        try:
            keys = await leases.keys()
        except NoKeysError:
            return None
        return (await leases.get(keys[0])).value.decode()
    finally:
        await nc.close()
