"""Model downloads on a node: one per model, resumable, reported every half second.

A download writes ``<file>.part`` and ``<file>.part.json`` (where the bytes come from, and for
the object store the stream sequence to continue at), checks size and sha256, and only then
renames the file into place, so a partial file is never loaded. A node that crashed resumes
from what its ``.part`` holds. Downloads into a shared models dir take a lease in the
``leases`` bucket first: the other nodes wait for the holder and use its file, or take the
lease over (and its ``.part``) when the holder stops renewing it.

A model fetched from the origin is then put into the object store (``share``, on by default;
``--no-share-downloads`` turns it off), unless an object of that name is there already: the
next node fetches it over NATS, so a cluster downloads it from the origin once.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog
from huggingface_hub import constants as hf_constants
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from tqdm.auto import tqdm

from broker.blobs import ResumePoint, blob_name, file_sha256, put_file, read_blob
from events import codec, encode_token, storage, subjects
from events.messages import DownloadProgress, LoadedModel, ModelRecord
from formats.artifacts import artifact_size

from . import cache
from .resolution import Location, ModelNotFound, RemoteFile, Resolver, SourceUnavailable

log = structlog.get_logger("node")

REPORT_INTERVAL_S = 0.5
# http_get reads the body in DOWNLOAD_CHUNK_SIZE pieces (10 MiB by default) and writes each one
# whole: smaller pieces make progress reports fine-grained and lose less on a crash.
hf_constants.DOWNLOAD_CHUNK_SIZE = 128 * 1024
LEASE_POLL_S = 0.5


class DownloadFailed(Exception):
    pass


def new_task_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Download:
    record: ModelRecord
    location: Location
    task_id: str
    started: float = field(default_factory=time.monotonic)
    done: int = 0  # bytes of all its files
    base: int = 0  # bytes of the files finished before the one being fetched
    cancelled: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task | None = None
    _samples: deque = field(default_factory=lambda: deque(maxlen=12))

    @property
    def total(self) -> int:
        return self.location.size or self.record.size_bytes

    def progress(self, node_id: str, state: str = "running", error: str | None = None) -> DownloadProgress:
        now = time.monotonic()
        self._samples.append((now, self.done))
        first_t, first_done = self._samples[0]
        speed = (self.done - first_done) / (now - first_t) if now - first_t > 0.2 else 0.0
        left = max(self.total - self.done, 0)
        return DownloadProgress(
            node_id=node_id,
            model=self.record.name,
            state=state,
            bytes_done=self.done,
            bytes_total=self.total,
            speed_bps=round(speed, 1),
            eta_s=round(left / speed, 1) if speed > 0 and state == "running" else None,
            error=error,
            task_id=self.task_id,
            source=self.location.source,
        )


class _Sink:
    """The ``.part`` file as huggingface_hub's http_get sees it: counts bytes, stops when told."""

    def __init__(self, fh: BinaryIO, download: Download) -> None:
        self.fh = fh
        self.download = download

    def write(self, data: bytes) -> int:
        if self.download.cancelled.is_set():
            raise DownloadFailed("cancelled")
        written = self.fh.write(data)
        self.download.done += len(data)
        return written

    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        if size is None:
            size = self.fh.tell()
        self.download.done = self.download.base + size
        return self.fh.truncate(size)


