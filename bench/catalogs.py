"""Latency of the catalog endpoints at concurrency 16, against ``/healthz`` in the same run.

    python bench/catalogs.py                       # ~40 s
    python bench/catalogs.py --output docs/benchmarks.md

An embedded nats-server, the registry and the gateway run as processes of their own (as on a
cluster); the registry talks to a local fake of the Hugging Face Hub (``tests/fake_hf.py``,
120 GGUF repositories) through ``HF_ENDPOINT``, so the real huggingface_hub client runs.
Measured, each with 16 keep-alive HTTP clients in a closed loop, after a warm-up:

- ``GET /healthz``: the baseline, answered by the gateway alone (no NATS round trip);
- ``GET /v0/models/hub``: the curated catalog, asked of the registry over NATS;
- ``GET /v0/models/hf?per_page=50`` with the page cached by the registry;
- ``GET /v0/models/hub`` again with the fake Hub stopped (Hugging Face unreachable).

The first, uncached fetch of the Hugging Face page (1 listing + 50 repository requests to
the fake) is timed once and reported alongside. Results go between the markers
``<!-- catalogs:begin -->`` and ``<!-- catalogs:end -->`` of ``--output``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))
sys.path.insert(2, str(ROOT / "tests"))

from fake_hf import FakeHub  # noqa: E402
from overhead import Result, _event_loop_run, _ms, closed_loop, connect, http_request, machine, publish  # noqa: E402

from broker import EmbeddedNats  # noqa: E402
from llm_router import processes  # noqa: E402

CONCURRENCY = 16
TARGET_HUB_P99_MS = 500.0
BEGIN, END = "<!-- catalogs:begin -->", "<!-- catalogs:end -->"


def fake_hub() -> FakeHub:
    hub = FakeHub()
    for i in range(120):
        hub.add_repo(
            f"benchorg/model-{i:03d}-GGUF",
            {f"model-{i:03d}-Q4_K_M.gguf": 4_000_000_000 + i, f"model-{i:03d}-Q8_0.gguf": 8_000_000_000 + i},
            downloads=10_000 - i,
        )
    hub.start()
    return hub


async def measure(port: int, path: str, label: str, warmup: float, duration: float) -> Result:
    clients = [await connect(port) for _ in range(CONCURRENCY)]
    request = http_request("GET", path, port)
    clock = time.perf_counter_ns
    start = clock() + int(warmup * 1e9)
    samples: list[int] = []
    sent, errors = await closed_loop(
        clients,
        lambda c: c.request(request),
        lambda answer: answer[0] == 200,
        start,
        start + int(duration * 1e9),
        samples,
    )
    for c in clients:
        c.close()
    return Result(label, CONCURRENCY, samples, duration, errors=errors, sent=sent)


async def run(port: int, hub: FakeHub, warmup: float, duration: float) -> tuple[list[Result], float]:
    conn = await connect(port)
    t0 = time.perf_counter()
    status, body = await conn.request(http_request("GET", "/v0/models/hf?per_page=50", port))
    cold_ms = (time.perf_counter() - t0) * 1000
    conn.close()
    if status != 200:
        raise RuntimeError(f"/v0/models/hf answered {status}: {body[:300]!r}")
    results = [
        await measure(port, "/healthz", "`GET /healthz` (baseline: gateway only)", warmup, duration),
        await measure(port, "/v0/models/hub", "`GET /v0/models/hub`", warmup, duration),
        await measure(port, "/v0/models/hf?per_page=50", "`GET /v0/models/hf?per_page=50` (cached)", warmup, duration),
    ]
    hub.stop()
    results.append(
        await measure(port, "/v0/models/hub", "`GET /v0/models/hub`, Hugging Face unreachable", warmup, duration)
    )
    return results, cold_ms


def render(results: list[Result], cold_ms: float) -> str:
    base = results[0].percentile_ms(50)
    lines = [
        f"Catalog endpoints at concurrency {CONCURRENCY} (`python bench/catalogs.py`; {machine()}). "
        "nats-server, registry and gateway in separate processes; the registry's Hugging Face is a local fake "
        "with 120 GGUF repositories.",
        "",
        "| endpoint | p50 (ms) | p99 (ms) | req/s | p50 vs baseline | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.setup} | {_ms(r.percentile_ms(50))} | {_ms(r.percentile_ms(99))} | {r.rps:,.0f} | "
            f"{r.percentile_ms(50) / base:.1f}x | {r.errors} |"
        )
    hub_p99 = max(r.percentile_ms(99) for r in results if "hub" in r.setup)
    lines += [
        "",
        f"First (uncached) fetch of one 50-model page: {cold_ms:.0f} ms (1 listing + 50 repository requests, 8 at a time). "
        f"Target: hub p99 under {TARGET_HUB_P99_MS:.0f} ms, with or without Hugging Face: "
        f"{'met' if hub_p99 < TARGET_HUB_P99_MS else 'NOT met'} ({hub_p99:.1f} ms).",
        "",
    ]
    return "\n".join(lines)


async def stack_and_run(workdir: Path, warmup: float, duration: float) -> tuple[list[Result], float]:
    hub = fake_hub()
    server = EmbeddedNats(workdir / "nats", port=0)  # lives as long as this event loop
    nats_url = await server.start()
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    stack = processes.Stack(nats_url, workdir, env=env)
    try:
        await asyncio.to_thread(stack.start, "registry", "--hf-cache-ttl", "3600")
        gateway = await asyncio.to_thread(stack.start, "gateway", "--no-auth")
        return await run(int(gateway.url.rsplit(":", 1)[1]), hub, warmup, duration)
    finally:
        stack.stop()
        await server.stop()
        if hub.running:
            hub.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-catalogs-"))
    results, cold_ms = _event_loop_run(stack_and_run(workdir, args.warmup, args.duration))
    text = render(results, cold_ms)
    return publish(text, args.output, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
