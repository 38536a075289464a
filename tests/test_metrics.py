"""``GET /metrics``: Prometheus text that prometheus_client's own parser reads, moving with the requests.

A real registry, gateway (keys on) and node run in this test's event loop (tests/inprocess.py)
on the session's nats-server; the node's instant engine takes ``DELAY_S`` per chat with one
slot, so concurrent requests queue in the gateway. The gateway also has OpenAI's fake
(tests/fake_providers.py) as a cloud provider. Heartbeats with GPUs and download progress are
published on NATS as a node would publish them.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import nats
import openai
import pytest
from fake_providers import KEYS, FakeOpenAI
from inprocess import minimal_engine, running
from prometheus_client.parser import text_string_to_metric_families

from events import codec, subjects
from events.messages import DownloadProgress, GpuInfo, NodeGoodbye, NodeHeartbeat, RegisterModel
from gateway import Gateway
from gateway.metrics import OTHER
from gateway.providers import Clouds, ProviderSettings

MODEL = "metrics-tiny"
CLOUD = "openai:gpt-4o-mini"
DELAY_S = 0.2
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]

Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
async def fake_openai():
    fake = await FakeOpenAI(KEYS["openai"]).start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def stack(nats_url, tiny_gguf, fake_openai, tmp_path_factory):
    clouds = Clouds([ProviderSettings("openai", KEYS["openai"], fake_openai.url + "/v1")])
    async with running(
        nats_url, tmp_path_factory.mktemp("metrics"), delay_s=DELAY_S, parallel=1, clouds=clouds
    ) as stack:
        await clouds.catalog.attempted()
        reply = await stack.registry.register(RegisterModel(path=str(tiny_gguf), name=MODEL))
        assert reply.ok, reply.message
        await stack.serving(MODEL)
        yield stack
        await stack.registry.delete(MODEL)


def sdk(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key=stack.admin, http_client=stack.client, max_retries=0)


async def scrape(stack, headers: dict | None = None) -> Samples:
    """Every sample of ``/metrics``, by name and labels, read with prometheus_client's parser."""
    answer = await stack.client.get("/metrics", headers=headers or stack.bearer())
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, /, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def moved(before: Samples, after: Samples, name: str, /, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_counters_and_histograms_move_with_the_requests_sent(stack) -> None:
    node = stack.node.node_id
    before = await scrape(stack)
    client = sdk(stack)
    for _ in range(3):
        answer = await client.chat.completions.create(model=MODEL, messages=HI)
        assert answer.choices[0].message.content == minimal_engine.TEXT
    stream = await client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == minimal_engine.TEXT
    await client.embeddings.create(model=MODEL, input=["a", "b"])
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model=f"nowhere-{uuid.uuid4().hex[:6]}", messages=HI)
    after = await scrape(stack)

    where = {"endpoint": CHAT, "model": MODEL, "node": node, "provider": "local"}
    assert moved(before, after, "llm_router_requests_total", **where, status="200") == 4
    assert moved(before, after, "llm_router_requests_total", endpoint="/v1/embeddings", model=MODEL, status="200") == 1
    # A model nobody serves is not a label value of its own (clients choose names freely).
    assert moved(before, after, "llm_router_requests_total", endpoint=CHAT, model=OTHER, node="", status="404") == 1
    assert moved(before, after, "llm_router_request_duration_seconds_count", **where) == 4
    took = moved(before, after, "llm_router_request_duration_seconds_sum", **where)
    assert 4 * DELAY_S <= took < 4 * DELAY_S + 5
    # The stream's first token comes at once; its answer ends after the engine's service time.
    assert moved(before, after, "llm_router_time_to_first_token_seconds_count", **where) == 1
    assert moved(before, after, "llm_router_time_to_first_token_seconds_sum", **where) < DELAY_S
    assert moved(before, after, "llm_router_queue_wait_seconds_count", model=MODEL) == 5  # every dispatched request
    assert moved(before, after, "llm_router_tokens_total", direction="in", model=MODEL, provider="local") == 4 + 2
    assert moved(before, after, "llm_router_tokens_total", direction="out", model=MODEL, node=node) == 4
    assert value(after, "process_cpu_seconds_total") > 0  # this gateway process's own


async def test_requests_beyond_the_slots_show_as_in_flight_and_queued(stack) -> None:
    node = stack.node.node_id
    before = await scrape(stack)
    assert value(before, "llm_router_inflight_requests", model=MODEL, node=node) == 0  # present while idle
    assert value(before, "llm_router_queued_requests", model=MODEL) == 0
    client = sdk(stack)
    asks = [asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HI)) for _ in range(3)]
    deadline = time.monotonic() + 5
    while stack.gateway.dispatcher.waiting < 2:
        assert time.monotonic() < deadline, "the requests never queued"
        await asyncio.sleep(0.01)
    during = await scrape(stack)
    await asyncio.gather(*asks)
    after = await scrape(stack)

    assert value(during, "llm_router_inflight_requests", model=MODEL, node=node) == 1  # one slot
    assert value(during, "llm_router_queued_requests", model=MODEL) == 2
    assert value(after, "llm_router_queued_requests", model=MODEL) == 0
    assert value(after, "llm_router_inflight_requests", model=MODEL) == 0
    assert moved(before, after, "llm_router_queue_wait_seconds_count", model=MODEL) == 3
    # The two that queued waited for one and for two service times.
    assert moved(before, after, "llm_router_queue_wait_seconds_sum", model=MODEL) >= 2 * DELAY_S
    assert moved(before, after, "llm_router_queue_wait_seconds_bucket", model=MODEL, le="0.001") <= 1


