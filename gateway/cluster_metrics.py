"""What ``/metrics`` reads at scrape time: nodes and GPUs, this gateway's dispatch state, downloads.

Node state is already mirrored from the heartbeats (:class:`broker.mirrors.NodeDirectory`), and
the dispatcher holds its in-flight and queued requests, so :class:`ClusterCollector` turns
those into gauges when Prometheus asks, instead of setting gauges on every heartbeat or
request: no work at all between scrapes. Every gateway reports the same nodes (each mirrors
all heartbeats): in PromQL take ``max by (node)`` of node gauges, and ``sum`` of the gateways'
own (in-flight, queued). Downloads are events (progress reports on ``downloads.progress.>``),
so :class:`DownloadMeter` follows them and counts bytes, completions and failures.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from broker.mirrors import NodeDirectory
from events import codec, subjects
from events.messages import DownloadProgress

from .dispatch import Dispatcher
from .metrics import Bounded

log = structlog.get_logger("gateway.metrics")

DOWNLOAD_STALE_S = 30.0  # a running download not reported for this long (its node died) is no longer running


def _gauge(name: str, documentation: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


class ClusterCollector:
    """Gauges of the nodes (from their last heartbeats) and of this gateway's dispatcher."""

    def __init__(self, directory: NodeDirectory, dispatcher: Dispatcher) -> None:
        self.directory = directory
        self.dispatcher = dispatcher

    def describe(self) -> list[Metric]:
        return []  # no fixed set of names to check for collisions: collected only at scrape time

    def collect(self) -> Iterator[Metric]:
        yield from self._nodes()
        yield from self._dispatch()

    def _nodes(self) -> Iterator[Metric]:
        up = _gauge("llm_router_node_up", "1 while the node's heartbeats arrive, 0 once they stopped.", "node")
        info = _gauge(
            "llm_router_node_info",
            "The node's host and state (online, draining, drained).",
            "node",
            "hostname",
            "state",
        )
        age = _gauge("llm_router_node_heartbeat_age_seconds", "Seconds since the node's last heartbeat.", "node")
        slots = _gauge("llm_router_node_slots", "Requests the node runs at once for a ready model.", "node", "model")
        busy = _gauge(
            "llm_router_node_model_active_requests", "Requests the node runs now for the model.", "node", "model"
        )
        active = _gauge("llm_router_node_active_requests", "Requests the node runs now (every gateway's).", "node")
        queue = _gauge("llm_router_node_queue_depth", "Requests waiting on the node for a slot.", "node")
        parallel = _gauge("llm_router_node_max_parallel", "Requests the node runs at once, all models.", "node")
        cpu = _gauge("llm_router_node_cpu_percent", "The node's CPU utilisation.", "node")
        mem_used = _gauge("llm_router_node_memory_used_bytes", "The node's memory in use.", "node")
        mem_total = _gauge("llm_router_node_memory_total_bytes", "The node's memory.", "node")
        gpu_info = _gauge("llm_router_node_gpu_info", "A GPU of the node (NVML) and its name.", "node", "gpu", "name")
        gpu_util = _gauge("llm_router_node_gpu_utilization_percent", "GPU utilisation (NVML).", "node", "gpu")
        gpu_used = _gauge("llm_router_node_gpu_memory_used_bytes", "GPU memory in use (NVML).", "node", "gpu")
        gpu_total = _gauge("llm_router_node_gpu_memory_total_bytes", "GPU memory (NVML).", "node", "gpu")
        for beat, live, seconds in self.directory.known():
            node = beat.node_id
            up.add_metric([node], 1 if live else 0)
            age.add_metric([node], seconds)
            if not live:
                continue  # its last figures are stale
            info.add_metric([node, beat.hostname, beat.state], 1)
            for model in beat.models:
                if model.servable:
                    slots.add_metric([node, model.name], model.parallel or beat.max_parallel or 1)
                    busy.add_metric([node, model.name], model.active_requests)
            active.add_metric([node], beat.active_requests)
            queue.add_metric([node], beat.queue_depth)
            parallel.add_metric([node], beat.max_parallel)
            cpu.add_metric([node], beat.cpu_percent)
            mem_used.add_metric([node], beat.memory_used_bytes)
            mem_total.add_metric([node], beat.memory_total_bytes)
            for gpu in beat.gpus:
                index = str(gpu.index)
                gpu_info.add_metric([node, index, gpu.name], 1)
                if gpu.utilization_percent is not None:
                    gpu_util.add_metric([node, index], gpu.utilization_percent)
                gpu_used.add_metric([node, index], gpu.memory_used_bytes)
                gpu_total.add_metric([node, index], gpu.memory_total_bytes)
        yield from (up, info, age, slots, busy, active, queue, parallel, cpu, mem_used, mem_total)
        yield from (gpu_info, gpu_util, gpu_used, gpu_total)

    def _dispatch(self) -> Iterator[Metric]:
        """This gateway's requests on nodes and in its queue: 0 for every model a live node
        serves, so a graph shows an idle model rather than no data."""
        inflight = Counter({(model, node): n for (node, model), n in self.dispatcher.inflight.items()})
        queued = self.dispatcher.queued()
        for beat in self.directory.live():
            for model in beat.models:
                if model.servable:
                    inflight[(model.name, beat.node_id)] += 0
                    queued[model.name] += 0
        running = _gauge(
            "llm_router_inflight_requests",
            "Requests this gateway has on a node now, by model and node.",
            "model",
            "node",
        )
        for (model, node), n in sorted(inflight.items()):
            running.add_metric([model, node], n)
        waiting = _gauge(
            "llm_router_queued_requests", "Requests waiting in this gateway's queue for a free slot.", "model"
        )
        for model, n in sorted(queued.items()):
            waiting.add_metric([model], n)
        yield running
        yield waiting