class _Quiet(tqdm):
    """No progress bar in node logs: progress goes to NATS instead."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


@dataclass(eq=False)
class Downloads:
    """The node's downloads; ``on_complete`` is called with each model once its download is done.

    ``share``: put what came from the origin into the object store for the other nodes."""

    nc: Client
    js: JetStreamContext
    node_id: str
    resolver: Resolver
    on_complete: Callable[[ModelRecord], Awaitable[None]]
    share: bool = True
    running: dict[str, Download] = field(default_factory=dict, init=False)
    failed: dict[str, tuple[ModelRecord, str]] = field(default_factory=dict, init=False)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False)

    async def start(self) -> None:
        self.kv = await self.js.key_value(storage.KV_DOWNLOADS)
        self.leases = await self.js.key_value(storage.KV_LEASES)

    async def stop(self) -> None:
        for name in list(self.running):
            await self.cancel(name, reason="node stopping")

    # ------------------------------------------------------------ public

    async def ensure(self, record: ModelRecord, task_id: str | None = None) -> tuple[str, Download | Location]:
        """Make sure the model is here or on its way: ("present", location), ("running" | "started", download).

        Raises ModelNotFound or SourceUnavailable, after recording the failure for the heartbeat.
        """
        lock = self._locks.setdefault(record.name, asyncio.Lock())
        async with lock:
            running = self.running.get(record.name)
            if running is not None:
                return "running", running
            try:
                location = await self.resolver.locate(record)
            except (ModelNotFound, SourceUnavailable) as exc:
                self.failed[record.name] = (record, str(exc))
                await self._publish(
                    DownloadProgress(
                        node_id=self.node_id,
                        model=record.name,
                        state="failed",
                        error=str(exc),
                        task_id=task_id,
                        bytes_total=record.size_bytes,
                    )
                )
                raise
            self.failed.pop(record.name, None)
            if location.local:
                return "present", location
            download = Download(record, location, task_id or new_task_id())
            self.running[record.name] = download
            download.task = asyncio.create_task(self._run(download), name=f"download:{record.name}")
            log.info("download started", model=record.name, source=location.source, task_id=download.task_id)
            return "started", download

    async def report_present(self, record: ModelRecord, location: Location, task_id: str | None) -> None:
        """A "download now" for a file already here ends at once, as a finished download."""
        size = await asyncio.to_thread(artifact_size, location.path)
        await self._publish(
            DownloadProgress(
                node_id=self.node_id,
                model=record.name,
                state="done",
                bytes_done=size,
                bytes_total=size,
                task_id=task_id,
                source=location.source,
            )
        )

    async def cancel(self, name: str, *, reason: str) -> None:
        self.failed.pop(name, None)
        download = self.running.get(name)
        if download is None or download.task is None:
            return
        download.cancelled.set()
        download.task.cancel()
        try:
            await download.task
        except asyncio.CancelledError:
            log.info("download cancelled", model=name, reason=reason)

    def reports(self) -> list[LoadedModel]:
        """Heartbeat entries: downloads in progress and failures."""
        entries = [
            LoadedModel(
                name=d.record.name,
                runtime=d.record.runtime,
                capabilities=d.record.capabilities,
                state="downloading",
                artifact_path=str(d.location.path),
                artifact_bytes=d.done,
            )
            for d in self.running.values()
        ]
        entries += [
            LoadedModel(name=name, runtime=record.runtime, capabilities=record.capabilities, state="error", error=why)
            for name, (record, why) in self.failed.items()
            if name not in self.running
        ]
        return entries

    # ------------------------------------------------------------ one download

    async def _run(self, download: Download) -> None:
        record = download.record
        reporter = asyncio.create_task(self._report_loop(download))
        try:
            if download.location.into_shared:
                await self._shared(download)
            else:
                await self._fetch(download)
        except asyncio.CancelledError:
            await self._publish(download.progress(self.node_id, "failed", "cancelled"))
            raise
        except Exception as exc:
            reason = f"download from {download.location.source} failed: {exc}"
            log.error("download failed", model=record.name, error=reason)
            self.failed[record.name] = (record, reason)
            await self._publish(download.progress(self.node_id, "failed", reason))
            return
        finally:
            reporter.cancel()
            self.running.pop(record.name, None)
        download.done = download.total
        await self._publish(download.progress(self.node_id, "done"))
        log.info(
            "download finished",
            model=record.name,
            path=str(download.location.path),
            seconds=round(time.monotonic() - download.started, 2),
        )
        await self.on_complete(record)
        if self.share and download.location.kind == "origin":
            await self._share(download)

    async def _share(self, download: Download) -> None:
        """Put the files fetched from the origin into the object store, each unless it is there."""
        for remote in download.location.files:
            name = blob_name(download.record.name, remote.name)
            try:
                info, written = await put_file(
                    self.js, name, remote.target, max_payload=self.nc.max_payload, replace=False
                )
            except Exception as exc:  # the next node then fetches from the origin too; nothing else is lost
                log.warning("download not shared", model=download.record.name, file=remote.name, error=str(exc))
                return
            if written:
                log.info("download shared", model=download.record.name, object=name, bytes=info.size)

    async def _report_loop(self, download: Download) -> None:
        while True:
            await self._publish(download.progress(self.node_id))
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _publish(self, progress: DownloadProgress) -> None:
        data = codec.encode(progress)
        try:
            await self.nc.publish(subjects.downloads_progress(self.node_id, progress.model), data)
            await self.kv.put(storage.download_key(self.node_id, progress.model), data)
        except Exception as exc:  # a NATS hiccup must not fail the download itself
            log.warning("progress not published", model=progress.model, error=str(exc))

    async def _shared(self, download: Download) -> None:
        """Download into the shared dir under a lease, or wait for the node that holds it."""
        shared, record = self.resolver.shared_dir, download.record
        key = encode_token(f"{await asyncio.to_thread(self.resolver.share_id)}:{record.name}")
        while True:
            if await asyncio.to_thread(cache.missing, shared, record) is None:
                return  # another node finished it
            try:
                revision = await self.leases.create(key, self.node_id.encode())
                break
            except KeyWrongLastSequenceError:
                download.done = await asyncio.to_thread(_bytes_on_disk, download.location)
                await asyncio.sleep(LEASE_POLL_S)
        renew = asyncio.create_task(self._renew(key, revision, asyncio.current_task()))
        try:
            if await asyncio.to_thread(cache.missing, shared, record) is not None:
                await self._fetch(download)
        finally:
            renew.cancel()
            try:
                await self.leases.delete(key)
            except Exception as exc:  # the TTL frees it anyway
                log.warning("lease not released", model=download.record.name, error=str(exc))

    async def _renew(self, key: str, revision: int, holder: asyncio.Task | None) -> None:
        while True:
            await asyncio.sleep(storage.LEASE_TTL_S / 3)
            try:
                revision = await self.leases.update(key, self.node_id.encode(), last=revision)
            except Exception as exc:
                log.error("download lease lost", key=key, error=str(exc))
                if holder is not None:
                    holder.cancel()  # someone else may be writing the same .part now
                return

    # ------------------------------------------------------------ fetching

    async def _fetch(self, download: Download) -> None:
        """Each file in turn; a file already complete (a crash between two files) is kept."""
        completed = 0
        for remote in download.location.files:
            if await asyncio.to_thread(cache.file_problem, remote.target, remote.size, remote.sha256) is None:
                completed += remote.size
                download.done = completed
                continue
            await asyncio.to_thread(remote.target.parent.mkdir, parents=True, exist_ok=True)
            part, journal = cache.part_path(remote.target), cache.journal_path(remote.target)
            download.base = completed
            if download.location.kind == "object_store":
                await self._from_object_store(download, remote, part, journal)
            elif download.location.kind == "origin":
                await self._from_origin(download, remote, part, journal)
            else:
                raise DownloadFailed(f"nothing to download from {download.location.kind}")
            await asyncio.to_thread(_finish, remote, part, journal)
            completed += remote.size
            download.done = completed

    async def _from_object_store(self, download: Download, remote: RemoteFile, part: Path, journal: Path) -> None:
        """Continue at the chunk sequence the journal recorded, when it is for this very object."""
        info = remote.blob
        assert info is not None
        ident = {"origin": "object_store", "name": info.name, "nuid": info.nuid, "size": info.size}

        def open_part() -> tuple[BinaryIO, ResumePoint | None]:
            seen = _read_journal(journal)
            resume = None
            if (
                seen.get("ident") == ident
                and part.exists()
                and seen.get("next_seq")
                and seen.get("offset", 0) <= part.stat().st_size
            ):
                resume = ResumePoint(nuid=info.nuid, offset=seen["offset"], next_seq=seen["next_seq"])
            offset = resume.offset if resume else 0
            _write_journal(journal, {"ident": ident, "offset": offset, "next_seq": resume.next_seq if resume else 0})
            fh = open(part, "r+b" if part.exists() else "w+b")
            fh.truncate(offset)
            fh.seek(offset)
            return fh, resume

        fh, resume = await asyncio.to_thread(open_part)
        download.done = download.base + (resume.offset if resume else 0)
        remote.received_sha256 = None
        digest = hashlib.sha256()  # hashed as it is written: no second read of the file
        if resume:
            await asyncio.to_thread(file_sha256, part, limit=resume.offset, digest=digest)
        if resume:
            log.info("download resumed", model=download.record.name, file=remote.name, offset=resume.offset)

        def on_chunk(n: int, point: ResumePoint) -> None:  # in the writer thread, after each write
            download.done = download.base + point.offset
            if download.cancelled.is_set():
                raise DownloadFailed("cancelled")

        def on_synced(point: ResumePoint) -> None:  # its bytes are on disk: safe to resume from
            _write_journal(journal, {"ident": ident, "offset": point.offset, "next_seq": point.next_seq})

        try:
            await read_blob(self.js, info, fh, resume=resume, on_chunk=on_chunk, on_synced=on_synced, digest=digest)
        finally:
            await asyncio.to_thread(fh.close)
        remote.received_sha256 = digest.hexdigest()

    async def _from_origin(self, download: Download, remote: RemoteFile, part: Path, journal: Path) -> None:
        """Continue with a ranged GET when the journal is for the same URL, ETag and size."""
        ident = {"origin": remote.url, "etag": remote.etag, "size": remote.size}

        def get() -> None:
            seen = _read_journal(journal)
            resume = part.stat().st_size if seen.get("ident") == ident and part.exists() else 0
            if remote.size and resume > remote.size:
                resume = 0
            with open(part, "r+b" if part.exists() else "w+b") as fh:
                fh.truncate(resume)  # before the journal says origin: what is left is the origin's
                _write_journal(journal, {"ident": ident})
                fh.seek(resume)
                download.done = download.base + resume
                if resume:
                    log.info("download resumed", model=download.record.name, file=remote.name, offset=resume)
                http_get(
                    remote.url,
                    _Sink(fh, download),
                    resume_size=resume,
                    headers=build_hf_headers(),
                    expected_size=remote.size or None,
                    displayed_filename=part.name,
                    tqdm_class=_Quiet,
                )

        await asyncio.to_thread(get)


def _finish(remote: RemoteFile, part: Path, journal: Path) -> None:
    """Check size and digest of the ``.part``, then rename it into place (blocking)."""
    size = part.stat().st_size
    if remote.size and size != remote.size:
        raise DownloadFailed(f"{remote.name}: got {size} bytes, expected {remote.size}")
    if remote.sha256:
        actual = remote.received_sha256 or file_sha256(part)
        if actual != remote.sha256.lower():
            part.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
            raise DownloadFailed(
                f"{remote.name}: sha256 mismatch ({actual[:12]}…, expected {remote.sha256.lower()[:12]}…); partial file discarded"
            )
    _durable(part)
    os.replace(part, remote.target)
    try:
        _durable(remote.target.parent)  # the rename itself
    except OSError as exc:  # some network filesystems cannot sync a directory: the file is in place
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
        log.info("directory not synced after a download", path=str(remote.target.parent), error=str(exc))
    journal.unlink(missing_ok=True)
    if remote.sha256:
        cache.mark_verified(remote.target, remote.sha256)


def _durable(path: Path) -> None:
    """fsync a file or directory: a model file renamed into place (and marked verified) must not
    come back after a power loss as a truncated file under its final name. Cheap after an
    object-store read, which syncs as it writes (``broker.blobs.WRITEBACK_BYTES``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bytes_on_disk(location: Location) -> int:
    """What another node's download into the shared dir has written so far: a file in place,
    or a ``.part``: its journal's offset for an object-store read (the file has its full size
    from the start, ``broker.blobs._preallocate``), its size for an origin download."""
    done = 0
    for remote in location.files:
        part = cache.part_path(remote.target)
        if remote.target.exists():
            done += remote.target.stat().st_size
        elif part.exists():
            offset = _read_journal(cache.journal_path(remote.target)).get("offset")
            done += offset if isinstance(offset, int) else part.stat().st_size
    return done


def _read_journal(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_journal(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)
