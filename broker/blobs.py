"""Model files hosted in the object store (``model-blobs``): written once, read with resume.

An object is named ``<model token>/<file>`` so the registry can delete every object of a
model by prefix. Two writers put files there (:func:`put_file`): the registry, for a model
registered by a path only it can see, and a node, for a file it fetched from the origin (so
the next node fetches it over NATS). Chunks are 1 MiB less 4 KiB (nats-py's default is 128 KiB): eight
times fewer messages to store, send and parse for the same bytes.

nats-py's ``ObjectStore.get`` cannot start in the middle of an object, and without
``writeinto`` it is quadratic in size, so files are read here from the object's chunk
subject with an ordered consumer: chunks are collected in the subscription's callback (no
per-message wait) and written in batches, without joining them first; the stream sequence of
the next chunk is handed to the caller, who records it next to its ``.part`` file. After a
crash the read restarts at that sequence, not at byte 0.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import errno
import hashlib
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import structlog
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, ObjectInfo, ObjectMeta, ObjectMetaOptions
from nats.js.errors import NotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_STREAM_TEMPLATE

from events import encode_token
from events.messages import ModelRecord
from events.storage import OBJ_MODEL_BLOBS

log = structlog.get_logger("broker.blobs")

CHUNK_IDLE_TIMEOUT_S = 30.0
WRITE_BATCH_BYTES = 8 * 1024 * 1024
# A file being read is synced every this many bytes, beside the receive, so the fsync that makes
# it durable at the end finds little left to write (it was most of a plain copy's time here).
WRITEBACK_BYTES = 32 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024  # at most: below the server's max_payload (1 MiB by default) with the headers
HEADER_ROOM = 4096
# nats-server copies a stored message into a buffer of its size rounded up to Go's 8 KiB pages
# and then appends CR LF to it: a chunk of a whole number of pages (1 MiB exactly) is copied a
# second time, into a new buffer, on every delivery (30% more server CPU per read, measured).
_GO_PAGE = 8192


def artifact_name(record: ModelRecord) -> str | None:
    """The model's file name: in a node's model directory, and in the object store."""
    if record.source.kind == "path":
        return PurePosixPath(record.source.path).name if record.source.path else None
    filename = record.source.filename
    if not filename:
        return None
    relative = PurePosixPath(filename)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    return filename


def blob_name(model: str, filename: str) -> str:
    """The object holding ``filename`` of ``model``."""
    return f"{encode_token(model)}/{filename}"


def blob_prefix(model: str) -> str:
    return encode_token(model) + "/"


def object_sha256(info: ObjectInfo) -> str | None:
    """The object's SHA-256 as lower-case hex (the store keeps it as ``SHA-256=<base64url>``)."""
    digest = info.digest or ""
    if not digest.upper().startswith("SHA-256="):
        return None
    raw = digest.split("=", 1)[1]
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()


class BlobCorrupt(RuntimeError):
    pass


@dataclass
class ResumePoint:
    """Where a partial read stopped: bytes already written and the next chunk's stream sequence."""

    nuid: str
    offset: int = 0
    next_seq: int = 0


async def blob_info(js: JetStreamContext, name: str, bucket: str = OBJ_MODEL_BLOBS) -> ObjectInfo | None:
    store = await js.object_store(bucket)
    try:
        info = await store.get_info(name)
    except NotFoundError:
        return None
    return None if info.deleted else info


