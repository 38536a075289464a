"""The model registry: the only writer of the ``models`` KV bucket and of model events.

Admin requests arrive on ``admin.model.*`` (request/reply, queue group ``registry``). Every
change to a registration is a KV write followed by an event on REGISTRY_EVENTS, so nodes can
either watch state or replay events. Node heartbeats drive the lifecycle: a registration
becomes ``ready`` once a node reports a non-empty artifact for it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError

from broker import connect, provision
from events import codec, encode_token, storage, subjects
from events.messages import AdminReply, DeleteModel, ModelEvent, ModelRecord, ModelSource, NodeHeartbeat, RegisterModel

from .artifacts import UnrecognisedModel, detect

log = structlog.get_logger("registry")

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f]|\.\.")


def check_model_name(name: str) -> str | None:
    """Why ``name`` cannot be a model name, or None. Names are matched exactly, case-sensitively."""
    if not name or not name.strip():
        return "model name must not be empty"
    if len(name) > 256:
        return "model name is longer than 256 characters"
    if _BAD_NAME.search(name) or name != name.strip():
        return f"model name {name!r} contains control characters, '..' or surrounding spaces"
    return None


class Registry:
    def __init__(self, *, nats_url: str | None) -> None:
        self.nats_url = nats_url
        self._subs: list = []
        self._known_ready: set[str] = set()  # spares a KV read per heartbeat

    async def start(self) -> None:
        self.nc = await connect(self.nats_url, name="registry")
        self.js = self.nc.jetstream()
        await provision(self.js)
        self.kv = await self.js.key_value(storage.KV_MODELS)
        for subject, handler in (
            (subjects.ADMIN_MODEL_REGISTER, self._on_register),
            (subjects.ADMIN_MODEL_DELETE, self._on_delete),
        ):
            self._subs.append(await self.nc.subscribe(subject, queue="registry", cb=handler))
        self._subs.append(await self.nc.subscribe(subjects.NODE_HEARTBEAT_ALL, cb=self._on_heartbeat))
        log.info("registry started")

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        await self.nc.drain()

    # ------------------------------------------------------------ state

    async def get(self, name: str) -> tuple[ModelRecord, int] | None:
        try:
            entry = await self.kv.get(encode_token(name))
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return codec.decode(entry.value, ModelRecord), entry.revision

    async def list(self) -> list[ModelRecord]:
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return []
        found = []
        for key in keys:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value:
                found.append(codec.decode(entry.value, ModelRecord))
        return found

    async def _emit(self, event: str, name: str, record: ModelRecord | None) -> None:
        await self.js.publish(subjects.MODEL_EVENTS[event], codec.encode(ModelEvent(event=event, name=name, record=record)))

    # ------------------------------------------------------------ operations

    async def register_path(self, request: RegisterModel) -> AdminReply:
        path = Path(request.path).expanduser().resolve()
        try:
            kind = detect(path)
        except UnrecognisedModel as exc:
            return AdminReply(ok=False, status=422, message=str(exc))
        name = request.name or path.stem
        problem = check_model_name(name)
        if problem:
            return AdminReply(ok=False, status=400, message=problem)
        source = ModelSource(kind="path", path=str(path))
        record = ModelRecord(
            name=name,
            format=kind.format,
            runtime=kind.runtime,
            capabilities=kind.capabilities,
            source=source,
            size_bytes=path.stat().st_size,
            description=request.description,
            labels=dict(request.labels),
        )
        try:
            await self.kv.create(encode_token(name), codec.encode(record))
        except KeyWrongLastSequenceError:
            existing = await self.get(name)
            if existing is not None and existing[0].source == source:
                return AdminReply(ok=True, status=200, message="already registered", record=existing[0])
            where = existing[0].source.path or existing[0].source.repo if existing else "another source"
            return AdminReply(ok=False, status=409, message=f"model {name!r} is already registered (from {where})")
        await self._emit("added", name, record)
        log.info("model registered", model=name, path=str(path))
        return AdminReply(ok=True, status=201, message="registered", record=record)

    async def delete(self, name: str) -> AdminReply:
        current = await self.get(name)
        if current is None:
            return AdminReply(ok=False, status=404, message=f"model {name!r} is not registered")
        await self.kv.purge(encode_token(name))
        self._known_ready.discard(name)
        await self._emit("deleted", name, None)
        log.info("model deleted", model=name)
        return AdminReply(ok=True, status=200, message="deleted", record=current[0])

    async def _set_state(self, name: str, state: str) -> None:
        current = await self.get(name)
        if current is None or current[0].state == state:
            return
        record, revision = current
        record = msgspec.structs.replace(record, state=state, updated_at=time.time(), error=None)
        try:
            await self.kv.update(encode_token(name), codec.encode(record), last=revision)
        except KeyWrongLastSequenceError:
            return  # someone changed it meanwhile; the next heartbeat retries
        await self._emit("updated", name, record)

    # ------------------------------------------------------------ NATS handlers

    async def _reply(self, msg: Msg, reply: AdminReply) -> None:
        if msg.reply:
            await msg.respond(codec.encode(reply))

    async def _answer(self, msg: Msg, kind: type, action) -> None:
        """Decode an admin request of ``kind``, run ``action`` on it, reply with its AdminReply."""
        try:
            request = codec.decode(msg.data, kind)
        except msgspec.DecodeError as exc:
            await self._reply(msg, AdminReply(ok=False, status=400, message=f"bad {kind.__name__} request: {exc}"))
            return
        await self._reply(msg, await action(request))

    async def _on_register(self, msg: Msg) -> None:
        await self._answer(msg, RegisterModel, self.register_path)

    async def _on_delete(self, msg: Msg) -> None:
        await self._answer(msg, DeleteModel, lambda request: self.delete(request.name))

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = codec.decode(msg.data, NodeHeartbeat)
        except msgspec.DecodeError:
            return
        for model in beat.models:
            if model.state == "ready" and model.artifact_bytes > 0 and model.name not in self._known_ready:
                await self._set_state(model.name, "ready")
                self._known_ready.add(model.name)
