"""The node agent: heartbeat, registry sync, placement, and subscriptions per (capability, model).

A node subscribes to the shared subject of each model it has loaded, so NATS itself routes each
capability to nodes that can serve it, and to its own subject of each model it has files for:
a request sent there for a model it has not loaded (or has just unloaded) is answered at once
with ``model_not_loaded``, never with silence. Registry events arrive through a durable
consumer, so a node that was offline replays what it missed (a delete, above all) when it comes
back. Which models are loaded is :mod:`.residency`'s: the registry places models on nodes
(placement events), and the node loads them within its memory budget (:mod:`.memory`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict
from pathlib import Path

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, NotFoundError

from broker import NatsAuth, connect, provision
from broker.buckets import current_entries
from broker.endpoints import Endpoint, Service
from broker.logship import REQUEST_ID, SHIPPER
from events import codec, encode_token, name_error, storage, subjects
from events.capabilities import CAPABILITIES
from events.messages import (
    CancelRequest,
    InferenceRequest,
    ModelEvent,
    ModelRecord,
    ModelSource,
    NodeCommandReply,
    NodeDownload,
    NodeDownloadReply,
    NodeGoodbye,
    NodeHeartbeat,
    PlacementEvent,
    RuntimeStatus,
)

from . import cache, memory, system
from .downloads import Downloads
from .residency import Residency, Want
from .resolution import ModelNotFound, Resolver, SourceUnavailable
from .responder import Responder
from .runtimes import Runtime, default_runtimes
from .runtimes.base import Cancellation
from .serving import ServedModel
from .upstream import CAPABILITIES as UPSTREAM_CAPABILITIES
from .upstream import RUNTIME as UPSTREAM
from .upstream import UpstreamEngine
from .upstream_link import UpstreamLink

log = structlog.get_logger("node")

EARLY_CANCELS_KEPT = 1024
KEEP_ALIVE_SWEEP_S = 1.0
# After a reconnection a second beat this soon: a gateway finds a request whose reply the old
# server lost by two beats that do not list it (NodeDirectory.lost), so it retries in about a
# second instead of a heartbeat interval later.
SECOND_BEAT_AFTER_RECONNECT_S = 0.5


class NodeAgent:
    def __init__(
        self,
        *,
        nats_url: str | None,
        data_dir: Path,
        runtimes: list[Runtime] | None = None,
        parallel: int = 1,
        node_id: str | None = None,
        heartbeat_interval: float = storage.HEARTBEAT_INTERVAL_S,
        allow_cpu: bool = True,
        shared_models_dir: Path | None = None,
        allow_origins: list[str] | None = None,
        predownload: str = "registered",
        replicas: int | None = None,
        nats_auth: NatsAuth | None = None,
        upstream: UpstreamLink | None = None,
        memory_budget: str | int | None = None,
        gpu_memory_budget: str | int | None = None,
        keep_alive_s: float | None = None,
        share_downloads: bool = True,
    ) -> None:
        """``predownload``: "all" fetches every model it can run as soon as it is registered,
        "registered" only those registered with ``predownload``, "none" waits for a request.
        ``upstream``: serve an existing OpenAI-compatible server's models (nodes/upstream_link.py)
        instead of engines of its own (``runtimes`` then defaults to none).
        ``memory_budget``/``gpu_memory_budget``: what loaded models may use of RAM / of each
        GPU (bytes, or a share like "80%"; nodes/memory.py); ``keep_alive_s``: idle models
        loaded on demand are unloaded after this long (None: only to make room); ``share_downloads``:
        what this node fetched from the origin goes into the object store for the next node."""
        self.nats_url = nats_url
        self.nats_auth = nats_auth  # NATS credentials and TLS (default: from the environment)
        self.data_dir = Path(data_dir)
        self.models_dir = self.data_dir / "models"
        self.upstream = upstream
        self.runtimes = runtimes if runtimes is not None else ([] if upstream else default_runtimes())
        self.parallel = parallel
        self.node_id = node_id or system.persistent_node_id(self.data_dir)
        self.hostname = socket.gethostname()
        self.heartbeat_interval = heartbeat_interval
        self.allow_cpu = allow_cpu
        self.shared_models_dir = Path(shared_models_dir) if shared_models_dir else None
        self.allow_origins = allow_origins
        self.predownload = predownload
        self.replicas = replicas  # NATS copies of streams and buckets (broker.provision)
        self.draining = False
        self.silent = False  # an upstream node whose server is down: no heartbeats, so offline everywhere
        self.started_at = time.time()
        self.memory = memory.Memory(ram_budget=memory_budget, gpu_budget=gpu_memory_budget)
        self.keep_alive_s = keep_alive_s
        self.share_downloads = share_downloads
        self._shared: dict[str, list[Endpoint]] = {}  # each loaded model's shared inference endpoints
        self._own: dict[str, list[Endpoint]] = {}  # this node's subjects of each model it has files for
        self._cancels: dict[str, Cancellation] = {}
        self._early_cancels: OrderedDict[str, float] = OrderedDict()  # cancels that arrived first
        self._sync_lock = asyncio.Lock()
        self._beat_now = asyncio.Event()
        self._runtime_status: list = []
        self._heartbeat_task: asyncio.Task | None = None
        self._keep_alive_task: asyncio.Task | None = None
        self._gpus: list = []
        self.residency = Residency(
            self.memory,
            self._sync_lock,
            parallel=parallel,
            attach=self._attach,
            detach=self._detach,
            changed=self._beat_now.set,
            keep_alive_s=keep_alive_s,
        )

    @property
    def served(self) -> dict[str, ServedModel]:
        """The models loaded now, by name."""
        return self.residency.served

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._gpus = await asyncio.to_thread(system.gpus)
        if not self._gpus and not self.allow_cpu and self.upstream is None:  # an upstream's GPUs are its own
            raise RuntimeError("no GPU found on this machine; start the node with --allow-cpu to serve on CPU")
        self.memory.set_gpus(self._gpus)
        self.residency.gpus = bool(self._gpus)
        self.nc = await connect(
            self.nats_url, name=f"node-{self.node_id}", auth=self.nats_auth, on_reconnect=self._recover
        )
        SHIPPER.attach(self.nc, "node", self.node_id)  # its log records, to the LOGS stream (logs.node.<id>.*)
        self.js = self.nc.jetstream()
        await provision(self.js, self.replicas, role=self.nc.role)  # a node's own credential: bind only
        self.kv_nodes = await self.js.key_value(storage.KV_NODES)
        self.kv_models = await self.js.key_value(storage.KV_MODELS)
        self.resolver = Resolver(
            self.js, self.models_dir, shared_dir=self.shared_models_dir, allow_origins=self.allow_origins
        )
        self.downloads = Downloads(
            self.nc, self.js, self.node_id, self.resolver, on_complete=self._sync_model, share=self.share_downloads
        )
        await self.downloads.start()
        self._runtime_status = await asyncio.to_thread(lambda: [r.probe() for r in self.runtimes])
        # Every subject the node serves is an endpoint of one micro service: `nats micro ls` lists nodes.
        self.service = Service(
            self.nc,
            "llm-router-node",
            instance_id=encode_token(self.node_id),
            description="LLM Router node: inference on the models it has loaded",
            metadata={"node_id": self.node_id, "hostname": self.hostname},
        )
        await self.service.start()
        await self.service.add(
            "cancel", subjects.INFER_CANCEL_ALL, self._on_cancel, kind=CancelRequest, concurrent=False
        )
        for verb in (subjects.NODE_DRAIN, subjects.NODE_RESUME):
            await self.service.add(verb, subjects.admin_node(self.node_id, verb), self._on_command, concurrent=False)
        await self.service.add(
            "download",
            subjects.admin_node(self.node_id, subjects.NODE_DOWNLOAD),
            self._on_download_command,
            kind=NodeDownload,
            refuse=self._refuse_download,
        )
        # Consumer first, snapshot second: an event racing the snapshot is applied twice, harmlessly.
        self._events_sub = await self._follow_registry()
        self._placement_sub = await self.nc.subscribe(subjects.PLACEMENT_ALL, cb=self._on_placement_msg)
        await self._sync_snapshot()
        if self.upstream is not None:
            await self.upstream.start(self)  # its models served before the node says it is ready
        await self._publish_heartbeat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        if self.keep_alive_s is not None:
            self._keep_alive_task = asyncio.create_task(self._keep_alive_loop(), name="keep-alive")
        await self.nc.flush()  # our subscriptions are on the server before anyone is told we are ready
        log.info("node started", node_id=self.node_id, models=sorted(self.served))

    @property
    def _durable(self) -> str:
        return f"node-{encode_token(self.node_id)}"

    async def _follow_registry(self) -> Subscription:
        """The durable consumer of registry events (created, or bound again after a restart)."""
        return await self.js.subscribe(
            subjects.REGISTRY_EVENTS_ALL,
            durable=self._durable,
            cb=self._on_event,
            manual_ack=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.NEW,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=60,
                inactive_threshold=storage.NODE_CONSUMER_RETENTION_S,  # a node gone for good
            ),
        )

    async def _recover(self) -> None:
        """After a reconnection: beat at once (gateways route to us again), and re-create what a
        server that lost its store no longer has (streams, buckets, our durable consumer)."""
        self._beat_now.set()
        self.service.spawn(self._beat_after(SECOND_BEAT_AFTER_RECONNECT_S))
        await provision(self.js, self.replicas, role=self.nc.role)
        try:
            await self.js.consumer_info(storage.REGISTRY_EVENTS, self._durable)
        except NotFoundError:
            log.warning("registry consumer lost with the server's store; subscribing again")
            await self._events_sub.unsubscribe()
            self._events_sub = await self._follow_registry()
            await self._sync_snapshot()

    async def stop(self) -> None:
        # Say "draining" first: gateways and the registry stop sending work here at once, while
        # the requests already running finish and their answers still reach the gateways.
        self.draining = True
        try:
            await self._publish_heartbeat()
        except Exception as exc:  # NATS already gone: the goodbye below or the heartbeat TTL will do
            log.warning("draining heartbeat not delivered", error=str(exc))
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
        if self._keep_alive_task:
            self._keep_alive_task.cancel()
        await self.downloads.stop()
        await self._events_sub.unsubscribe()
        await self._placement_sub.unsubscribe()
        self._shared.clear()
        self._own.clear()
        await self.service.stop(timeout=30)  # no new requests; in-flight ones finish their answers

        try:
            await self.nc.publish(subjects.node_goodbye(self.node_id), codec.encode(NodeGoodbye(node_id=self.node_id)))
            await self.kv_nodes.delete(encode_token(self.node_id))
        except Exception as exc:  # NATS already gone: the heartbeat TTL removes us anyway
            log.warning("goodbye not delivered", error=str(exc))
        # The durable registry consumer stays on the server, so a restart replays what we miss.
        await self.residency.close()
        if self.upstream is not None:
            await self.upstream.stop()
        await SHIPPER.detach(self.nc)
        await self.nc.drain()
        log.info("node stopped", node_id=self.node_id)

    # ------------------------------------------------------------ registry sync

    async def _sync_snapshot(self) -> None:
        """Every registration there is now (not ``kv.keys()``: it can stop before the keys, see broker.buckets)."""
        for entry in await current_entries(self.js, storage.KV_MODELS):
            await self._sync_model(codec.decode(entry.value, ModelRecord))

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = codec.decode(msg.data, ModelEvent)
        except msgspec.DecodeError:
            log.error("undecodable registry event", subject=msg.subject)
            await msg.term()
            return
        served = self.served.get(event.name)
        ours = (
            served is None or served.record.source.kind != "upstream"
        )  # an upstream model's name: not the registry's here
        if event.event == "deleted" and ours:
            await self.downloads.cancel(event.name, reason="deleted from the registry")
            await self._unload(event.name, reason="deleted from the registry")
            if await asyncio.to_thread(cache.remove, self.models_dir, event.name):
                log.info("local copy deleted", model=event.name)
        elif event.record is not None:
            await self._sync_model(event.record)
        await msg.ack()

    async def _on_placement_msg(self, msg: Msg) -> None:
        event = codec.decode_published(msg, PlacementEvent, log, "placement", level="error")
        if event is not None and self.node_id in event.nodes:
            self.service.spawn(self._on_placement(event))

    async def _on_placement(self, event: PlacementEvent) -> None:
        """The registry placed a model here: load it (making room if ``evict``), after fetching
        its files if they are not here yet. A decision missed while disconnected is made again
        (the registry's sweep for minimum replicas; a gateway asking again for a waiting request)."""
        log.info("placed here", model=event.name, reason=event.reason, evict=event.evict, decision=event.decision_id)
        self.residency.want(
            event.name, Want(reason=event.reason, evict=event.evict, pinned=event.pinned, decision_id=event.decision_id)
        )
        if event.name in self.residency.loadable:
            self.residency.schedule(event.name, self.service.spawn)
            return
        record = await self._registered(event.name)
        if record is None or self._runtime_for(record)[0] is None:
            self.residency.wanted.pop(event.name, None)
            return
        await self._spawn(self._prefetch)(record)  # its completion syncs the model, which loads it

    async def _sync_model(self, record: ModelRecord) -> None:
        """A registration as it is now: are its files here (then it is loadable, and loaded if
        the registry placed it here), or should they be fetched?"""
        name = record.name
        async with self._sync_lock:
            current = self.served.get(name)
            if current is not None and current.record.source.kind == "upstream":
                return  # the name is an upstream model's here; the registry's record is for other nodes
            if current is not None and current.record.source == record.source:
                current.record = record
                if name in self.residency.loadable:
                    self.residency.loadable[name].record = record
                return
            if current is not None:
                await self.residency.unload_locked(name, reason="source changed")
            runtime = self._runtime_for(record)[0] if record.state != "pending_conversion" else None
            location = await asyncio.to_thread(self.resolver.local, record) if runtime is not None else None
            if location is None:
                if name in self.residency.loadable:
                    self.residency.loadable.pop(name)
                    await self._drop_own(name)
                if runtime is None:
                    return  # never distributed until converted, or this node cannot run it: another node will
                if (
                    self._wants_predownload(record) or name in self.residency.wanted
                ) and name not in self.downloads.failed:
                    await self._spawn(self._prefetch)(record)
                return
            if self.residency.broken(name, location.path):
                return  # this file already failed to load; registry state updates do not change that
            device = self._runtime_device(runtime)
            estimate = await asyncio.to_thread(
                memory.estimate,
                runtime,
                cache.for_loading(record, location.path),
                location.path,
                slots=self.parallel,
                device=device,
            )
            if not self.residency.note(record, runtime, location.path, estimate):
                log.warning("model can never fit here", model=name, error=self.residency.failed[name].error)
                await self._drop_own(name)
            else:
                await self._own_endpoints(name)
        self._beat_now.set()
        if name in self.residency.wanted:
            self.residency.schedule(name, self.service.spawn)

    def _runtime_device(self, runtime: Runtime) -> str:
        status = next((s for s in self._runtime_status if s.name == runtime.name), None)
        return status.device if status is not None and status.device else memory.RAM

    # ------------------------------------------------------------ subscriptions

    def _endpoint_options(self, name: str, capability: str) -> dict:
        return {
            "kind": CAPABILITIES[capability].request,
            "refuse": self._refuse_request,
            "metadata": {"model": name, "capability": capability},
        }

    async def _own_endpoints(self, name: str) -> None:
        """This node's subject of each capability of a model it has files for (caller holds the lock)."""
        entry = self.residency.loadable[name]
        have = {e.name for e in self._own.get(name, [])}
        endpoints = self._own.setdefault(name, [])
        for capability in entry.capabilities:
            if capability in have:
                continue
            endpoints.append(
                await self.service.add(
                    capability,
                    subjects.infer_on_node(capability, name, self.node_id),
                    self._request_handler(name),
                    **self._endpoint_options(name, capability),
                )
            )

    async def _drop_own(self, name: str) -> None:
        for endpoint in self._own.pop(name, []):
            await self.service.remove(endpoint)

    async def _attach(self, served: ServedModel) -> None:
        """A model was loaded: the shared subjects of what its engine offers, and our own ones."""
        endpoints = []
        for capability in served.capabilities:
            endpoints.append(
                await self.service.add(
                    capability,
                    subjects.infer(capability, served.name),
                    self._request_handler(served.name),
                    queue=subjects.INFER_QUEUE,
                    **self._endpoint_options(served.name, capability),
                )
            )
        self._shared[served.name] = endpoints
        own = self._own.setdefault(served.name, [])
        have = {e.name for e in own}
        for capability in served.capabilities:
            if capability not in have:
                own.append(
                    await self.service.add(
                        capability,
                        subjects.infer_on_node(capability, served.name, self.node_id),
                        self._request_handler(served.name),
                        **self._endpoint_options(served.name, capability),
                    )
                )

    async def _detach(self, name: str) -> None:
        """A model was unloaded: off the shared subjects; our own ones stay while its files do."""
        for endpoint in self._shared.pop(name, []):
            await self.service.remove(endpoint)
        if name not in self.residency.loadable:
            await self._drop_own(name)

    def _runtime_for(self, record: ModelRecord) -> tuple[Runtime | None, str]:
        runtime = next((r for r in self.runtimes if r.accepts(record)), None)
        if runtime is None:
            return None, f"node {self.node_id} has no {record.runtime} runtime"
        status = next((s for s in self._runtime_status if s.name == runtime.name), None)
        if status is None or not status.available:
            why = status.error if status and status.error else "not installed"
            return None, f"runtime {runtime.name} is unavailable on node {self.node_id}: {why}"
        return runtime, ""

    def _wants_predownload(self, record: ModelRecord) -> bool:
        return self.predownload == "all" or (self.predownload == "registered" and record.predownload)

    def _spawn(self, action):
        """Run ``action(arg)`` in its own task, kept until done (NATS runs one callback at a time)."""

        async def start(arg) -> None:
            self.service.spawn(action(arg))

        return start

    async def _prefetch(self, record: ModelRecord) -> None:
        try:
            state, _ = await self.downloads.ensure(record)
        except (ModelNotFound, SourceUnavailable) as exc:
            log.warning("pre-download impossible", model=record.name, error=str(exc))
        else:
            if state == "present":  # here after all (appeared since this node last looked): take it in
                await self._sync_model(record)
        self._beat_now.set()

    async def _registered(self, name: str) -> ModelRecord | None:
        try:
            entry = await self.kv_models.get(encode_token(name))
        except KeyNotFoundError:
            return None
        return codec.decode(entry.value, ModelRecord) if entry.value else None

    async def _refuse_download(self, msg: Msg, why: str) -> None:
        if msg.reply:
            await msg.respond(
                codec.encode(
                    NodeDownloadReply(ok=False, status=400, node_id=self.node_id, message=f"bad download order: {why}")
                )
            )

    async def _on_download_command(self, order: NodeDownload, msg: Msg) -> None:
        """``admin.node.<id>.download``: fetch the model now; the reply says from where."""
        invalid = name_error(order.model)
        if invalid:
            reply = NodeDownloadReply(
                ok=False, status=400, node_id=self.node_id, message=f"bad download order: {invalid}"
            )
        else:
            reply = await self._download_now(order)
        log.info("download command", model=order.model, state=reply.state, task_id=reply.task_id, message=reply.message)
        self._beat_now.set()
        if msg.reply:
            await msg.respond(codec.encode(reply))

    async def _download_now(self, order: NodeDownload) -> NodeDownloadReply:
        answer = {"node_id": self.node_id, "model": order.model, "task_id": order.task_id}
        record = await self._registered(order.model)
        if record is None:
            return NodeDownloadReply(
                ok=False, status=404, state="not_found", **answer, message=f"model {order.model!r} is not registered"
            )
        runtime, why = self._runtime_for(record)
        if runtime is None:
            return NodeDownloadReply(ok=False, status=422, state="unsupported", message=why, **answer)
        try:
            state, what = await self.downloads.ensure(record, order.task_id)
        except ModelNotFound as exc:
            return NodeDownloadReply(ok=False, status=404, state="not_found", message=str(exc), **answer)
        except SourceUnavailable as exc:
            return NodeDownloadReply(ok=False, status=503, state="failed", message=str(exc), **answer)
        if state == "present":
            await self.downloads.report_present(record, what, order.task_id)
            await self._sync_model(
                record
            )  # loadable here now (a file that failed to load stays failed until it changes)
            return NodeDownloadReply(
                ok=True,
                status=200,
                state="present",
                source=what.source,
                message=f"already on node {self.node_id}",
                **answer,
            )
        answer["task_id"] = what.task_id
        return NodeDownloadReply(
            ok=True,
            status=202,
            state=state,
            source=what.location.source,
            message=f"downloading from {what.location.source}",
            **answer,
        )

    async def _unload(self, name: str, *, reason: str) -> None:
        async with self._sync_lock:
            await self._unload_locked(name, reason=reason)

    async def _unload_locked(self, name: str, *, reason: str) -> None:
        """The model goes for good (deleted): unloaded, and its files no longer count as here."""
        self.residency.forget(name)
        await self.residency.unload_locked(name, reason=reason)
        await self._drop_own(name)
        self._beat_now.set()

    # ------------------------------------------------------------ an upstream server's models

    async def serve_upstream(self, name: str, engine: UpstreamEngine) -> None:
        """Serve a model of the upstream server: a record of its own, never in the registry."""
        async with self._sync_lock:
            if name in self.served:
                return
            shown = engine.server.shown
            record = ModelRecord(
                name=name,
                format=UPSTREAM,
                runtime=UPSTREAM,
                capabilities=list(UPSTREAM_CAPABILITIES),
                source=ModelSource(kind="upstream", path=shown),
                state="ready",
            )
            # Nothing of this node's memory: the residency never counts, evicts nor expires it.
            served = ServedModel(record, UPSTREAM, engine, shown)
            self.served[name] = served
            await self._attach(served)
            log.info("model loaded", model=name, runtime=UPSTREAM, path=shown)
            self._beat_now.set()

    async def unload_upstream(self, name: str, reason: str) -> None:
        await self._unload(name, reason=reason)

    async def go_offline(self, reason: str) -> None:
        """One last heartbeat (its models already gone), then silence: offline once it expires."""
        try:
            await self._publish_heartbeat()
        except Exception as exc:  # NATS away as well: the silence says it anyway
            log.warning("last heartbeat not delivered", error=str(exc))
        self.silent = True
        log.warning("node offline", node_id=self.node_id, reason=reason)

    def go_online(self) -> None:
        self.silent = False
        self._beat_now.set()
        log.info("node online again", node_id=self.node_id)

    # ------------------------------------------------------------ requests

    async def _refuse_request(self, msg: Msg, why: str) -> None:
        if msg.reply:
            await Responder(self.nc, msg.reply, "", self.node_id).fail(400, why, type="invalid_request_error")

    def _request_handler(self, name: str):
        async def handle(request: InferenceRequest, msg: Msg) -> None:
            if not msg.reply:
                return
            responder = Responder(self.nc, msg.reply, request.request_id, self.node_id)
            if self.draining:  # the gateway sends elsewhere; a direct client learns why
                await responder.fail(
                    503, f"node {self.node_id} is draining", type="service_unavailable", code="node_draining"
                )
                return
            served = self.served.get(name)
            if served is None:  # its files are here, the model is not loaded (or was just unloaded)
                await responder.fail(
                    503,
                    f"model {name} is not loaded on node {self.node_id}",
                    type="service_unavailable",
                    code="model_not_loaded",
                )
                return
            cancelled = Cancellation()
            if self._early_cancels.pop(request.request_id, None) is not None:
                cancelled.set()  # its cancel overtook it (another subscription, another task)
            self._cancels[request.request_id] = cancelled
            logging_as = REQUEST_ID.set(request.request_id)  # its log lines carry it
            try:
                await served.serve(request, responder, cancelled, self.js)
            finally:
                REQUEST_ID.reset(logging_as)
                self._cancels.pop(request.request_id, None)
                if self.draining:
                    self._beat_now.set()  # report "drained" as soon as the last request ends

        return handle

    async def _on_cancel(self, cancel: CancelRequest, msg: Msg) -> None:
        event = self._cancels.get(cancel.request_id)
        if event is not None:
            event.set()
            return
        # Not here (yet): the request may still be on its way, since NATS orders messages per
        # subscription, not across them. Remember the cancel a while, bounded.
        self._early_cancels[cancel.request_id] = time.monotonic()
        while len(self._early_cancels) > EARLY_CANCELS_KEPT:
            self._early_cancels.popitem(last=False)

    @property
    def gpus(self) -> list:
        return list(self._gpus)

    # ------------------------------------------------------------ admin commands

    @property
    def state(self) -> str:
        if not self.draining:
            return "online"
        return "drained" if not any(s.active or s.waiting for s in self.served.values()) else "draining"

    async def _on_command(self, msg: Msg, _: Msg) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        self.draining = verb == subjects.NODE_DRAIN
        log.info("node command", command=verb, state=self.state)
        self._beat_now.set()
        active = sum(s.active + s.waiting for s in self.served.values())
        if msg.reply:
            reply = NodeCommandReply(
                ok=True,
                node_id=self.node_id,
                state=self.state,
                active_requests=active,
                message=f"{verb}: {active} request(s) still running" if active else verb,
            )
            await msg.respond(codec.encode(reply))

    # ------------------------------------------------------------ heartbeat

    def runtime_report(self) -> list[RuntimeStatus]:
        """Each runtime's availability with the models of its kind loaded now (FR-007), and the
        backend it computes on: its probe's (llama.cpp's build), else what a loaded engine chose."""
        statuses = list(self._runtime_status)
        if self.upstream is not None:
            statuses.append(
                RuntimeStatus(
                    name=UPSTREAM,
                    available=self.upstream.online,
                    version=self.upstream.server.shown,
                    error=self.upstream.last_error,
                    capabilities=list(UPSTREAM_CAPABILITIES),
                )
            )
        report = []
        for status in statuses:
            mine = [s for s in self.served.values() if s.runtime == status.name]
            backend, device = status.backend, status.device
            chosen = next((str(s.engine.device) for s in mine if getattr(s.engine, "device", None)), None)
            if backend is None and chosen is not None:  # torch / CTranslate2: "cuda", "cuda:1", "cpu", "mps"
                kind, _, index = chosen.partition(":")
                backend, device = (
                    kind,
                    memory.RAM if kind == "cpu" else memory.gpu_device(int(index) if index.isdigit() else 0),
                )
            report.append(
                msgspec.structs.replace(status, models=sorted(s.name for s in mine), backend=backend, device=device)
            )
        return report

    def heartbeat(self) -> NodeHeartbeat:
        cpu, mem_total, mem_used = system.cpu_and_memory()
        models = self.residency.models_report()
        listed = {m.name for m in models}
        models += [m for m in self.downloads.reports() if m.name not in listed]
        return NodeHeartbeat(
            node_id=self.node_id,
            hostname=self.hostname,
            started_at=self.started_at,
            sent_at=time.time(),
            interval_s=self.heartbeat_interval,
            runtimes=self.runtime_report(),
            models=models,
            gpus=self._gpus,
            cpu_percent=cpu,
            memory_total_bytes=mem_total,
            memory_used_bytes=mem_used,
            active_requests=sum(s.active for s in self.served.values()),
            queue_depth=sum(s.waiting for s in self.served.values()),
            max_parallel=sum(s.parallel for s in self.served.values()) or self.parallel,
            state=self.state,
            requests=list(self._cancels),
            memory=self.residency.memory_report(),
            loadable=self.residency.loadable_report(),
            keep_alive_s=self.keep_alive_s,
            placed=self.residency.placed(),
        )

    async def _publish_heartbeat(self) -> None:
        if self.silent:
            return
        self._gpus = await asyncio.to_thread(system.gpus)
        self.memory.set_gpus(self._gpus)
        data = codec.encode(self.heartbeat())
        await self.nc.publish(subjects.node_heartbeat(self.node_id), data)
        await self.kv_nodes.put(encode_token(self.node_id), data)

    async def _beat_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._beat_now.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._beat_now.wait(), timeout=self.heartbeat_interval)
            except TimeoutError:
                pass
            self._beat_now.clear()
            try:
                await self._publish_heartbeat()
            except Exception as exc:  # keep beating through reconnects
                log.warning("heartbeat failed", error=str(exc))

    async def _keep_alive_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEP_ALIVE_SWEEP_S)
            try:
                await self.residency.expire_idle()
            except Exception as exc:  # an engine that fails to close must not stop the sweeps
                log.warning("keep-alive sweep failed", error=str(exc))
