"""The registry hosts what only it can see: the file of a model registered by a path.

Registering by path needs the file under one of the registry's ``--model-root`` directories;
nodes on other machines cannot see it. So once a model is registered the registry puts its
file into the ``model-blobs`` object store (object ``<model token>/<file name>``, its SHA-256
computed by the store as it is written), and a node without the path fetches it from there
(nodes/resolution.py: after its own cache and shared dir, before any origin), with the
resume and digest check every object-store download has. Only once: an object of the same
name and size already there is kept, so a registry restart (which hosts every path model
not hosted yet) uploads nothing again. One file at a time, in the background: a registration
answers at once, and a multi-gigabyte upload does not compete with another.

Hosted: single-file GGUF models without a projector. A model folder (diffusers, CTranslate2),
a Piper voice (its .onnx.json beside it) or a vision model's projector are not yet: their
nodes still need the path (or a shared models dir).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext

from broker.blobs import artifact_name, blob_name, object_sha256, put_file
from events.messages import ModelRecord
from events.storage import OBJ_MODEL_BLOBS

log = structlog.get_logger("registry")


def hostable(record: ModelRecord) -> str | None:
    """Why the registry cannot host this model's files, or None when it can."""
    if record.source.kind != "path" or not record.source.path:
        return "not registered by path"
    if record.format != "gguf":
        return f"a {record.format} model is a folder or several files"
    if record.source.projector:
        return "its multimodal projector is a second file"
    return None


class Hosting:
    def __init__(self, nc: Client, js: JetStreamContext, current: Callable[[str], ModelRecord | None]) -> None:
        """``current(name)``: the registration now (a model deleted during its upload loses its object)."""
        self.nc = nc
        self.js = js
        self.current = current
        self.hosted: dict[str, str] = {}  # model: the object's sha256
        self._queue: asyncio.Queue[ModelRecord] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hosting")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def host(self, record: ModelRecord) -> None:
        """Put the model's file into the object store soon (no-op for what cannot be hosted)."""
        if hostable(record) is None:
            self._queue.put_nowait(record)

    async def _run(self) -> None:
        while True:
            record = await self._queue.get()
            try:
                await self._host(record)
            except Exception as exc:  # a file gone or unreadable, NATS down: logged, the model is still served by path
                log.error("model file not hosted", model=record.name, path=record.source.path, error=str(exc))

    async def _host(self, record: ModelRecord) -> None:
        path = Path(record.source.path or "")
        if not path.is_file() or path.stat().st_size != record.size_bytes:
            log.warning("model file not hosted: not the registered file", model=record.name, path=str(path))
            return
        name = blob_name(record.name, artifact_name(record) or path.name)
        started = time.perf_counter()
        info, written = await put_file(self.js, name, path, max_payload=self.nc.max_payload)
        now = self.current(record.name)
        if now is None or now.source != record.source:  # deleted (or registered anew) meanwhile
            await (await self.js.object_store(OBJ_MODEL_BLOBS)).delete(name)
            log.info("hosted file dropped: the model was deleted during its upload", model=record.name)
            return
        digest = object_sha256(info) if info is not None else None
        self.hosted[record.name] = digest or ""
        seconds = time.perf_counter() - started
        if written:
            log.info(
                "model file hosted",
                model=record.name,
                object=name,
                bytes=info.size,
                sha256=digest,
                seconds=round(seconds, 2),
                mb_per_s=round(info.size / 1e6 / seconds, 1) if seconds > 0 else None,
            )
