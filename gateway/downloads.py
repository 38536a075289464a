"""Downloads seen from HTTP: "download now", task progress, model files, and fetch-on-request.

* ``POST /v0/models/{model}/download`` ({"node": id} or {"all": true}; neither: one node)
  is the registry's ``admin.model.download``; the answer is the task with each node's reply.
* ``GET /v0/downloads/{task}`` and ``GET /v0/downloads?model=`` read the ``downloads``
  bucket, where nodes keep their latest progress report.
* ``GET /v0/models/blob/{model}[?file=PATH]`` serves the model's file (or one of its files)
  from the object store to HTTP clients, with Range requests, from a local spool named by the
  object's digest.
* :class:`OnDemand`: a request for a registered model that no node has asks the registry
  for a download once (requests arriving meanwhile share that answer), so the first
  request starts the fetch and a model found nowhere is reported at once.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from broker.blobs import artifact_name, blob_info, blob_name, object_sha256, read_blob
from broker.buckets import current_entries
from events import codec, encode_token, name_error, storage, subjects
from events.messages import DownloadModel, DownloadProgress, DownloadReply, DownloadTask, ModelRecord

from .errors import ApiError, model_not_found
from .http import json_response, parse_body

Ask = Callable[[str, Any, type], Awaitable[Any]]

ON_DEMAND_INTERVAL_S = 1.0  # requests within this long share one answer; later ones ask again
ON_DEMAND_TIMEOUT_S = 5.0


class DownloadRoutes:
    def __init__(self, js: JetStreamContext, catalog, ask: Ask, spool_dir: Path | None = None) -> None:
        self.js = js
        self.catalog = catalog
        self.ask = ask
        self.spool_dir = spool_dir or Path(tempfile.gettempdir()) / "llm-router-blobs"
        self._spooling: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        self.kv = await self.js.key_value(storage.KV_DOWNLOADS)

    async def download_now(self, request: Request) -> Response:
        name = request.path_params["model"]
        raw = await request.body()
        body: DownloadModel = parse_body(raw, DownloadModel) if raw.strip() else DownloadModel()
        body = msgspec.structs.replace(body, model=name)
        try:
            reply: DownloadReply = await self.ask(subjects.ADMIN_MODEL_DOWNLOAD, body, DownloadReply)
        except ApiError as exc:
            if exc.status == 404 and self.catalog.get(name) is None:
                raise model_not_found(name) from None
            raise
        return json_response({"task": reply.task, "message": reply.message}, status=reply.status)

    async def task(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        try:
            entry = await self.kv.get(storage.download_task_key(task_id))
        except KeyNotFoundError:
            raise ApiError(404, f"No download task {task_id!r}.", code="task_not_found") from None
        task = codec.decode(entry.value, DownloadTask)
        progress = {}
        for node in task.nodes:
            report = await self._progress(node.node_id, task.model)
            progress[node.node_id] = report
        return json_response({"task": task, "progress": progress})

    async def list(self, request: Request) -> Response:
        model = request.query_params.get("model")
        if model is not None and (why := name_error(model)):
            raise ApiError(400, why, param="model", code="invalid_model")  # it goes into a subject filter
        pattern = f"progress.*.{encode_token(model)}" if model else "progress.>"
        entries = await current_entries(self.js, storage.KV_DOWNLOADS, pattern)  # the latest of each key
        reports = [codec.decode(entry.value, DownloadProgress) for entry in entries]
        return json_response({"object": "list", "data": sorted(reports, key=lambda r: (r.model, r.node_id))})

    async def _progress(self, node_id: str, model: str) -> DownloadProgress | None:
        try:
            entry = await self.kv.get(storage.download_key(node_id, model))
        except KeyNotFoundError:
            return None
        return codec.decode(entry.value, DownloadProgress) if entry.value else None

    # ------------------------------------------------------------ model files over HTTP

    async def blob(self, request: Request) -> Response:
        name = request.path_params["model"]
        record = self.catalog.get(name)
        if record is None:
            raise model_not_found(name)
        filename = request.query_params.get("file") or artifact_name(record)
        known = {f.path for f in record.source.files} | {artifact_name(record)}
        if filename not in known:
            raise ApiError(
                404,
                f"Model '{name}' has no file {filename!r} (files: {', '.join(sorted(k for k in known if k))}).",
                param="file",
                code="blob_not_found",
            )
        info = await blob_info(self.js, blob_name(name, filename)) if filename else None
        if info is None:
            raise ApiError(404, f"Model '{name}' has no file {filename!r} in the object store.", code="blob_not_found")
        digest = object_sha256(info) or f"{info.nuid}"
        path = self.spool_dir / digest
        if not path.exists():
            task = self._spooling.get(digest)
            if task is None:
                task = self._spooling[digest] = asyncio.create_task(self._spool(info, path))
                task.add_done_callback(lambda _: self._spooling.pop(digest, None))
            await asyncio.shield(task)
        return FileResponse(
            path, filename=Path(filename).name, media_type="application/octet-stream", headers={"x-sha256": digest}
        )

    async def _spool(self, info, path: Path) -> None:
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        part = path.with_name(path.name + f".{os.getpid()}.part")
        try:
            with open(part, "wb") as fh:
                await read_blob(self.js, info, fh)
        except BaseException:
            await asyncio.to_thread(part.unlink, missing_ok=True)  # reserved to its full size: not left behind
            raise
        os.replace(part, path)


class OnDemand:
    """Asks for a download when a request needs a model that no node has; one ask at a time."""

    def __init__(self, ask: Ask) -> None:
        self.ask = ask
        self._asks: dict[str, tuple[float, asyncio.Task]] = {}

    async def error_for(self, record: ModelRecord, fallback: ApiError) -> ApiError:
        """The error a request gets while the model is not served: 503 with what is happening,
        or 404 when no source has the model."""
        if record.state == "downloading":
            return fallback
        now = time.monotonic()
        asked = self._asks.get(record.name)
        if asked is None or now - asked[0] > ON_DEMAND_INTERVAL_S:
            asked = (now, asyncio.create_task(self._ask(record, fallback)))
            self._asks[record.name] = asked
        return await asyncio.shield(asked[1])

    async def _ask(self, record: ModelRecord, fallback: ApiError) -> ApiError:
        try:
            reply: DownloadReply = await asyncio.wait_for(
                self.ask(subjects.ADMIN_MODEL_DOWNLOAD, DownloadModel(model=record.name), DownloadReply),
                ON_DEMAND_TIMEOUT_S,
            )
        except ApiError as exc:
            if exc.status == 404:
                return ApiError(
                    404,
                    f"Model '{record.name}' is registered but was not found anywhere: {exc.message}",
                    param="model",
                    code="model_not_found",
                )
            return ApiError(
                503,
                f"Model '{record.name}' is not loaded on any node: {exc.message}",
                code="model_unavailable",
                headers={"Retry-After": "10"},
            )
        except TimeoutError:
            return fallback
        if reply.status == 202:
            return ApiError(
                503,
                f"Model '{record.name}' is not loaded yet; {reply.message}. Retry shortly.",
                code="model_downloading",
                headers={"Retry-After": "5"},
            )
        return fallback
