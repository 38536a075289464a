"""Model files hosted in the registry's object store (``model-blobs``), read with resume.

An object is named ``<model token>/<file>`` so the registry can delete every object of a
model by prefix. nats-py's ``ObjectStore.get`` cannot start in the middle of an object, and
without ``writeinto`` it is quadratic in size, so files are read here from the object's chunk
subject with an ordered consumer: each chunk is written as it arrives, and the stream
sequence of the next chunk is handed to the caller, who records it next to its ``.part``
file. After a crash the read restarts at that sequence, not at byte 0.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import BinaryIO

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, ObjectInfo
from nats.js.errors import NotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_STREAM_TEMPLATE

from events import encode_token
from events.messages import ModelRecord
from events.storage import OBJ_MODEL_BLOBS

CHUNK_IDLE_TIMEOUT_S = 30.0
WRITE_BATCH_BYTES = 2 * 1024 * 1024


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
    bucket: str = OBJ_MODEL_BLOBS,
) -> None:
    """Write the object's bytes from ``resume`` on into ``out`` (positioned at ``resume.offset``).

    ``on_chunk(n, point)`` runs after each write, in the writer thread (so it may do file I/O
    of its own, e.g. record the point), with the new resume point; chunks are written in
    batches of about WRITE_BATCH_BYTES. What it raises ends the read. Raises BlobCorrupt
    when the object changed since ``resume`` was taken or the chunks do not add up.
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
    sub = await js.subscribe(
        subject, stream=OBJ_STREAM_TEMPLATE.format(bucket=bucket), ordered_consumer=True, config=config
    )
    loop = asyncio.get_running_loop()
    pending: list[bytes] = []
    pending_bytes = 0
    try:
        while point.offset + pending_bytes < info.size:
            msg = await sub.next_msg(timeout=CHUNK_IDLE_TIMEOUT_S)
            pending.append(msg.data)
            pending_bytes += len(msg.data)
            meta = msg.metadata
            last = meta.num_pending == 0
            if pending_bytes >= WRITE_BATCH_BYTES or last or point.offset + pending_bytes >= info.size:
                # One thread hop per batch, not per 128 KiB chunk as nats-py's get() does.
                point.offset += pending_bytes
                point.next_seq = meta.sequence.stream + 1
                batch, pending, pending_bytes = b"".join(pending), [], 0
                await loop.run_in_executor(None, _write, out, batch, on_chunk, replace(point))
            if last:
                break
    finally:
        await sub.unsubscribe()
    if point.offset != info.size:
        raise BlobCorrupt(f"object {info.name}: read {point.offset} bytes, expected {info.size}")


def _write(
    out: BinaryIO, batch: bytes, on_chunk: Callable[[int, ResumePoint], None] | None, point: ResumePoint
) -> None:
    out.write(batch)
    if on_chunk is not None:
        on_chunk(len(batch), point)


def file_sha256(path, chunk: int = 4 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