async def read_blob(
    js: JetStreamContext,
    info: ObjectInfo,
    out: BinaryIO,
    *,
    resume: ResumePoint | None = None,
    on_chunk: Callable[[int, ResumePoint], None] | None = None,
    on_synced: Callable[[ResumePoint], None] | None = None,
    bucket: str = OBJ_MODEL_BLOBS,
    digest: Any = None,
) -> None:
    """Write the object's bytes from ``resume`` on into ``out`` (positioned at ``resume.offset``).

    A file is given its full size first (:func:`_preallocate`) and synced every
    WRITEBACK_BYTES. Chunks are written in batches of about WRITE_BATCH_BYTES;
    ``on_chunk(n, point)`` runs after each write, in the writer thread, with the new resume
    point (progress; what it raises ends the read). ``on_synced(point)`` runs, in the syncing
    thread, once the bytes before ``point`` are on disk: the point to record for a resume (a
    point recorded before its bytes are synced could be resumed past zeros after a crash).
    Raises BlobCorrupt when the object changed since ``resume`` was taken or the chunks do not
    add up. ``digest`` (a hashlib object holding what is before ``resume.offset``): updated with
    every chunk, in a thread beside the writer's and in order, so checking the file costs no
    second read of it. When the read returns or raises, no thread of it is still running.
    """
    point = ResumePoint(nuid=info.nuid, offset=0, next_seq=0)
    if resume is not None and resume.nuid == info.nuid and resume.next_seq > 0:
        point = ResumePoint(nuid=info.nuid, offset=resume.offset, next_seq=resume.next_seq)
    if point.offset >= info.size:
        return
    subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid)
    if point.next_seq:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=point.next_seq)
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    loop = asyncio.get_running_loop()
    fd = _fileno(out)
    if fd is not None:  # before subscribing: a disk too small fails with nothing to clean up
        await _settled(loop.run_in_executor(None, _preallocate, fd, point.offset, info.size - point.offset, info.name))
    # Bounded: a disk slower than the network holds the callback, then nats-py's pending
    # limit, then the server's flow control; memory stays at a few batches.
    batches: asyncio.Queue = asyncio.Queue(maxsize=4)
    pending: list[bytes] = []
    state = {"received": point.offset, "pending": 0}

    async def on_msg(msg) -> None:  # in nats-py's dispatch task, in stream order
        if state["received"] >= info.size:
            return
        pending.append(msg.data)
        state["received"] += len(msg.data)
        state["pending"] += len(msg.data)
        meta = msg.metadata
        last = meta.num_pending == 0 or state["received"] >= info.size
        if state["pending"] >= WRITE_BATCH_BYTES or last:
            await batches.put((list(pending), state["pending"], meta.sequence.stream + 1, last))
            pending.clear()
            state["pending"] = 0

    unsynced = 0
    jobs: dict[str, asyncio.Future | None] = {"write": None, "sync": None, "hash": None}
    sub = await js.subscribe(
        subject, stream=OBJ_STREAM_TEMPLATE.format(bucket=bucket), ordered_consumer=True, config=config, cb=on_msg
    )
    try:
        while True:
            try:
                chunks, size, next_seq, last = await asyncio.wait_for(batches.get(), CHUNK_IDLE_TIMEOUT_S)
            except TimeoutError:
                raise BlobCorrupt(
                    f"object {info.name}: no chunk for {CHUNK_IDLE_TIMEOUT_S:g} s at byte {point.offset} of {info.size}"
                ) from None
            point.offset += size
            point.next_seq = next_seq
            # One thread hop per batch, the chunks written as they came (no joined copy); the
            # hash of a batch runs in a thread of its own beside the write (in order: one at a time).
            if digest is not None:
                if jobs["hash"] is not None:
                    await _settled(jobs["hash"])
                jobs["hash"] = loop.run_in_executor(None, _hash, digest, chunks)
            jobs["write"] = loop.run_in_executor(None, _write, out, chunks, on_chunk, replace(point))
            await _settled(jobs["write"])
            unsynced += size
            syncing = jobs["sync"]
            if fd is not None and unsynced >= WRITEBACK_BYTES and (syncing is None or syncing.done()):
                if syncing is not None:
                    syncing.result()  # a disk error ends the read
                jobs["sync"] = loop.run_in_executor(None, _sync, fd, on_synced, replace(point))
                unsynced = 0
            if last:
                break
        for job in (jobs["sync"], jobs["hash"]):
            if job is not None:
                await _settled(job)  # a disk error ends the read
    except BaseException as failure:
        # Done before the caller may close the file or use the digest; the first error is the one raised.
        for what, job in jobs.items():
            if job is None:
                continue
            await asyncio.wait([job])
            late = None if job.cancelled() else job.exception()
            if late is not None and late is not failure:
                log.warning("a job of a failed object read failed too", job=what, object=info.name, error=str(late))
        raise
    finally:
        await sub.unsubscribe()
    if point.offset != info.size:
        raise BlobCorrupt(f"object {info.name}: read {point.offset} bytes, expected {info.size}")


