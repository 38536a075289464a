"""The node agent: heartbeat, registry sync, and one subscription per (capability, model).

A node subscribes only to the subjects of models it has loaded, so NATS itself routes each
capability to nodes that can serve it. Registry events arrive through a durable consumer, so
a node that was offline replays what it missed (a delete, above all) when it comes back.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError

from broker import NatsAuth, connect, provision
from broker.endpoints import Endpoint, Service
from broker.logship import REQUEST_ID, SHIPPER
from events import codec, encode_token, name_error, storage, subjects
from events.capabilities import CAPABILITIES
from events.messages import (
    CancelRequest,
    InferenceRequest,
    LoadedModel,
    ModelEvent,
    ModelRecord,
    ModelSource,
    NodeCommandReply,
    NodeDownload,
    NodeDownloadReply,
    NodeGoodbye,
    NodeHeartbeat,
    RuntimeStatus,
)

from . import cache, system
from .downloads import Downloads
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
    ) -> None:
        """``predownload``: "all" fetches every model it can run as soon as it is registered,
        "registered" only those registered with ``predownload``, "none" waits for a request.
        ``upstream``: serve an existing OpenAI-compatible server's models (nodes/upstream_link.py)
        instead of engines of its own (``runtimes`` then defaults to none)."""
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
        self.served: dict[str, ServedModel] = {}
        self.failed: dict[str, LoadedModel] = {}
        self._subs: dict[str, list[Endpoint]] = {}  # each loaded model's inference endpoints
        self._cancels: dict[str, threading.Event] = {}
        self._early_cancels: OrderedDict[str, float] = OrderedDict()  # cancels that arrived first
        self._sync_lock = asyncio.Lock()
        self._beat_now = asyncio.Event()
        self._runtime_status: list = []
        self._heartbeat_task: asyncio.Task | None = None
        self._gpus: list = []

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._gpus = await asyncio.to_thread(system.gpus)
        if not self._gpus and not self.allow_cpu and self.upstream is None:  # an upstream's GPUs are its own
            raise RuntimeError("no GPU found on this machine; start the node with --allow-cpu to serve on CPU")
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
        self.downloads = Downloads(self.nc, self.js, self.node_id, self.resolver, on_complete=self._ensure_loaded)
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
        await self._sync_snapshot()
        if self.upstream is not None:
            await self.upstream.start(self)  # its models served before the node says it is ready
        await self._publish_heartbeat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
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
        await self.downloads.stop()
        await self._events_sub.unsubscribe()
        self._subs.clear()
        await self.service.stop(timeout=30)  # no new requests; in-flight ones finish their answers

        try:
            await self.nc.publish(subjects.node_goodbye(self.node_id), codec.encode(NodeGoodbye(node_id=self.node_id)))
            await self.kv_nodes.delete(encode_token(self.node_id))
        except Exception as exc:  # NATS already gone: the heartbeat TTL removes us anyway
            log.warning("goodbye not delivered", error=str(exc))
        # The durable registry consumer stays on the server, so a restart replays what we miss.
        for served in self.served.values():
            await served.close()
        self.served.clear()
        if self.upstream is not None:
            await self.upstream.stop()
        await SHIPPER.detach(self.nc)
        await self.nc.drain()
        log.info("node stopped", node_id=self.node_id)

    # ------------------------------------------------------------ registry sync

    async def _sync_snapshot(self) -> None:
        try:
            keys = await self.kv_models.keys()
        except NoKeysError:
            keys = []
        for key in keys:
            entry = await self.kv_models.get(key)
            if entry.value:
                await self._ensure_loaded(codec.decode(entry.value, ModelRecord))

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
            await self._ensure_loaded(event.record)
        await msg.ack()

    async def _ensure_loaded(self, record: ModelRecord) -> None:
        async with self._sync_lock:
            current = self.served.get(record.name)
            if current is not None and current.record.source.kind == "upstream":
                return  # the name is an upstream model's here; the registry's record is for other nodes
            if current is not None and current.record.source == record.source:
                current.record = record
                return
            if current is not None:
                await self._unload_locked(record.name, reason="source changed")
            if record.state == "pending_conversion":
                return  # never distributed until converted
            runtime, _ = self._runtime_for(record)
            if runtime is None:
                return  # this node cannot run it: another node will
            location = await asyncio.to_thread(self.resolver.local, record)
            if location is None:
                if self._wants_predownload(record) and record.name not in self.downloads.failed:
                    await self._spawn(self._prefetch)(record)
                return
            path = str(location.path)
            failed = self.failed.get(record.name)
            if failed is not None and failed.artifact_path == path:
                return  # this file already failed to load; registry state updates do not change that
            self.failed.pop(record.name, None)
            try:
                engine = await asyncio.to_thread(
                    runtime.load, cache.for_loading(record, location.path), path, slots=self.parallel
                )
            except Exception as exc:
                log.error("model load failed", model=record.name, error=str(exc))
                self.failed[record.name] = LoadedModel(
                    name=record.name,
                    runtime=runtime.name,
                    capabilities=record.capabilities,
                    state="error",
                    artifact_path=path,
                    error=str(exc),
                )
                self._beat_now.set()
                return
            await self._serve(record, runtime.name, engine, path)

    async def _serve(self, record: ModelRecord, runtime: str, engine, path: str) -> None:
        """Serve a loaded engine on its capabilities' subjects (the shared one and this node's own)."""
        served = ServedModel(record, runtime, engine, path)
        self.served[record.name] = served
        endpoints = []
        for capability in served.capabilities:
            handler = self._request_handler(served)
            options = {
                "kind": CAPABILITIES[capability].request,
                "refuse": self._refuse_request,
                "metadata": {"model": record.name, "capability": capability},
            }
            endpoints.append(
                await self.service.add(
                    capability, subjects.infer(capability, record.name), handler, queue=subjects.INFER_QUEUE, **options
                )
            )
            endpoints.append(
                await self.service.add(
                    capability, subjects.infer_on_node(capability, record.name, self.node_id), handler, **options
                )
            )
        self._subs[record.name] = endpoints
        log.info("model loaded", model=record.name, runtime=runtime, path=path)
        self._beat_now.set()

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
            await self.downloads.ensure(record)
        except (ModelNotFound, SourceUnavailable) as exc:
            log.warning("pre-download impossible", model=record.name, error=str(exc))
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
            self.failed.pop(record.name, None)  # asked again: try loading again too
            await self._ensure_loaded(record)
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
        self.failed.pop(name, None)
        for endpoint in self._subs.pop(name, []):
            await self.service.remove(endpoint)
        served = self.served.pop(name, None)
        if served is not None:
            await served.close()
            log.info("model unloaded", model=name, reason=reason)
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
            await self._serve(record, UPSTREAM, engine, shown)

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

    def _request_handler(self, served: ServedModel):
        async def handle(request: InferenceRequest, msg: Msg) -> None:
            if not msg.reply:
                return
            responder = Responder(self.nc, msg.reply, request.request_id, self.node_id)
            if self.draining:  # the gateway sends elsewhere; a direct client learns why
                await responder.fail(
                    503, f"node {self.node_id} is draining", type="service_unavailable", code="node_draining"
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
        """Each runtime's availability with the models of its kind loaded now (FR-007)."""
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
        return [
            msgspec.structs.replace(
                status, models=sorted(s.name for s in self.served.values() if s.runtime == status.name)
            )
            for status in statuses
        ]

    def heartbeat(self) -> NodeHeartbeat:
        cpu, mem_total, mem_used = system.cpu_and_memory()
        models = [s.report() for s in self.served.values()] + list(self.failed.values())
        models += [m for m in self.downloads.reports() if m.name not in self.served and m.name not in self.failed]
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
        )

    async def _publish_heartbeat(self) -> None:
        if self.silent:
            return
        self._gpus = await asyncio.to_thread(system.gpus)
        data = codec.encode(self.heartbeat())
        await self.nc.publish(subjects.node_heartbeat(self.node_id), data)
        await self.kv_nodes.put(encode_token(self.node_id), data)

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
