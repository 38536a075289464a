"""The model registry: the only writer of the ``models`` KV bucket and of model events.

Admin requests arrive on ``admin.model.*`` (request/reply, queue group ``registry``): register,
delete, the curated hub and the Hugging Face catalog. Every change to a registration is a KV
write followed by an event on REGISTRY_EVENTS, so nodes can either watch state or replay
events. Node heartbeats and download reports drive the lifecycle (see :mod:`.lifecycle`).
The registry is also the one place that decides which nodes load which model (see
:mod:`.placement`): each decision is an event on ``placement.<model>`` (the PLACEMENTS stream).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from broker import NatsAuth, connect, provision
from broker.audit import AuditLog, bounded
from broker.blobs import blob_prefix
from broker.endpoints import Service
from broker.logship import SHIPPER
from broker.mirrors import NodeDirectory, RegisteredModels
from events import NameTooLong, codec, encode_token, name_error, storage, subjects
from events.messages import (
    AdminReply,
    CatalogEntry,
    DeleteModel,
    DownloadModel,
    DownloadProgress,
    DownloadReply,
    DownloadTask,
    HfQuery,
    HfReply,
    HubEntry,
    HubQuery,
    HubReply,
    ModelEvent,
    ModelRecord,
    NodeDownload,
    NodeDownloadReply,
    NodeHeartbeat,
    PlacementEvent,
    PlaceModel,
    PlaceReply,
    RegisterModel,
    Replicas,
)

from . import lifecycle, placement, sources
from .catalog import load_catalog, search
from .hf import HfUnavailable, HuggingFace
from .hosting import Hosting

log = structlog.get_logger("registry")

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f]|\.\.")
LARGE_MODEL_BYTES = 50 * 10**9
LIFECYCLE_SWEEP_S = 1.0  # also notices nodes that died without a goodbye
NODE_ORDER_TIMEOUT_S = 15.0
PLACEMENT_TIMEOUT_S = 120.0  # a decision not carried out by then (and no download running) is made again
PLACEMENT_COOLDOWN_S = 30.0
REPUBLISH_S = 3.0  # a decision is sent again at most this often (a node may have missed it)
MAX_RESENDS = 3  # per node and decision
MAX_REPLICAS = 64


def check_model_name(name: str) -> str | None:
    """Why ``name`` cannot be a model name, or None. Names are matched exactly, case-sensitively."""
    if not name or not name.strip():
        return "model name must not be empty"
    too_long = name_error(name)
    if too_long:
        return too_long
    if _BAD_NAME.search(name) or name != name.strip():
        return f"model name {name!r} contains control characters, '..' or surrounding spaces"
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


class Registry:
    def __init__(
        self,
        *,
        nats_url: str | None,
        catalog_path: Path | None = None,
        hf_cache_ttl: float = 600.0,
        hf_timeout: float = 5.0,
        replicas: int | None = None,
        model_roots: Iterable[str | Path] = (),
        nats_auth: NatsAuth | None = None,
    ) -> None:
        """``model_roots``: directories a registration by path must lie under (``--model-root``);
        none: registering a path is refused."""
        self.nats_url = nats_url
        self.nats_auth = nats_auth  # NATS credentials and TLS (default: from the environment)
        self.model_roots = sources.model_roots(model_roots)
        self.replicas = replicas  # NATS copies of streams and buckets (broker.provision)
        self.catalog = {entry.id: entry for entry in load_catalog(catalog_path)}  # fails fast on a bad file
        self.hf = HuggingFace(cache_ttl=hf_cache_ttl, timeout=hf_timeout)
        self._subs: list = []
        self._downloads: dict[tuple[str, str], tuple[DownloadProgress, float]] = {}
        self._dirty = asyncio.Event()
        self._last_download_write: dict[str, float] = {}
        self._lifecycle_task: asyncio.Task | None = None
        self._pending: dict[str, list[placement.Pending]] = {}  # placements not carried out yet
        self._cooldown: dict[tuple[str, str], float] = {}  # (model, node): refused a placement until then
        self._writing = asyncio.Lock()  # a state update and a delete of the registrations, one at a time

    async def start(self) -> None:
        self.nc = await connect(self.nats_url, name="registry", auth=self.nats_auth, on_reconnect=self._recover)
        SHIPPER.attach(self.nc, "registry")  # its log records, to the LOGS stream
        self.js = self.nc.jetstream()
        await provision(self.js, self.replicas, role=self.nc.role)
        self.kv = await self.js.key_value(storage.KV_MODELS)
        self.kv_downloads = await self.js.key_value(storage.KV_DOWNLOADS)
        self.blobs = await self.js.object_store(storage.OBJ_MODEL_BLOBS)
        self.models = RegisteredModels()
        await self.models.start(self.js)
        self.hosting = Hosting(self.nc, self.js, self.models.get)
        self.hosting.start()
        for record in list(self.models.records.values()):  # registered while no registry ran, or before hosting
            self.hosting.host(record)
        self.nodes = NodeDirectory()
        self.nodes.on_change(self._dirty.set)
        await self.nodes.start(self.nc, self.js)
        # Its admin subjects are the endpoints of one micro service: `nats micro info llm-router-registry`.
        self.service = Service(self.nc, "llm-router-registry", description="LLM Router model registry")
        await self.service.start()
        self.audit = AuditLog(self.nc, "registry")
        await self.audit.start()
        for name, subject, kind, action in (
            ("register", subjects.ADMIN_MODEL_REGISTER, RegisterModel, self.register),
            ("delete", subjects.ADMIN_MODEL_DELETE, DeleteModel, lambda request: self.delete(request.name)),
            ("hub", subjects.ADMIN_MODEL_HUB, HubQuery, self.hub),
            ("hf", subjects.ADMIN_MODEL_HF, HfQuery, self.hf_page),
            ("download", subjects.ADMIN_MODEL_DOWNLOAD, DownloadModel, self.download),
            ("place", subjects.ADMIN_MODEL_PLACE, PlaceModel, self.place),
        ):
            audited = AUDITED.get(name)
            await self.service.add(
                name,
                subject,
                self._answer(action, audited),
                kind=kind,
                queue="registry",
                refuse=self._refuse(kind, audited),
                empty=b"{}",
            )
        self._subs.append(await self.nc.subscribe(subjects.DOWNLOADS_PROGRESS_ALL, cb=self._on_progress))
        self._lifecycle_task = asyncio.create_task(self._lifecycle_loop(), name="lifecycle")
        await self.nc.flush()  # our subscriptions are on the server before anyone is told we are ready
        log.info(
            "registry started",
            catalog=len(self.catalog),
            hf_endpoint=self.hf.endpoint,
            model_roots=[str(root) for root in self.model_roots],
        )

    async def _recover(self) -> None:
        """After a reconnection (the server may have restarted, or lost its store): provision
        again and re-read the models bucket, the one state this service writes from."""
        await provision(self.js, self.replicas, role=self.nc.role)
        await self.models.resync(self.js)
        self._dirty.set()

    async def stop(self) -> None:
        if self._lifecycle_task is not None:
            self._lifecycle_task.cancel()
        await self.hosting.stop()
        for sub in self._subs:
            await sub.unsubscribe()
        await self.service.stop(timeout=10)
        await self.audit.stop()
        await self.nodes.stop()
        await self.models.stop()
        self.hf.close()
        await SHIPPER.detach(self.nc)
        await self.nc.drain()

    # ------------------------------------------------------------ state

    def get(self, name: str) -> ModelRecord | None:
        return self.models.get(name)

    async def _current(self, name: str) -> ModelRecord | None:
        """The registration from the mirror, or from the bucket when the mirror has not caught up."""
        record = self.models.get(name)
        if record is not None:
            return record
        try:
            entry = await self.kv.get(encode_token(name))
        except KeyNotFoundError:
            return None
        return codec.decode(entry.value, ModelRecord) if entry.value else None

    async def _emit(self, event: str, name: str, record: ModelRecord | None) -> None:
        await self.js.publish(
            subjects.MODEL_EVENTS[event], codec.encode(ModelEvent(event=event, name=name, record=record))
        )

    # ------------------------------------------------------------ register / delete

    async def register(self, request: RegisterModel) -> AdminReply:
        try:
            kind = sources.chosen_source(request)
            if kind == "catalog_id":
                record = await sources.from_catalog(request, self.catalog, self.hf)
            elif kind == "path":
                record = sources.from_path(request, self.model_roots)
            else:
                record = await sources.from_hugging_face(request, self.hf)
        except sources.RegistrationError as exc:
            return AdminReply(ok=False, status=exc.status, message=exc.message)
        problem = check_model_name(record.name)
        if problem:
            return AdminReply(ok=False, status=400, message=problem)
        try:
            replicas = _replicas(request.replicas)
        except ValueError as exc:
            return AdminReply(ok=False, status=400, message=str(exc))
        record = msgspec.structs.replace(
            record, warnings=self._warnings(record), predownload=request.predownload, replicas=replicas
        )
        try:
            revision = await self.kv.create(encode_token(record.name), codec.encode(record))
        except KeyWrongLastSequenceError:
            return self._duplicate(record, await self._current(record.name))
        self.models.remember(record, revision)  # before the watcher says so: a delete may follow at once
        await self._emit("added", record.name, record)
        self.hosting.host(record)  # a path only the registry sees: its file goes to the object store
        log.info("model registered", model=record.name, source=kind, state=record.state)
        self._dirty.set()
        return AdminReply(ok=True, status=201, message="registered", record=record)

    def _duplicate(self, record: ModelRecord, existing: ModelRecord | None) -> AdminReply:
        if existing is not None and existing.source == record.source:
            why = "from the same source"
        elif existing is not None:
            where = existing.source.path or f"{existing.source.repo}/{existing.source.filename or ''}".rstrip("/")
            why = f"from {where}"
        else:
            why = "by another request just now"
        message = f"model {record.name!r} is already registered {why}; delete it first or register under another name"
        return AdminReply(ok=False, status=409, message=message, record=existing)

    def _warnings(self, record: ModelRecord) -> list[str]:
        warnings = []
        if record.size_bytes > LARGE_MODEL_BYTES:
            warnings.append(
                f"the model is {_gb(record.size_bytes)}, over {_gb(LARGE_MODEL_BYTES)}: downloads will be slow"
            )
        need = record.required_memory_bytes or sources.estimated_memory(record.size_bytes)
        capacities = [
            max([beat.memory_total_bytes] + [gpu.memory_total_bytes for gpu in beat.gpus]) for beat in self.nodes.live()
        ]
        if capacities and need > max(capacities):
            warnings.append(
                f"the model needs about {_gb(need)} of memory, more than any live node has (largest: {_gb(max(capacities))})"
            )
        return warnings

    async def delete(self, name: str) -> AdminReply:
        current = await self._current(name)
        if current is None:
            return AdminReply(ok=False, status=404, message=f"model {name!r} is not registered")
        async with self._writing:  # no state update of it lands between the purge and "deleted"
            await self.kv.purge(encode_token(name))
            self.models.forget(name)
            self._pending.pop(name, None)
            await self._emit("deleted", name, None)
        removed = await self._delete_blobs(name)
        log.info("model deleted", model=name, blobs_removed=removed)
        return AdminReply(ok=True, status=200, message="deleted", record=current)

    async def _delete_blobs(self, name: str) -> int:
        """Objects the registry hosts for the model are named ``<model token>/<file>``."""
        prefix = blob_prefix(name)
        try:
            objects = await self.blobs.list(ignore_deletes=True)
        except NotFoundError:
            return 0
        removed = 0
        for info in objects:
            if info.name.startswith(prefix):
                await self.blobs.delete(info.name)
                removed += 1
        return removed

    # ------------------------------------------------------------ download now

    async def download(self, request: DownloadModel) -> DownloadReply:
        """Order one node, a chosen node or every capable node to fetch the model now."""
        record = await self._current(request.model)
        if record is None:
            return DownloadReply(ok=False, status=404, message=f"model {request.model!r} is not registered")
        if record.state == "pending_conversion":
            return DownloadReply(
                ok=False, status=409, message=f"model {record.name!r} is awaiting conversion; nodes cannot fetch it yet"
            )
        live = self.nodes.live()
        if request.node:
            targets = [beat for beat in live if beat.node_id == request.node]
            if not targets:
                return DownloadReply(ok=False, status=404, message=f"no live node {request.node!r}")
        else:
            targets = [beat for beat in live if beat.state == "online" and _runs(beat, record.runtime)]
            if not targets:
                names = ", ".join(sorted(b.node_id for b in live)) or "none"
                return DownloadReply(
                    ok=False,
                    status=503,
                    message=(f"no live node can run {record.runtime} models now (live nodes: {names})"),
                )
        task_id = uuid.uuid4().hex[:12]
        if request.node or request.all:
            replies = await asyncio.gather(*(self._order(beat.node_id, record.name, task_id) for beat in targets))
        else:
            replies = [await self._order_one(record, targets, task_id)]
        task = DownloadTask(task_id=task_id, model=record.name, nodes=list(replies))
        await self.kv_downloads.put(storage.download_task_key(task_id), codec.encode(task))
        message = "; ".join(f"node {r.node_id}: {r.message}" for r in replies)
        if any(r.state in ("started", "running") for r in replies):
            return DownloadReply(ok=True, status=202, message=message, task=task)
        if all(r.ok for r in replies):
            return DownloadReply(ok=True, status=200, message=message, task=task)
        worst = next(r for r in replies if not r.ok)
        return DownloadReply(ok=False, status=worst.status, message=message, task=task)

    async def _order_one(self, record: ModelRecord, beats: list[NodeHeartbeat], task_id: str) -> NodeDownloadReply:
        """Order the best node; one that turns out gone (stopped since its last heartbeat) is
        skipped for the next best."""
        beats = list(beats)
        while True:
            beat = self._pick(record, beats)
            reply = await self._order(beat.node_id, record.name, task_id)
            beats.remove(beat)
            if reply.state != "failed" or reply.status != 504 or not beats:
                return reply

    def _pick(self, record: ModelRecord, beats: list[NodeHeartbeat]) -> NodeHeartbeat:
        """A node already fetching the model, else the one with the most free memory."""
        for beat in beats:
            if any(m.name == record.name and m.state == "downloading" for m in beat.models):
                return beat
        return max(beats, key=lambda b: b.memory_total_bytes - b.memory_used_bytes)

    async def _order(self, node_id: str, model: str, task_id: str) -> NodeDownloadReply:
        try:
            msg = await self.nc.request(
                subjects.admin_node(node_id, subjects.NODE_DOWNLOAD),
                codec.encode(NodeDownload(model=model, task_id=task_id)),
                timeout=NODE_ORDER_TIMEOUT_S,
            )
            return codec.decode(msg.data, NodeDownloadReply)
        except (NoRespondersError, NatsTimeout) as exc:
            why = "is not answering" if isinstance(exc, NatsTimeout) else "is gone"
            status, message = 504, f"node {node_id} {why}"
        except msgspec.DecodeError as exc:
            status, message = 502, f"unreadable answer from node {node_id}: {exc}"
        return NodeDownloadReply(
            ok=False, status=status, node_id=node_id, model=model, task_id=task_id, state="failed", message=message
        )

    # ------------------------------------------------------------ catalogs

    async def hub(self, query: HubQuery) -> HubReply:
        by_source = {(r.source.repo, r.source.filename): r for r in self.models.records.values() if r.source.repo}
        by_catalog = {r.catalog_id: r for r in self.models.records.values() if r.catalog_id}
        entries = []
        for entry in search(list(self.catalog.values()), query.search):
            record = (
                by_catalog.get(entry.id)
                or self.get(entry.id)
                or by_source.get((entry.repo, entry.recommended_filename))
            )
            entries.append(self._hub_entry(entry, record))
        return HubReply(ok=True, models=entries)

    def _hub_entry(self, entry: CatalogEntry, record: ModelRecord | None) -> HubEntry:
        status = "available"
        if record is not None and record.state == "ready":
            status = "downloaded"
        elif record is not None and record.state == "downloading":
            status = "downloading"
        fields = {f: getattr(entry, f) for f in entry.__struct_fields__}
        return HubEntry(
            **fields,
            status=status,
            lifecycle_status=record.state if record else None,
            registered_as=record.name if record else None,
            download_progress=record.download if record else None,
            hf_info=self.hf.cached_info(entry.repo),
        )

    async def hf_page(self, query: HfQuery) -> HfReply:
        try:
            return HfReply(ok=True, page=await self.hf.page(query))
        except HfUnavailable as exc:
            return HfReply(ok=False, status=503, message=str(exc))

    # ------------------------------------------------------------ lifecycle

    async def _on_progress(self, msg: Msg) -> None:
        report = codec.decode_published(msg, DownloadProgress, log, "download progress")
        if report is not None:
            self._downloads[(report.node_id, report.model)] = (report, time.monotonic())
            self._dirty.set()

    def _fresh_downloads(self, model: str) -> list[DownloadProgress]:
        cutoff = time.monotonic() - storage.NODE_TTL_S
        return [
            report
            for (node, name), (report, seen) in self._downloads.items()
            if name == model and seen >= cutoff and self.nodes.is_live(node)
        ]

    async def _lifecycle_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=LIFECYCLE_SWEEP_S)
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self._apply_lifecycle()
            except Exception as exc:  # NATS hiccup: the next sweep retries
                log.warning("lifecycle update failed", error=str(exc))

    async def _apply_lifecycle(self) -> None:
        beats = self.nodes.live()
        await self._apply_placement(beats)
        cutoff = time.monotonic() - storage.NODE_TTL_S
        self._downloads = {k: v for k, v in self._downloads.items() if v[1] >= cutoff}
        for name, record in list(self.models.records.items()):
            now = lifecycle.derive(record, beats, self._fresh_downloads(name))
            if not lifecycle.differs(record, now):
                continue
            only_progress = record.state == now.state == "downloading"
            if only_progress and time.monotonic() - self._last_download_write.get(name, 0.0) < 1.0:
                self._dirty.set()  # write it on a later pass: at most one progress write a second
                continue
            await self._write_state(record, now)

    async def _write_state(self, record: ModelRecord, now: lifecycle.Lifecycle) -> None:
        async with self._writing:  # a delete waits: its "deleted" is never followed by this "updated"
            revision = self.models.revisions.get(record.name)
            if revision is None:
                return  # deleted meanwhile
            updated = msgspec.structs.replace(
                record, state=now.state, error=now.error, download=now.download, updated_at=time.time()
            )
            try:
                new_revision = await self.kv.update(encode_token(record.name), codec.encode(updated), last=revision)
            except KeyWrongLastSequenceError:
                return  # changed meanwhile (another registry, a delete): the next pass sees the new value
            self.models.remember(updated, new_revision)  # so the next pass does not write it again
            self._last_download_write[record.name] = time.monotonic()
            if record.state != now.state:
                log.info("model state", model=record.name, state=now.state, was=record.state, error=now.error)
            await self._emit("updated", record.name, updated)

    # ------------------------------------------------------------ placement

    async def place(self, request: PlaceModel) -> PlaceReply:
        """A gateway's requests wait for a model: where it is loaded or loading, else a node
        that loads it now (on demand), or one more replica (sustained queueing)."""
        record = await self._current(request.model)
        if record is None:
            return PlaceReply(ok=False, status=404, message=f"model {request.model!r} is not registered")
        beats = self.nodes.live()
        self._settle(beats)
        pending = self._pending_for(record.name)
        loaded = [b.node_id for b in beats if b.serves(record.name, request.capability) and b.state == "online"]
        placing = [p.node_id for p in pending]
        try:
            if request.reason == "queueing" and loaded:
                event = placement.scale_up(record, beats, pending)
            elif loaded:
                # The gateway sees it loaded nowhere (a node just unloaded it, and our view is a
                # heartbeat behind): ask one of those nodes to have it loaded; a no-op if it has.
                event = placement.confirm(record, [b for b in beats if b.node_id == loaded[0]])
            elif placing:
                event = await self._again(record.name, pending)  # a node may have missed it
            else:
                event = placement.on_demand(record, beats, pending)
        except placement.Unplaceable as exc:
            log.warning("model cannot be placed", model=record.name, reason=str(exc))
            return PlaceReply(ok=False, status=exc.status, message=str(exc))
        if event is not None:
            await self._publish_placement(event)
            placing += event.nodes
        where = loaded + [n for n in placing if n not in loaded]
        message = f"placed on {', '.join(event.nodes)}" if event else f"on {', '.join(where) or 'no node'}"
        return PlaceReply(ok=True, status=200, message=message, nodes=where, event=event)

    def _pending_for(self, model: str) -> list[placement.Pending]:
        return self._pending.get(model, [])

    async def _again(self, model: str, pending: list[placement.Pending]) -> None:
        """A gateway's requests still wait for a decision not carried out: send it once more to
        its nodes not sent it in the last REPUBLISH_S (one may have been reconnecting)."""
        now = time.monotonic()
        due = [entry for entry in pending if entry.decision is not None and now - entry.sent >= REPUBLISH_S]
        await self._send_again(due, why="requests still wait for it")
        return None

    async def _send_again(self, entries: list[placement.Pending], *, why: str) -> None:
        """The decisions of ``entries`` once more, each to those of its nodes only, marked
        ``again`` (views keep the decision as made, with all its nodes)."""
        by_decision: dict[str, list[placement.Pending]] = {}
        for entry in entries:
            by_decision.setdefault(entry.decision.decision_id, []).append(entry)
        for group in by_decision.values():
            nodes = [entry.node_id for entry in group]
            again = msgspec.structs.replace(group[0].decision, nodes=nodes, again=True)
            await self.js.publish(subjects.placement(again.name), codec.encode(again))
            sent = time.monotonic()
            for entry in group:
                entry.sent, entry.resent = sent, entry.resent + 1
            log.info("placement sent again", model=again.name, nodes=nodes, decision=again.decision_id, why=why)

    async def _apply_placement(self, beats: list[NodeHeartbeat]) -> None:
        self._settle(beats)
        now = time.monotonic()
        cooling = {key for key, until in self._cooldown.items() if until > now}
        records = [r for r in self.models.records.values()]
        # A node cooling down for a model is as good as placed there: not asked again meanwhile.
        blocked = {
            name: [*self._pending_for(name), *(placement.Pending(n, {}, 0.0, 0.0) for m, n in cooling if m == name)]
            for name in self.models.records
        }
        plan = placement.replicas(records, beats, blocked)
        for event in plan.events:
            await self._publish_placement(event)
        await self._redeliver()

    async def _redeliver(self) -> None:
        """Send a decision again to the nodes whose heartbeat, received REPUBLISH_S or more after
        it went to them, does not list it as placed there: they missed it (nodes follow decisions
        on a core subscription, and one may have been reconnecting). Without this a missed
        minimum replica waited for PLACEMENT_TIMEOUT_S. At most MAX_RESENDS times per node (a
        node that drops a decision without a word is left to that timeout), never to a node
        that does not report ``placed`` (older) or that is no longer online."""
        missed = []
        for name, entries in self._pending.items():
            for entry in entries:
                last = self.nodes.last_beat(entry.node_id)  # the beat and its arrival, from one view
                if entry.decision is None or last is None or entry.resent >= MAX_RESENDS:
                    continue
                beat, seen = last
                if (
                    beat.placed is not None
                    and name not in beat.placed
                    and beat.state == "online"
                    and self.nodes.is_live(entry.node_id)
                    and seen >= entry.sent + REPUBLISH_S
                    and not any(m.name == name and m.state == "downloading" for m in beat.models)
                ):
                    missed.append(entry)
        await self._send_again(missed, why="a later heartbeat does not list it")

    def _settle(self, beats: list[NodeHeartbeat]) -> None:
        """Drop decisions carried out (loaded), refused (an error reported since), or lost (node
        gone, or timed out while not downloading); a refusal cools that node down for the model."""
        live = {b.node_id: b for b in beats}
        now = time.monotonic()
        self._cooldown = {key: until for key, until in self._cooldown.items() if until > now}
        for name, entries in list(self._pending.items()):
            kept = []
            for entry in entries:
                beat = live.get(entry.node_id)
                if beat is None or beat.serves(name):
                    continue
                refused = any(
                    m.name == name and m.error and (m.failed_at or 0.0) >= entry.at - 1.0 for m in beat.loadable
                ) or placement.has_error(beat, name)
                if refused:
                    self._cooldown[(name, entry.node_id)] = now + PLACEMENT_COOLDOWN_S
                    continue
                downloading = any(m.name == name and m.state == "downloading" for m in beat.models)
                if now > entry.deadline and not downloading:
                    continue
                kept.append(entry)
            if kept:
                self._pending[name] = kept
            else:
                del self._pending[name]

    async def _publish_placement(self, event: PlacementEvent) -> None:
        await self.js.publish(subjects.placement(event.name), codec.encode(event))
        now = time.monotonic()
        self._pending.setdefault(event.name, []).extend(
            placement.Pending(node, event.estimate_bytes, event.at, now + PLACEMENT_TIMEOUT_S, event, now)
            for node in event.nodes
        )
        log.info(
            "model placed",
            model=event.name,
            nodes=event.nodes,
            reason=event.reason,
            evict=event.evict,
            detail=event.detail,
            decision=event.decision_id,
        )

    # ------------------------------------------------------------ NATS handlers

    def _answer(
        self, action: Callable[[Any], Awaitable[Any]], audited: str | None = None
    ) -> Callable[[Any, Msg], Awaitable[None]]:
        """Run ``action`` on the decoded request and reply with its result (or a 500 reply);
        ``audited``: the audit action it is (the state-changing ones), recorded with its result."""

        async def answer(request: Any, msg: Msg) -> None:
            started = time.perf_counter()
            try:
                reply = await action(request)
            except NameTooLong as exc:  # a name that cannot be a subject token or a key: the asker's error
                reply = AdminReply(ok=False, status=400, message=str(exc))
            except Exception as exc:
                log.exception("admin request failed", subject=msg.subject)
                reply = AdminReply(ok=False, status=500, message=f"registry error: {type(exc).__name__}: {exc}")
            if msg.reply:
                await msg.respond(codec.encode(reply))
            if audited:
                self._audit(msg, audited, reply.status, _target(request, reply), started)

        return answer

    def _refuse(self, kind: type, audited: str | None) -> Callable[[Msg, str], Awaitable[None]]:
        async def refuse(msg: Msg, why: str) -> None:
            if msg.reply:
                await msg.respond(
                    codec.encode(AdminReply(ok=False, status=400, message=f"bad {kind.__name__} request: {why}"))
                )
            if audited:
                self._audit(msg, audited, 400, None, None)

        return refuse

    def _audit(self, msg: Msg, action: str, status: int, target: str | None, started: float | None) -> None:
        """The registry's record of an admin request: the actor the gateway names, else ``nats``
        (an operator's own request). Whoever may publish admin requests may claim any actor: the
        record says who the request said it came from, and ``component`` says the registry heard it."""
        headers = msg.headers or {}
        self.audit.record(
            headers.get(subjects.ACTOR_HEADER) or "nats",
            action,
            status,
            target=target,
            request_id=bounded(headers.get(subjects.REQUEST_ID_HEADER, ""), 64) or None,
            duration_ms=round((time.perf_counter() - started) * 1000, 3) if started is not None else None,
            detail={"subject": msg.subject},
        )


# The registry's state-changing endpoints and their audit actions (hub and hf are reads).
AUDITED = {"register": "model.register", "delete": "model.delete", "download": "model.download"}


def _target(request: Any, reply: Any) -> str | None:
    """The model an admin request was about: the registered record's name, else what it asked for."""
    record = getattr(reply, "record", None)
    if record is not None:
        return record.name
    if isinstance(request, RegisterModel):
        return request.name or request.catalog_id or request.repo or request.path
    return getattr(request, "name", None) or getattr(request, "model", None)


def _replicas(value: int | Replicas | None) -> Replicas | None:
    """A registration's ``replicas`` (a number: that many, no more); ValueError when out of range."""
    if value is None:
        return None
    wanted = Replicas(min=value, max=value) if isinstance(value, int) else value
    if wanted.min < 0 or wanted.min > MAX_REPLICAS:
        raise ValueError(f"replicas.min must be 0 to {MAX_REPLICAS}, not {wanted.min}")
    if wanted.max is not None and not wanted.min <= wanted.max <= MAX_REPLICAS:
        raise ValueError(
            f"replicas.max must be between replicas.min ({wanted.min}) and {MAX_REPLICAS}, not {wanted.max}"
        )
    return wanted


def _runs(beat: NodeHeartbeat, runtime: str) -> bool:
    return any(status.name == runtime and status.available for status in beat.runtimes)