async def _settled(job: asyncio.Future) -> Any:
    """The result of a job in a thread. Awaited through ``wait``: cancelling the caller leaves
    the job's future alone (its thread runs on anyway), so it can still be waited for."""
    await asyncio.wait([job])
    return job.result()


def _sync(fd: int, on_synced: Callable[[ResumePoint], None] | None, point: ResumePoint) -> None:
    _datasync(fd)
    if on_synced is not None:
        on_synced(point)


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
_CANNOT_PREALLOCATE = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.ESPIPE, errno.ENODEV})


def _linux_fallocate() -> Callable[[int, int, int, int], int] | None:
    """Linux's fallocate(2), which fails where a filesystem cannot reserve blocks. glibc's
    ``posix_fallocate`` (``os.posix_fallocate``) would instead write a byte into every 4 KiB
    block: a million small writes for a 4 GiB model on NFSv3, before its first byte."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return call


_FALLOCATE = _linux_fallocate()


def _preallocate(fd: int, offset: int, length: int, name: str) -> None:
    """Reserve the rest of the file's blocks before writing them: a disk too small for the
    object fails now (ENOSPC), not gigabytes later, and the writes find their blocks allocated
    (ext4 then skips its per-page delayed allocation: 20% less reader CPU, bench/downloads.py).
    The file has its full size from here on: how much is written is the resume point's offset.
    Where the filesystem cannot (or off Linux), the read goes on without."""
    if length <= 0 or _FALLOCATE is None:
        return
    if _FALLOCATE(fd, 0, offset, length) == 0:
        return
    code = ctypes.get_errno()
    if code not in _CANNOT_PREALLOCATE:
        raise OSError(code, os.strerror(code))
    log.info("object read without preallocation", object=name, error=os.strerror(code))


def _fileno(out: BinaryIO) -> int | None:
    """The file descriptor behind ``out``, when it is a file (not e.g. a BytesIO)."""
    try:
        return out.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _hash(digest: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:  # hashlib releases the GIL for large buffers: receiving goes on
        digest.update(chunk)


def _write(
    out: BinaryIO, chunks: list[bytes], on_chunk: Callable[[int, ResumePoint], None] | None, point: ResumePoint
) -> None:
    out.writelines(chunks)
    if on_chunk is not None:
        on_chunk(sum(len(c) for c in chunks), point)


def chunk_size(max_payload: int) -> int:
    """The chunk size for a server that accepts messages of ``max_payload`` bytes."""
    size = max(64 * 1024, min(CHUNK_BYTES, max_payload - HEADER_ROOM))
    return size - _GO_PAGE // 2 if -size % _GO_PAGE < 2 else size  # room for the CR LF


async def put_file(
    js: JetStreamContext, name: str, path, *, max_payload: int, replace: bool = True, bucket: str = OBJ_MODEL_BLOBS
) -> tuple[ObjectInfo | None, bool]:
    """Store the file at ``path`` as object ``name``, unless an object of that name and size
    is there already: (its info, whether it was written now). The store computes its SHA-256
    (``object_sha256``) as it goes. ``replace=False`` (a node, which may not purge the old
    chunks): an object of that name there already, whatever its size, is left alone (None, False)."""
    size = Path(path).stat().st_size
    existing = await blob_info(js, name, bucket)
    if existing is not None and existing.size == size:
        return existing, False
    if existing is not None and not replace:
        return None, False
    store = await js.object_store(bucket)
    meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk_size(max_payload)))
    with open(path, "rb") as fh:  # nats-py reads it in a worker thread, chunk by chunk
        info = await store.put(name, fh, meta=meta)
    return info, True


def file_sha256(path, chunk: int = 4 * 1024 * 1024, *, limit: int | None = None, digest: Any = None) -> str:
    """The SHA-256 of the file (of its first ``limit`` bytes), into ``digest`` when given."""
    digest = digest if digest is not None else hashlib.sha256()
    left = limit
    with open(path, "rb") as fh:
        while block := fh.read(chunk if left is None else min(chunk, left)):
            digest.update(block)
            if left is not None:
                left -= len(block)
                if left <= 0:
                    break
    return digest.hexdigest()
