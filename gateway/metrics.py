"""``GET /metrics``: the gateway's Prometheus metrics, one registry per gateway.

Requests are counted where every one of them passes exactly once: the history writer's
observers (:meth:`gateway.history.HistoryWriter.observe`), with the finished record (status,
model, node, provider, tokens, timings, cost). Nothing on the request path itself: the record
is made anyway, and counting it is a dict lookup for its label tuple (the prometheus_client
children are cached per tuple, since ``labels()`` costs about a microsecond) and a few
increments. What is a state rather than an event (in-flight and queued requests, nodes, GPUs,
downloads running) is read at scrape time by the collectors of :mod:`gateway.cluster_metrics`.

Labels are bounded: endpoints and statuses by the code, providers by the configured ones,
nodes and models by the cluster (a model a client merely named, e.g. a 404, is ``_other``),
and each label has a ceiling past which new values are ``_other`` too.

Several gateways: each serves its own ``/metrics`` from its own registry; Prometheus scrapes
each one as a target and PromQL adds them up (docs/observability.md).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from events.messages import HistoryRecord

from .errors import ApiError

OTHER = "_other"  # a label value past its ceiling, or a model nobody serves
LOCAL = "local"  # the provider label of requests answered by nodes (or refused before any provider)
MAX_VALUES = 1000  # distinct values of one label (models, nodes) before new ones are OTHER
MAX_CACHED = 20_000  # label tuples whose children are cached; past it the cache starts again

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Bounded:
    """The values one label has taken, up to a ceiling; beyond it, and for what ``admit``
    refuses, the value is OTHER. Asked only on a label tuple's first sight (then cached)."""

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


class _Series:
    """The children of the metrics one label tuple of a record moves, each made on first use
    (an error has no latency, an embedding no first token: no empty series for them)."""

    __slots__ = ("labels", "requests", "latency", "ttft", "queue", "tokens_in", "tokens_out", "cost")

    def __init__(self, m: RequestMetrics, endpoint: str, model: str, node: str, provider: str, status: str) -> None:
        self.labels = (endpoint, model, node, provider)
        self.requests = m.requests.labels(endpoint, model, node, provider, status)
        self.latency = self.ttft = self.queue = self.tokens_in = self.tokens_out = self.cost = None


class RequestMetrics:
    """Counters and histograms of requests, moved by one call per history record."""

    def __init__(self, registry: CollectorRegistry, *, known_model: Callable[[str], bool], providers: set[str]) -> None:
        """``known_model(name)``: whether the cluster serves or lists it (so it may be a label);
        ``providers``: the cloud providers' names (the prefixes of their models)."""
        self.known_model = known_model
        self.providers = providers
        where = ("endpoint", "model", "node", "provider")
        self.requests = Counter(
            "llm_router_requests",
            "Requests by endpoint, model, node, provider (local or the cloud provider) and HTTP status.",
            (*where, "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "llm_router_request_duration_seconds",
            "Time from the request's arrival to its last byte, of answered (2xx/3xx) requests.",
            where,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "llm_router_time_to_first_token_seconds",
            "Time from a streamed request's arrival to its first token.",
            where,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "llm_router_queue_wait_seconds",
            "Time a request dispatched to a node waited in this gateway's queue for a free slot (0 for most).",
            ("model",),
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "llm_router_tokens",
            "Tokens in (prompt) and out (completion) of answered requests.",
            ("direction", "model", "node", "provider"),
            registry=registry,
        )
        self.cost = Counter(
            "llm_router_cost_usd",
            "Cost of answered requests from the price table (models it prices only).",
            ("model", "provider"),
            registry=registry,
        )
        self._series: dict[tuple, _Series] = {}
        self._models = Bounded()
        self._nodes = Bounded()

    def observe(self, record: HistoryRecord) -> None:
        """Count one finished request (a history observer: called once per record)."""
        status = record.status_code
        key = (record.endpoint, record.model, record.node_id, record.provider, status)
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key)
        series.requests.inc()
        if status < 400:
            (series.latency or self._child(series, "latency")).observe(record.duration_ms / 1000)
        if record.first_token_ms is not None:
            (series.ttft or self._child(series, "ttft")).observe(record.first_token_ms / 1000)
        if record.queue_ms is not None:
            (series.queue or self._child(series, "queue")).observe(record.queue_ms / 1000)
        usage = record.usage
        if usage is not None:
            if usage.prompt_tokens:
                (series.tokens_in or self._child(series, "tokens_in")).inc(usage.prompt_tokens)
            if usage.completion_tokens:
                (series.tokens_out or self._child(series, "tokens_out")).inc(usage.completion_tokens)
        if record.cost_usd:
            (series.cost or self._child(series, "cost")).inc(record.cost_usd)

    def _child(self, series: _Series, name: str):
        """Make (once) one of a series' children: its metric's ``labels()`` with the series' labels."""
        endpoint, model, node, provider = series.labels
        if name == "latency":
            child = self.latency.labels(*series.labels)
        elif name == "ttft":
            child = self.ttft.labels(*series.labels)
        elif name == "queue":
            child = self.queue_wait.labels(model)
        elif name == "cost":
            child = self.cost.labels(model, provider)
        else:
            child = self.tokens.labels("in" if name == "tokens_in" else "out", model, node, provider)
        setattr(series, name, child)
        return child

    def _new_series(self, key: tuple) -> _Series:
        endpoint, model, node_id, provider, status = key
        if provider is None:  # a refusal before any call names its provider by the model's prefix
            prefix = model.partition(":")[0] if ":" in model else ""
            provider = prefix if prefix in self.providers else LOCAL
        # A cloud model is a label once a provider answered it; a local one while the cluster knows it.
        known = (status < 400 or self.known_model(model)) if provider != LOCAL else self.known_model(model)
        model_label = self._models.label(model, known)
        node = self._nodes.label(node_id) if node_id else ""
        if len(self._series) >= MAX_CACHED:
            self._series.clear()
        series = self._series[key] = _Series(self, endpoint, model_label, node, provider, str(status))
        return series


class Metrics:
    """One gateway's registry: request metrics, scrape-time collectors, the process's own."""

    def __init__(
        self, *, known_model: Callable[[str], bool], providers: set[str], collectors: tuple[Collector, ...] = ()
    ) -> None:
        # No ``_created`` series beside every counter and histogram: twice the series for a
        # timestamp nobody queries (process-wide, and this process's only registry is ours).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry, known_model=known_model, providers=providers)
        for collector in collectors:
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