class DownloadMeter:
    """Bytes, completions and failures of model downloads, from the nodes' progress reports.

    A report carries the bytes done so far; the meter adds what a download did since its last
    report. The first report seen of a download is its baseline (one begun before this gateway
    listened is not counted twice), and a file a node already had (reported done at once) is
    not a download."""

    def __init__(self) -> None:
        self.bytes: Counter[tuple[str, str]] = Counter()
        self.finished: Counter[tuple[str, str]] = Counter()
        self.failures: Counter[tuple[str, str]] = Counter()
        self._running: dict[tuple[str, str], tuple[str | None, int, float]] = {}  # task, bytes done, when
        self._nodes = Bounded()
        self._models = Bounded()
        self._sub = None

    async def start(self, nc: Client) -> None:
        self._sub = await nc.subscribe(subjects.DOWNLOADS_PROGRESS_ALL, cb=self._on_progress)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_progress(self, msg: Msg) -> None:
        progress = codec.decode_published(msg, DownloadProgress, log, "download progress")
        if progress is not None:
            self.note(progress)

    def note(self, progress: DownloadProgress) -> None:
        download = (progress.node_id, progress.model)
        labels = (self._nodes.label(progress.node_id), self._models.label(progress.model))
        last = self._running.pop(download, None)
        seen = last is not None and last[0] == progress.task_id
        if seen:
            self.bytes[labels] += max(0, progress.bytes_done - last[1])
        if progress.state == "running":
            self._running[download] = (progress.task_id, progress.bytes_done, time.monotonic())
        elif progress.state == "failed":
            self.failures[labels] += 1
        elif seen:
            self.finished[labels] += 1

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families = (
            ("llm_router_download_bytes", "Bytes of model files nodes downloaded.", self.bytes),
            ("llm_router_downloads_finished", "Model downloads that finished.", self.finished),
            ("llm_router_download_failures", "Model downloads that failed (or were cancelled).", self.failures),
        )
        for name, documentation, counts in families:
            family = CounterMetricFamily(name, documentation, labels=("node", "model"))
            for (node, model), n in sorted(counts.items()):
                family.add_metric([node, model], n)
            yield family
        cutoff = time.monotonic() - DOWNLOAD_STALE_S
        running: Counter[str] = Counter()
        for download, (_, _, when) in list(self._running.items()):
            if when < cutoff:  # its node stopped reporting (died): not running any more
                del self._running[download]
            else:
                running[self._nodes.label(download[0])] += 1
        family = GaugeMetricFamily("llm_router_downloads_running", "Model downloads in progress.", labels=("node",))
        for node, n in sorted(running.items()):
            family.add_metric([node], n)
        yield family
