"""``GET /metrics``: the gateway's Prometheus metrics, one registry per gateway.

Requests are counted where every one of them passes exactly once: the history writer's
observers (:meth:`gateway.history.HistoryWriter.observe`), with the finished record (status,
model, node, provider, tokens, timings, cost). Nothing is added to the request path itself.

Counting a record is a dict lookup for its label tuple and a few additions to plain numbers
(about 1 µs); prometheus_client's own Counter and Histogram children cost about 5 µs for the
same record (a lock and a method call per increment), which bench/gateway_cpu.py would see.
Everything runs on the gateway's one event-loop thread, the scrape included, so the numbers
need no lock; :class:`RequestMetrics` turns them into metric families when Prometheus asks.
What is a state rather than an event (in-flight and queued requests, nodes, GPUs, downloads
running) is read at scrape time too, by the collectors of :mod:`gateway.cluster_metrics`.

Labels are bounded: endpoints and statuses by the code, providers by the configured ones,
nodes and models by the cluster (a model a client merely named, e.g. a 404, is ``_other``),
and each label has a ceiling past which new values are ``_other`` too.

Several gateways: each serves its own ``/metrics`` from its own registry; Prometheus scrapes
each one as a target and PromQL adds them up (docs/observability.md).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import Response

from events.messages import HistoryRecord

from .errors import ApiError

OTHER = "_other"  # a label value past its ceiling, or a model nobody serves
LOCAL = "local"  # the provider label of requests answered by nodes (or refused before any provider)
MAX_VALUES = 1000  # distinct values of one label (models, nodes) before new ones are OTHER
MAX_ALIASES = 20_000  # raw label tuples remembered; past it the table starts again (the counts stay)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Bounded:
    """The values one label has taken, up to a ceiling; beyond it, and for what ``admit``
    refuses, the value is OTHER. Asked only on a label tuple's first sight (then remembered)."""

    def __init__(self, ceiling: int = MAX_VALUES) -> None:
        self.ceiling = ceiling
        self.values: set[str] = set()

    def label(self, value: str, admit: bool = True) -> str:
        if value in self.values:
            return value
        if not admit or len(self.values) >= self.ceiling:
            return OTHER
        self.values.add(value)
        return value