async def test_node_slots_load_and_gpus_come_from_the_heartbeats(stack, nats_url) -> None:
    node = stack.node.node_id
    samples = await scrape(stack)
    assert value(samples, "llm_router_node_up", node=node) == 1
    assert value(samples, "llm_router_node_info", node=node, state="online") == 1
    assert value(samples, "llm_router_node_slots", node=node, model=MODEL) == 1
    assert value(samples, "llm_router_node_memory_total_bytes", node=node) > 0
    assert ("llm_router_node_active_requests", frozenset({("node", node)})) in samples

    gpu_node = f"gpu-{uuid.uuid4().hex[:6]}"
    gpu = GpuInfo(
        index=0,
        name="NVIDIA H200",
        memory_total_bytes=141 * 2**30,
        memory_used_bytes=20 * 2**30,
        utilization_percent=57,
    )
    now = time.time()
    beat = NodeHeartbeat(
        node_id=gpu_node, hostname="gpu-host", started_at=now, sent_at=now, interval_s=2.0, gpus=[gpu], max_parallel=8
    )
    nc = await nats.connect(nats_url)
    try:
        await nc.publish(subjects.node_heartbeat(gpu_node), codec.encode(beat))
        await nc.flush()
        deadline = time.monotonic() + 5
        while not stack.gateway.directory.is_live(gpu_node):
            assert time.monotonic() < deadline, "the heartbeat never arrived"
            await asyncio.sleep(0.01)
        samples = await scrape(stack)
        assert value(samples, "llm_router_node_gpu_utilization_percent", node=gpu_node, gpu="0") == 57
        assert value(samples, "llm_router_node_gpu_memory_used_bytes", node=gpu_node, gpu="0") == 20 * 2**30
        assert value(samples, "llm_router_node_gpu_memory_total_bytes", node=gpu_node, gpu="0") == 141 * 2**30
        assert value(samples, "llm_router_node_gpu_info", node=gpu_node, name="NVIDIA H200") == 1
        assert value(samples, "llm_router_node_max_parallel", node=gpu_node) == 8
    finally:
        await nc.publish(subjects.node_goodbye(gpu_node), codec.encode(NodeGoodbye(node_id=gpu_node)))
        await nc.close()


async def test_download_bytes_and_failures_follow_the_progress_reports(stack, nats_url) -> None:
    node, model = f"dl-{uuid.uuid4().hex[:6]}", f"dl-model-{uuid.uuid4().hex[:6]}"
    labels = {"node": node, "model": model}
    nc = await nats.connect(nats_url)

    async def report(state: str, done: int, task: str = "t1", error: str | None = None) -> None:
        progress = DownloadProgress(
            node_id=node, model=model, state=state, bytes_done=done, bytes_total=5000, task_id=task, error=error
        )
        await nc.publish(subjects.downloads_progress(node, model), codec.encode(progress))
        await nc.flush()

    async def settled(name: str, expected: float, **extra: str) -> Samples:
        deadline = time.monotonic() + 5
        while True:
            samples = await scrape(stack)
            if value(samples, name, **labels, **extra) == expected or time.monotonic() > deadline:
                return samples
            await asyncio.sleep(0.02)

    try:
        await report("running", 0)
        await report("running", 1000)
        await report("running", 3000)
        samples = await settled("llm_router_download_bytes_total", 3000)
        assert value(samples, "llm_router_download_bytes_total", **labels) == 3000
        assert value(samples, "llm_router_downloads_running", node=node) == 1
        await report("done", 5000)
        samples = await settled("llm_router_downloads_finished_total", 1)
        assert value(samples, "llm_router_download_bytes_total", **labels) == 5000
        assert value(samples, "llm_router_downloads_finished_total", **labels) == 1
        assert value(samples, "llm_router_downloads_running", node=node) == 0
        await report("done", 5000, task="t2")  # a file the node already had: no bytes, not a download
        await report("running", 0, task="t3")
        await report("failed", 200, task="t3", error="origin said 503")
        samples = await settled("llm_router_download_failures_total", 1)
        assert value(samples, "llm_router_download_failures_total", **labels) == 1
        assert value(samples, "llm_router_download_bytes_total", **labels) == 5200
        assert value(samples, "llm_router_downloads_finished_total", **labels) == 1
    finally:
        await nc.close()


