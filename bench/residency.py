"""Cold starts and model swaps: what loading on demand costs a request.

    python bench/residency.py                          # ~2 min on 2 cores
    python bench/residency.py --rounds 20 --output docs/benchmarks.md

Three llama.cpp models of 73 MB each (random weights, 8 layers, a 2048-token context: about
115 MiB loaded), their files in the node's cache, served by ``llm-router registry``,
``gateway`` and ``node`` processes on one NATS. Every request asks for 4 tokens. Scenarios:

- ``warm``: the budget holds all three; requests alternate between them (nothing loads);
- ``cold start``: registered with ``replicas: 0`` (loaded only on demand) on a node with
  ``--keep-alive 1``: each request finds its model unloaded and waits while the registry
  places it and the node loads it from its cache;
- ``swap``: a budget for two of the three; requests alternate, so each one unloads the least
  recently used model and loads its own;
- ``swap, 3 clients``: the same budget, one client per model sending back to back for
  ``--seconds``: throughput and latency when the three compete for two places.

Latency is the client's; ``queue wait`` is the gateway's ``x-queue-wait-ms`` (a cold start is
spent there); ``load`` is the node's own measure of ``Llama(...)`` (``load_s`` in /v0/nodes).
Results go between ``<!-- residency:begin -->`` and ``<!-- residency:end -->`` of ``--output``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

from overhead import bench_options, machine, publish, quiet_logs_and_check_machine  # noqa: E402

from broker import EmbeddedNats  # noqa: E402
from llm_router.processes import Stack  # noqa: E402
from nodes.demo_model import write_tiny_gguf  # noqa: E402

os.environ.setdefault("LLM_ROUTER_LLAMA_THREADS", "1")
BEGIN, END = "<!-- residency:begin -->", "<!-- residency:end -->"
MODELS = ("swap-a", "swap-b", "swap-c")


def build(folder: Path) -> dict[str, Path]:
    return {
        name: write_tiny_gguf(folder / f"{name}.gguf", seed=i, n_embd=512, n_layers=8, context_length=2048)
        for i, name in enumerate(MODELS)
    }


async def _ask(url: str, subject: str, body: dict) -> dict:
    import nats

    nc = await nats.connect(url)
    try:
        return json.loads((await nc.request(subject, json.dumps(body).encode(), timeout=30)).data)
    finally:
        await nc.close()


class Deployment:
    """registry + gateway + one node (``node_args``) on a NATS of its own, the models registered."""

    def __init__(self, workdir: Path, files: dict[str, Path], node_args: list[str], replicas: int | None) -> None:
        self.server = EmbeddedNats(workdir / "nats", port=0)
        url = self.server.start_sync()
        self.stack = Stack(url, workdir)
        self.stack.start("registry", "--model-root", str(next(iter(files.values())).parent))
        self.url = self.stack.start("gateway", "--no-auth", "--queue-timeout", "120").url
        self.stack.start("node", *node_args, name="node")
        for name, path in files.items():
            body = {"path": str(path), "name": name} | ({"replicas": replicas} if replicas is not None else {})
            reply = asyncio.run(_ask(url, "admin.model.register", body))
            assert reply["ok"], reply
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def node(self) -> dict:
        return self.http.get("/v0/nodes").json()["data"][0]

    def loaded(self) -> dict[str, dict]:
        return {m["name"]: m for m in self.node()["models"] if m["state"] == "ready"}

    def settle(self, loaded: int, loadable: int) -> None:
        """Until the node reports that many models loaded and that many only loadable."""
        self.wait(
            lambda: len(self.loaded()) == loaded and len(self.node()["loadable"]) == loadable,
            f"{loaded} loaded and {loadable} loadable",
        )

    def wait(self, predicate, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"bench/residency.py: timed out waiting for {what}: {self.node()}")
            time.sleep(0.05)

    def chat(self, model: str) -> tuple[float, float, int]:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        started = time.perf_counter()
        answer = self.http.post("/v1/chat/completions", json=body)
        took = (time.perf_counter() - started) * 1000
        return took, float(answer.headers.get("x-queue-wait-ms", 0)), answer.status_code

    def close(self) -> None:
        self.http.close()
        self.stack.stop()
        self.server.stop_sync()


def alternate(dep: Deployment, rounds: int, *, cold: bool = False) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"latency": [], "wait": [], "load": [], "errors": []}
    for i in range(rounds * len(MODELS)):
        model = MODELS[i % len(MODELS)]
        if cold:
            dep.wait(lambda model=model: model not in dep.loaded(), f"{model} unloaded (keep-alive)")
        before = set(dep.loaded())
        took, wait, status = dep.chat(model)
        if status != 200:
            out["errors"].append(status)
            continue
        if model in before:
            out["latency"].append(took)  # warm
            continue
        out["latency"].append(took)
        out["wait"].append(wait)
        loaded = dep.loaded().get(model)
        if loaded and loaded.get("load_s") is not None:
            out["load"].append(loaded["load_s"] * 1000)
    return out


def compete(dep: Deployment, seconds: float) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"latency": [], "wait": [], "errors": []}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(model: str) -> None:
        while time.monotonic() < stop:
            took, wait, status = dep.chat(model)
            with lock:
                if status == 200:
                    out["latency"].append(took)
                    out["wait"].append(wait)
                else:
                    out["errors"].append(status)

    threads = [threading.Thread(target=client, args=(m,)) for m in MODELS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))]:.0f}"


def run(rounds: int, seconds: float) -> tuple[list[tuple[str, dict, float | None]], dict]:
    results = []
    facts: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-residency-") as tmp:
        files = build(Path(tmp) / "models")
        facts["size"] = next(iter(files.values())).stat().st_size
        for label, args, replicas, action in (
            ("warm (budget for three)", ["--memory-budget", "600MiB"], None, "warm"),
            ("cold start from the cache", ["--memory-budget", "600MiB", "--keep-alive", "1"], 0, "cold"),
            ("swap (budget for two), one client", ["--memory-budget", "260MiB"], None, "swap"),
            ("swap (budget for two), 3 clients", ["--memory-budget", "260MiB"], None, "compete"),
        ):
            dep = Deployment(Path(tmp) / action, files, args, replicas)
            try:
                dep.settle(*{"cold": (0, 3), "warm": (3, 0)}.get(action, (2, 1)))
                loaded = dep.loaded()
                if loaded and "memory" not in facts:
                    first = next(iter(loaded.values()))
                    facts["memory"] = (first["estimate_bytes"].get("ram", 0), first["memory_bytes"].get("ram", 0))
                started = time.perf_counter()
                data = compete(dep, seconds) if action == "compete" else alternate(dep, rounds, cold=action == "cold")
                elapsed = time.perf_counter() - started
                results.append((label, data, len(data["latency"]) / elapsed if action == "compete" else None))
            finally:
                dep.close()
    return results, facts


def render(results, facts, rounds: int, seconds: float) -> str:
    estimate, measured = facts.get("memory", (0, 0))
    lines = [
        f"Cold starts and model swaps, three llama.cpp models of {facts['size'] / 1e6:.0f} MB "
        f"(a 2048-token context: {measured / 1024**2:.0f} MiB each as llama.cpp reports it, "
        f"{estimate / 1024**2:.0f} MiB estimated before loading), {rounds} rounds of the three, "
        f"4 tokens per request (`python bench/residency.py`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{machine()}, load average {os.getloadavg()[0]:.1f} at the end). Milliseconds, p50 / p90.",
        "",
        "| scenario | requests | latency | queue wait (cold ones) | load on the node | req/s | errors |",
        "| --- | ---: | --- | --- | --- | ---: | ---: |",
    ]
    for label, data, rate in results:
        lat = f"{_ms(data['latency'], 0.5)} / {_ms(data['latency'], 0.9)}"
        waits = [w for w in data["wait"] if w > 0]
        wait = f"{_ms(waits, 0.5)} / {_ms(waits, 0.9)} ({len(waits)})" if waits else "-"
        load = f"{_ms(data.get('load', []), 0.5)} / {_ms(data.get('load', []), 0.9)}" if data.get("load") else "-"
        lines.append(
            f"| {label} | {len(data['latency'])} | {lat} | {wait} | {load} | "
            f"{f'{rate:.1f}' if rate else '-'} | {len(data['errors'])} |"
        )
    lines += [
        "",
        f"The 3-client row ran {seconds:g} s. A cold start's queue wait is the registry's decision, the node "
        "unloading what makes room and loading the model, and its next heartbeat reaching the gateway.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    args = bench_options(__doc__, rounds=10, seconds=15.0)
    quiet_logs_and_check_machine()
    results, facts = run(args.rounds, args.seconds)
    return publish(render(results, facts, args.rounds, args.seconds), args.output, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