class Histo:
    """One histogram's counts: per bucket (not cumulative; the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: Prometheus' "le"
        self.sum += value

    def add(self, other: Histo) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.sum += other.sum

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            cumulative += count
            out.append((floatToGoString(bound), cumulative))
        return out


class Series:
    """Everything counted for one label tuple (endpoint, model, node, provider, status)."""

    __slots__ = ("labels", "requests", "latency", "ttft", "queue", "tokens_in", "tokens_out", "cost")

    def __init__(self, labels: tuple[str, str, str, str, str]) -> None:
        self.labels = labels
        self.requests = 0
        self.latency = Histo(LATENCY_BUCKETS)
        self.ttft = Histo(TTFT_BUCKETS)
        self.queue = Histo(QUEUE_BUCKETS)
        self.tokens_in = self.tokens_out = 0
        self.cost = 0.0


class RequestMetrics:
    """Counts requests from their history records; a prometheus_client collector of them."""

    def __init__(self, *, known_model: Callable[[str], bool], providers: set[str]) -> None:
        """``known_model(name)``: whether the cluster serves or lists it (so it may be a label);
        ``providers``: the cloud providers' names (the prefixes of their models)."""
        self.known_model = known_model
        self.providers = providers
        self._series: dict[tuple, Series] = {}  # by labels
        self._aliases: dict[tuple, Series] = {}  # by the record's raw values
        self._models = Bounded()
        self._nodes = Bounded()

    def observe(self, record: HistoryRecord) -> None:
        """Count one finished request (a history observer: called once per record)."""
        status = record.status_code
        key = (record.endpoint, record.model, record.node_id, record.provider, status)
        series = self._aliases.get(key)
        if series is None:
            series = self._new_series(key)
        series.requests += 1
        if status < 400:
            series.latency.observe(record.duration_ms / 1000)
        if record.first_token_ms is not None:
            series.ttft.observe(record.first_token_ms / 1000)
        if record.queue_ms is not None:
            series.queue.observe(record.queue_ms / 1000)
        usage = record.usage
        if usage is not None:
            series.tokens_in += usage.prompt_tokens
            series.tokens_out += usage.completion_tokens
        if record.cost_usd:
            series.cost += record.cost_usd

    def _new_series(self, key: tuple) -> Series:
        endpoint, model, node_id, provider, status = key
        if provider is None:  # a refusal before any call: its provider is the model's prefix
            prefix = model.partition(":")[0] if ":" in model else ""
            provider = prefix if prefix in self.providers else LOCAL
        # A cloud model is a label once a provider answered it; a local one while the cluster knows it.
        known = (status < 400 or self.known_model(model)) if provider != LOCAL else self.known_model(model)
        labels = (endpoint, self._models.label(model, known), self._nodes.label(node_id) if node_id else "")
        labels = (*labels, provider, str(status))
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = Series(labels)
        if len(self._aliases) >= MAX_ALIASES:
            self._aliases.clear()
        self._aliases[key] = series
        return series

    # ------------------------------------------------------------ at scrape time

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        where = ("endpoint", "model", "node", "provider")
        requests = CounterMetricFamily(
            "llm_router_requests",
            "Requests by endpoint, model, node, provider (local or the cloud provider) and HTTP status.",
            labels=(*where, "status"),
        )
        latency: dict[tuple, Histo] = {}
        ttft: dict[tuple, Histo] = {}
        queue: dict[tuple, Histo] = {}
        tokens: dict[tuple, int] = {}
        cost: dict[tuple, float] = {}
        for labels, s in self._series.items():
            requests.add_metric(labels, s.requests)
            endpoint, model, node, provider, _ = labels
            for table, histo, by in (
                (latency, s.latency, labels[:4]),
                (ttft, s.ttft, labels[:4]),
                (queue, s.queue, (model,)),
            ):
                if any(histo.counts):
                    table.setdefault(by, Histo(histo.bounds)).add(histo)
            for direction, n in (("in", s.tokens_in), ("out", s.tokens_out)):
                if n:
                    tokens[(direction, model, node, provider)] = tokens.get((direction, model, node, provider), 0) + n
            if s.cost:
                cost[(model, provider)] = cost.get((model, provider), 0.0) + s.cost
        yield requests
        yield _histograms(
            "llm_router_request_duration_seconds",
            "Time from a request's arrival to its last byte, of answered (status below 400) requests.",
            where,
            latency,
        )
        yield _histograms(
            "llm_router_time_to_first_token_seconds",
            "Time from a streamed request's arrival to its first token.",
            where,
            ttft,
        )
        yield _histograms(
            "llm_router_queue_wait_seconds",
            "Time a request for a node waited in this gateway's queue for a free slot (0 for most).",
            ("model",),
            queue,
        )
        yield _counters(
            "llm_router_tokens",
            "Tokens in (prompt) and out (completion).",
            ("direction", "model", "node", "provider"),
            tokens,
        )
        yield _counters(
            "llm_router_cost_usd", "Cost of answered requests from the price table.", ("model", "provider"), cost
        )


def _histograms(name: str, documentation: str, labels: tuple[str, ...], table: dict[tuple, Histo]) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, histo in table.items():
        family.add_metric(values, histo.buckets(), histo.sum)
    return family


def _counters(name: str, documentation: str, labels: tuple[str, ...], table: dict[tuple, float]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, n in table.items():
        family.add_metric(values, n)
    return family


class Metrics:
    """One gateway's registry: request metrics, scrape-time collectors, the process's own."""

    def __init__(
        self, *, known_model: Callable[[str], bool], providers: set[str], collectors: tuple[Collector, ...] = ()
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(known_model=known_model, providers=providers)
        for collector in (self.requests, *collectors):
            self.registry.register(collector)
        ProcessCollector(registry=self.registry)  # this gateway's CPU, memory, open files

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (OpenMetrics when the scraper asks for it) and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


async def metrics_page(request: Request) -> Response:
    """``GET /metrics`` (the ``read`` scope with keys on: gateway.auth.required_scope)."""
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is None:
        raise ApiError(404, "Metrics are off on this gateway (--no-metrics).", code="metrics_off")
    body, content_type = metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)