async def test_a_cloud_call_shows_under_its_provider(stack) -> None:
    before = await scrape(stack)
    client = sdk(stack)
    answer = await client.chat.completions.create(model=CLOUD, messages=HI)
    assert answer.choices[0].message.content == "echo: hi"
    stream = await client.chat.completions.create(
        model=CLOUD, messages=HI, stream=True, stream_options={"include_usage": True}
    )
    assert [chunk async for chunk in stream]
    with pytest.raises(openai.RateLimitError):  # the fake's 429, passed on with the provider's status
        await client.chat.completions.create(model="openai:rate-limited", messages=HI)
    after = await scrape(stack)

    cloud = {"endpoint": CHAT, "model": CLOUD, "node": "", "provider": "openai"}
    assert moved(before, after, "llm_router_requests_total", **cloud, status="200") == 2
    assert moved(before, after, "llm_router_requests_total", provider="openai", status="429") == 1
    assert moved(before, after, "llm_router_request_duration_seconds_count", **cloud) == 2
    assert moved(before, after, "llm_router_time_to_first_token_seconds_count", **cloud) == 1
    assert moved(before, after, "llm_router_tokens_total", direction="in", model=CLOUD, provider="openai") == 2 * 1
    assert moved(before, after, "llm_router_queue_wait_seconds_count", model=CLOUD) == 0  # no queue for a cloud


async def test_keys_on_metrics_need_the_read_scope(stack) -> None:
    answer = await stack.client.get("/metrics")
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "missing_api_key"
    reader = await stack.create_key(scopes=["read"])
    assert "llm_router_requests" in {
        family.name
        for family in text_string_to_metric_families(
            (await stack.client.get("/metrics", headers=stack.bearer(reader["key"]))).text
        )
    }
    inference = await stack.create_key(scopes=["inference"])
    assert (await stack.client.get("/metrics", headers=stack.bearer(inference["key"]))).status_code == 403
    openmetrics = await stack.client.get(
        "/metrics", headers={**stack.bearer(), "accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


async def test_every_gateway_has_its_own_registry_and_no_metrics_turns_it_off(stack, nats_url) -> None:
    """Two gateways in one process each count their own requests (no shared default registry)."""
    other = Gateway(nats_url=nats_url, auth=False)
    off = Gateway(nats_url=nats_url, auth=False, metrics=False)
    await other.start(serve_http=False)
    await off.start(serve_http=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other.app), base_url="http://o") as http:
            answer = await http.post(CHAT, json={"model": MODEL, "messages": HI})
            assert answer.status_code == 200, answer.text
            text = (await http.get("/metrics")).text
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert value(samples, "llm_router_requests_total", model=MODEL) == 1  # only its own request
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=off.app), base_url="http://f") as http:
            assert (await http.post(CHAT, json={"model": MODEL, "messages": HI})).status_code == 200
            answer = await http.get("/metrics")
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "metrics_off"
    finally:
        await off.stop()
        await other.stop()


def test_label_values_are_bounded_and_buckets_are_prometheus_le() -> None:
    """Clients name models freely: past the ceiling, and for names the cluster does not know, the label is _other."""
    from events.messages import HistoryRecord
    from gateway.metrics import MAX_VALUES, RequestMetrics

    metrics = RequestMetrics(known_model=lambda name: name.startswith("known-"), providers={"openai"})

    def record(model: str, status: int = 200, **fields) -> HistoryRecord:
        fields.setdefault("duration_ms", 1.0)
        return HistoryRecord(
            id="r", capability="chat", endpoint=CHAT, model=model, status_code=status, started_at=0.0, **fields
        )

    metrics.observe(record("known-x", node_id="n1", duration_ms=5.0, queue_ms=0.0))
    for i in range(MAX_VALUES + 5):  # a provider answered each, so each is a real model, up to the ceiling
        metrics.observe(record(f"openai:m{i}", provider="openai", duration_ms=10.0))
    metrics.observe(record("made-up", 404))  # unknown locally: _other at once
    metrics.observe(record("openai:made-up", 401))  # refused before the provider: named by its prefix
    families = {family.name: family for family in metrics.collect()}
    requests = {tuple(sorted(s.labels.items())): s.value for s in families["llm_router_requests"].samples}
    models = {dict(labels)["model"] for labels in requests}
    assert len(models) == MAX_VALUES + 1  # known-x and 999 cloud models, then _other
    other = {labels: n for labels, n in requests.items() if dict(labels)["model"] == OTHER}
    assert sum(other.values()) == 6 + 1 + 1
    assert {dict(labels)["provider"] for labels in other} == {"openai", "local"}
    buckets = {
        s.labels["le"]: s.value
        for s in families["llm_router_request_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["model"] == "known-x"
    }
    assert buckets["0.005"] == 1  # 5 ms is "le 0.005": a bound holds what equals it
    assert buckets["+Inf"] == 1
