"""Gateway CPU per request, alone on one core, against a bare Starlette -> NATS skeleton.

    python bench/gateway_cpu.py                                   # this checkout vs the skeleton
    python bench/gateway_cpu.py --before /tmp/before              # + a gateway from another checkout
    python bench/gateway_cpu.py --before DIR --output docs/benchmarks.md

One nats-server, the registry and one node with the instant engine (``bench/stack.py``,
``--parallel 64``) serve every variant; the variants are gateways, started one at a time and
pinned to core 1 while everything else (nats-server, node, registry, this load generator) is
pinned to core 0, so the gateway is the bottleneck and its CPU time per answered request is
what it costs:

- ``skeleton``: ``bench/skeleton_gateway.py``, one Starlette route doing one NATS request/reply
  to the node: the floor of any Starlette-on-NATS gateway;
- ``before``: the gateway of another checkout (``--before DIR``, e.g. a ``git worktree`` of an
  older commit), with its own code, on the same NATS and node;
- ``ours``: the gateway of this checkout, history on (every request is a HISTORY record) and
  Prometheus metrics on; ``--metrics-off`` adds ``no-metrics``, the same with ``--no-metrics``.

Each variant runs a closed loop of ``--concurrency`` clients (64) for ``--warmup`` + ``--duration``
seconds, ``--rounds`` times in turn, each round starting one variant later (so drift on the
machine hits every variant alike, whatever its place in the order); the
table has each variant's median round. Results are Markdown; ``--output FILE`` writes them
between ``<!-- gateway-cpu:begin -->`` and ``<!-- gateway-cpu:end -->``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import psutil  # noqa: E402
from overhead import CHAT_BODY, MODEL, NODE_ID, TEXT, closed_loop, connect, http_request, publish, report_header  # noqa: E402

from llm_router import processes  # noqa: E402
from llm_router.processes import Process  # noqa: E402

BEGIN, END = "<!-- gateway-cpu:begin -->", "<!-- gateway-cpu:end -->"
GATEWAY_CORE, OTHER_CORE = 1, 0


class Variant:
    """A gateway process (``cmd`` run from ``tree``) pinned to the gateway core."""

    def __init__(self, name: str, tree: Path, cmd: list[str], workdir: Path) -> None:
        self.name = name
        self.tree = tree
        self.cmd = cmd
        self.log = workdir / f"gateway-{name}.log"
        self.proc: Process | None = None
        self.port = 0
        self.api_key: str | None = None

    def start(self) -> None:
        self.proc = Process(
            [sys.executable, *self.cmd], name=self.name, env={"PYTHONPATH": str(self.tree)}, cwd=self.tree, log=self.log
        )
        info = self.proc.ready(60)
        self.port, self.api_key = int(info["port"]), info.get("api_key")
        os.sched_setaffinity(self.proc.pid, {GATEWAY_CORE})

    def stop(self) -> None:
        if self.proc is not None and self.proc.running:
            self.proc.stop()


async def measure(variant: Variant, concurrency: int, warmup: float, duration: float) -> dict:
    request = http_request("POST", "/v1/chat/completions", variant.port, CHAT_BODY, variant.api_key)
    expected = TEXT.encode()
    conns = [await connect(variant.port) for _ in range(concurrency)]
    clock = time.perf_counter_ns
    start = clock()
    measure_from, measure_to = start + int(warmup * 1e9), start + int((warmup + duration) * 1e9)
    samples: list[int] = []
    process = psutil.Process(variant.proc.pid)
    marks: dict[str, tuple[float, float]] = {}

    async def sampler() -> None:
        await asyncio.sleep(warmup)
        t = process.cpu_times()
        marks["from"] = (t.user + t.system, time.monotonic())
        await asyncio.sleep(duration)
        t = process.cpu_times()
        marks["to"] = (t.user + t.system, time.monotonic())

    async def ask(conn):
        return await conn.request(request)

    def ok(answer) -> bool:
        return answer[0] == 200 and expected in answer[1]

    cpu = asyncio.create_task(sampler())
    try:
        sent, errors = await closed_loop(conns, ask, ok, measure_from, measure_to, samples)
        await cpu
    finally:
        for conn in conns:
            conn.close()
    answered = len(samples)
    cpu_s = marks["to"][0] - marks["from"][0]
    window = marks["to"][1] - marks["from"][1]
    return {
        "answered": answered,
        "errors": errors,
        "rps": answered / duration,
        "cpu_us": 1e6 * cpu_s / max(1, answered),
        "cpu_pct": 100 * cpu_s / window,
        "p50_ms": statistics.median(samples) / 1e6 if samples else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=None, help="checkout whose gateway is 'before'")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--keys", action="store_true", help="also 'ours' with API keys on (each request sends one)")
    parser.add_argument(
        "--metrics-off", action="store_true", help="also 'ours' without Prometheus metrics (what counting costs)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy (if installed) records 'ours' in its first measured window into this raw file",
    )
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("needs 2 cores (one for the gateway alone)", file=sys.stderr)
        return 2

    from broker import EmbeddedNats
    from nodes.demo_model import write_tiny_gguf

    os.sched_setaffinity(0, {OTHER_CORE})  # children inherit it; the gateway is moved to its own core
    workdir = Path(tempfile.mkdtemp(prefix="gateway-cpu-"))
    model_path = write_tiny_gguf(workdir / f"{MODEL}.gguf")
    nats = EmbeddedNats(workdir / "nats", port=0)
    url = nats.start_sync()
    stack = processes.Stack(url, workdir)
    stack_args = ["--role", "gateway", "--nats-url", url, "--port", "0"]
    variants = [
        Variant(
            "skeleton",
            ROOT,
            [str(HERE / "skeleton_gateway.py"), "--nats-url", url, "--node-id", NODE_ID, "--model", MODEL],
            workdir,
        )
    ]
    if args.before:
        variants.append(Variant("before", args.before, [str(args.before / "bench" / "stack.py"), *stack_args], workdir))
    variants.append(Variant("ours", ROOT, [str(HERE / "stack.py"), *stack_args], workdir))
    if args.metrics_off:
        variants.append(Variant("no-metrics", ROOT, [str(HERE / "stack.py"), *stack_args, "--no-metrics"], workdir))
    if args.keys:
        keyed = [*stack_args, "--auth", "--data-dir", str(workdir / "keys")]
        variants.append(Variant("ours+keys", ROOT, [str(HERE / "stack.py"), *keyed], workdir))
    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    started = time.time()
    try:
        stack.start_bench("registry", "--model-path", str(model_path), "--model-name", MODEL)
        stack.start_bench_node(NODE_ID, parallel=64)
        time.sleep(1.0)  # the node's first heartbeat, so every gateway sees it
        for round_ in range(args.rounds):
            shift = round_ % len(variants)  # each round starts with the next variant: no one always runs first
            for variant in variants[shift:] + variants[:shift]:
                variant.start()
                spy = None
                if args.profile and variant.name == "ours" and round_ == 0:
                    spy = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "-p",
                            str(variant.proc.pid),
                            "-d",
                            str(int(args.duration)),
                            "-r",
                            "250",
                            "-f",
                            "raw",
                            "-o",
                            str(args.profile),
                            "--nonblocking",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                try:
                    time.sleep(0.5)
                    result = asyncio.run(measure(variant, args.concurrency, args.warmup, args.duration))
                    if spy is not None:
                        spy.wait(30)
                finally:
                    variant.stop()
                results[variant.name].append(result)
                print(
                    f"round {round_ + 1} {variant.name:9s} {result['rps']:8,.0f} req/s  "
                    f"{result['cpu_us']:6.1f} µs CPU/request  ({result['cpu_pct']:.0f}% of its core)  "
                    f"errors={result['errors']}",
                    flush=True,
                )
    finally:
        for variant in variants:
            variant.stop()
        stack.stop()
        nats.stop_sync()

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    command = "python bench/gateway_cpu.py " + " ".join(sys.argv[1:])
    lines = [
        *report_header(started, command),
        f"Gateway alone on one core, {args.concurrency} clients, instant engine, median of {args.rounds} rounds of {args.duration:g} s:",
        "",
        "| gateway | requests/s | gateway CPU per request (µs) | vs skeleton | p50 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    floor = median("skeleton", "cpu_us")
    for variant in variants:
        name = variant.name
        lines.append(
            f"| {name} | {median(name, 'rps'):,.0f} | {median(name, 'cpu_us'):.0f} | "
            f"{median(name, 'cpu_us') / floor:.2f}x | {median(name, 'p50_ms'):.2f} | "
            f"{sum(r['errors'] for r in results[name])} |"
        )
    if args.before:
        cut = 1 - median("ours", "cpu_us") / median("before", "cpu_us")
        lines += [
            "",
            f"- ours vs before: gateway CPU per request {100 * cut:.0f}% lower "
            f"({'cut by at least a third: met' if cut >= 1 / 3 else 'target, a third lower: not met'})",
        ]
    if args.metrics_off:
        cost = median("ours", "cpu_us") - median("no-metrics", "cpu_us")
        lines.append(
            f"- Prometheus metrics on: {cost:+.1f} µs of gateway CPU per request ('no-metrics': the same gateway with --no-metrics)"
        )
    if args.keys:
        extra = median("ours+keys", "cpu_us") - median("ours", "cpu_us")
        lines.append(f"- API keys on: {extra:+.1f} µs of gateway CPU per request (a SHA-256 and a dict lookup)")
    text = "\n".join(lines) + "\n"
    return publish(text, args.output, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
