"""Reliability under load: goodput when the node is overloaded, and memory over a long run.

    python bench/reliability.py                   # ~3 min: 4 goodput runs of 28 s + a 100,000-request soak
    python bench/reliability.py --quick           # ~1 min: 10 s goodput runs, a 20,000-request soak
    python bench/reliability.py --only soak --requests 200000
    python bench/reliability.py --output docs/benchmarks.md

Both parts run the real components as processes (``Stack`` of ``bench/overhead.py``: an
embedded nats-server, registry, gateway and one node, split layout) and drive the gateway's
``POST /v1/chat/completions`` over HTTP from this process.

1. **Goodput under overload.** The node serves with the bench engine taking a fixed service
   time (``--delay-ms``, 50 ms) on ``--parallel`` slots (2), so its capacity C is known; a short
   closed-loop calibration through the gateway measures it. Arrivals are open-loop Poisson
   (``open_loop`` of ``bench/dispatch.py``) at a multiple of C, and every client has a timeout
   (``--client-timeout``, 1 s): when it expires the client closes its TCP connection, as real
   clients do, which is how the gateway learns to drop the request (from its queue, or on the
   node). Goodput = answers 200 received within the client's timeout, per second, / C. Runs:
   0.7x C (the baseline: goodput should be 0.7), 2x C with the same timeout, 2x C with clients
   that wait 60 s (nothing is abandoned: the bounded queue answers 429 instead), and 2x C with
   the gateway's ``--queue-timeout`` below the clients' timeout. A passive NATS subscriber
   watches the requests sent to the node, its replies and the cancellations, which gives the
   node's busy time on work whose client had already gone; another counts the history records
   by status (499: the client left).
2. **Soak.** The instant engine (64 slots), a closed loop of ``--concurrency`` (32) keep-alive
   clients, history on. After a warm-up of 5,000 requests, ``--requests`` (100,000; ``--quick``
   20,000) more, while the gateway's RSS is sampled every second (psutil). Pass: RSS at the end
   within 10% of RSS after the warm-up, no errors, one history record per request, none dropped.

Results are printed as Markdown; ``--output FILE`` also writes them between the markers
``<!-- reliability:begin -->`` and ``<!-- reliability:end -->`` (``write_section``). Every loop
is bounded in time and in count, and every process is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import msgspec  # noqa: E402
import psutil  # noqa: E402
from dispatch import HttpPool, open_loop, percentile, poisson_trace  # noqa: E402
from minimal_engine import TEXT  # noqa: E402
from overhead import (  # noqa: E402
    CHAT_BODY,
    SYSTEM,
    Stack,
    _cpu_times,
    _event_loop_run,
    closed_loop,
    connect,
    http_request,
    machine_busy,
    publish,
    quiet_logs_and_check_machine,
    report_header,
)

BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"
EXPECTED = f'"content":"{TEXT}"'.encode()
LONG_TIMEOUT_S = 60.0
SOAK_WARMUP = 5_000
RSS_TOLERANCE = 0.10
GOODPUT_HEALTHY = 0.8  # of C, at 2x overload


# ---------------------------------------------------------------------------- goodput


@dataclass
class Config:
    """One goodput run: offered load (x C), the clients' timeout, the gateway's options."""

    key: str  # its name for --runs
    label: str
    load: float
    timeout: float
    gateway_args: tuple[str, ...] = ()


@dataclass
class GoodputRun:
    config: Config
    capacity: float
    duration: float
    outcomes: Counter = field(default_factory=Counter)  # "200", "429", ..., "timeout", "error"
    ok_latencies_ms: list[float] = field(default_factory=list)
    node: dict[str, float] = field(default_factory=dict)
    history: Counter = field(default_factory=Counter)
    cpu_other: float = 0.0  # % of one core used by other processes during the run
    after: dict[str, int] = field(default_factory=dict)  # the gateway's counts once the run is over

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    @property
    def goodput(self) -> float:
        return self.outcomes["200"] / self.duration / self.capacity


class Seen(msgspec.Struct):
    """The fields of a history record counted here."""

    status_code: int
    started_at: float
    node_id: str | None = None


class NodeWatch:
    """Passive subscriber: each request sent to the node (a request may be sent again after a
    ``node_busy`` refusal), its cancellation, and the node's final reply to each send."""

    def __init__(self) -> None:
        self.attempts: list[list[Any]] = []  # [request id, sent at, answered at | None, refused busy]
        self._open: dict[str, deque[int]] = {}  # request id -> its unanswered attempts, oldest first
        self.cancelled: dict[str, float] = {}
        self.history: list[Seen] = []
        self.subs: list[Any] = []
        self.undecodable = 0

    async def start(self, nc: Any) -> None:
        from events import subjects

        self.subs = [
            await nc.subscribe("infer.>", cb=self._on_infer),
            await nc.subscribe("_INBOX.>", cb=self._on_reply),
            await nc.subscribe(subjects.HISTORY_ALL, cb=self._on_history),
        ]

    async def stop(self) -> None:
        for sub in self.subs:
            await sub.unsubscribe()

    async def _on_infer(self, msg: Any) -> None:
        from events import codec
        from events.messages import CancelRequest

        now = time.perf_counter()
        try:
            if msg.subject.startswith("infer.cancel."):
                self.cancelled.setdefault(codec.decode(msg.data, CancelRequest).request_id, now)
                return
            rid = msgspec.json.decode(msg.data, type=_RequestId).request_id
        except msgspec.DecodeError:
            self.undecodable += 1
            return
        self._open.setdefault(rid, deque()).append(len(self.attempts))
        self.attempts.append([rid, now, None, False])

    async def _on_reply(self, msg: Any) -> None:
        from events import codec
        from events.messages import FINAL_REPLIES, Failure

        now = time.perf_counter()
        try:
            reply = codec.decode_reply(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # not a node's reply (JetStream acks share the _INBOX prefix)
        waiting = self._open.get(reply.request_id) if isinstance(reply, FINAL_REPLIES) else None
        if not waiting:
            return
        attempt = self.attempts[waiting.popleft()]
        attempt[2] = now
        attempt[3] = isinstance(reply, Failure) and reply.code == "node_busy"

    async def _on_history(self, msg: Any) -> None:
        try:
            self.history.append(msgspec.json.decode(msg.data, type=Seen))
        except msgspec.DecodeError:
            self.undecodable += 1


class _RequestId(msgspec.Struct):
    request_id: str


async def calibrate(port: int, parallel: int, seconds: float) -> float:
    """Capacity C through the gateway: a closed loop of 4x the slots (so the gateway's queue is
    never empty and the node never idles), answers per second over ``seconds``."""
    request = http_request("POST", "/v1/chat/completions", port, CHAT_BODY)
    conns = [await connect(port) for _ in range(4 * parallel)]
    clock = time.perf_counter_ns
    measure_from = clock() + int(0.5e9)
    measure_to = measure_from + int(seconds * 1e9)
    samples: list[int] = []
    try:
        _, errors = await asyncio.wait_for(
            closed_loop(
                conns,
                lambda c: c.request(request),
                lambda a: a[0] == 200 and EXPECTED in a[1],
                measure_from,
                measure_to,
                samples,
            ),
            seconds + 30,
        )
    finally:
        for conn in conns:
            conn.close()
    if errors or not samples:
        raise RuntimeError(f"calibration failed: {errors} errors, {len(samples)} answers")
    return len(samples) / seconds


def request_id(body: bytes) -> str | None:
    """The gateway's request id, from the completion's ``chatcmpl-<id>``."""
    at = body.find(b'"id":"chatcmpl-')
    if at < 0:
        return None
    end = body.find(b'"', at + 15)
    return body[at + 15 : end].decode()


async def goodput_run(
    stack: Stack, config: Config, capacity: float, warmup: float, duration: float, seed: int
) -> GoodputRun:
    """Open-loop Poisson arrivals at ``config.load`` x C; every client gives up after its timeout."""
    import nats

    trace = poisson_trace(config.load * capacity, warmup + duration, seed)
    data = http_request("POST", "/v1/chat/completions", stack.port, CHAT_BODY)
    n = len(trace)
    outcome: list[str | None] = [None] * n
    abs_sent: list[float | None] = [None] * n
    ids: list[str | None] = [None] * n
    pool = HttpPool(stack.port)
    watch = NodeWatch()
    nc = await nats.connect(stack.nats.url, name="bench-reliability-watch")
    pids = stack.pids()

    async def send(i: int) -> tuple[bool, str | None]:
        abs_sent[i] = time.perf_counter()
        try:
            status, body = await asyncio.wait_for(pool.request(data), config.timeout)
        except TimeoutError:  # the pool closed the connection: the gateway sees the client leave
            outcome[i] = "timeout"
            return False, None
        except (OSError, ValueError) as exc:
            outcome[i] = "error"
            print(f"request {i}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return False, None
        outcome[i] = str(status)
        ids[i] = request_id(body) if status == 200 else None
        return status == 200 and EXPECTED in body, None

    try:
        await watch.start(nc)
        await nc.flush()
        cpu_before, t_before = _cpu_times(pids), time.monotonic()
        sent, done, ok, _ = await open_loop(trace, send, drain=config.timeout + 15)
        cpu_after, window = _cpu_times(pids), time.monotonic() - t_before
        await asyncio.sleep(1.0)  # the last replies, cancellations and history records
        nodes = await _get_json(stack.port, "/v0/nodes")  # idle now: nothing should be held
        after = {
            "gateway_inflight": sum(n["gateway_inflight"] for n in nodes["data"]),
            "queue_waiting": nodes["queue"]["waiting"],
        }
    finally:
        pool.close()
        await watch.stop()
        await nc.close()

    first = next(i for i in range(n) if abs_sent[i] is not None)
    t0 = abs_sent[first] - sent[first]  # open_loop's start, on perf_counter
    wall0 = time.time() - (time.perf_counter() - t0)
    lo, hi = warmup, warmup + duration
    run = GoodputRun(config, capacity, duration, after=after)
    busy = sum(cpu_after[k] - cpu_before[k] for k in cpu_after if k != SYSTEM and k in cpu_before)
    run.cpu_other = max(0.0, 100 * ((cpu_after[SYSTEM] - cpu_before[SYSTEM]) - busy) / window)
    delivered = {rid for rid in ids if rid}  # answered in time, whenever sent
    for i, at in enumerate(trace):
        if not lo <= at < hi:
            continue
        run.outcomes[outcome[i] or "unsent"] += 1
        if ok[i] and done[i] is not None and sent[i] is not None:
            run.ok_latencies_ms.append((done[i] - sent[i]) * 1000)
    if run.outcomes["200"] != len(run.ok_latencies_ms):  # a 200 with the wrong body
        run.outcomes["200 (wrong body)"] = run.outcomes["200"] - len(run.ok_latencies_ms)
        run.outcomes["200"] = len(run.ok_latencies_ms)

    # Node work, for sends to the node inside the window: reply time - send time.
    useful = wasted = 0.0
    dispatched = abandoned = cut_short = unanswered = refused = 0
    for rid, at, end, busy in watch.attempts:
        if not lo <= at - t0 < hi:
            continue
        dispatched += 1
        if end is None:
            unanswered += 1
        elif busy:
            refused += 1
        elif rid in delivered:
            useful += end - at
        else:
            abandoned += 1
            wasted += end - at
            if rid in watch.cancelled:
                cut_short += 1
    run.node = {
        "sends": dispatched,
        "abandoned": abandoned,
        "cut_short": cut_short,
        "unanswered": unanswered,
        "refused_busy": refused,
        "useful_s": useful,
        "wasted_s": wasted,
        "slot_s": stack.parallel * duration,
    }
    for record in watch.history:
        if lo <= record.started_at - wall0 < hi:
            key = str(record.status_code)
            if record.status_code == 499:
                key += " (on the node)" if record.node_id else " (in the queue)"
            run.history[key] += 1
    return run


def goodput_configs(queue_timeout: float, timeout: float) -> list[Config]:
    short = ("--queue-timeout", f"{queue_timeout:g}")
    return [
        Config("baseline", "baseline 0.7x C", 0.7, timeout),
        Config("overload", "2x C", 2.0, timeout),
        Config("patient", "2x C, patient clients", 2.0, LONG_TIMEOUT_S),
        Config("queue-timeout", f"2x C, gateway --queue-timeout {queue_timeout:g}", 2.0, timeout, short),
    ]


RUNS = "baseline,overload,patient,queue-timeout"


def run_goodput(args: argparse.Namespace) -> tuple[list[GoodputRun], dict[tuple[str, ...], float]]:
    configs = [c for c in goodput_configs(args.queue_timeout, args.client_timeout) if c.key in args.runs]
    runs: list[GoodputRun] = []
    capacities: dict[tuple[str, ...], float] = {}
    for gateway_args in dict.fromkeys(c.gateway_args for c in configs):  # one stack per gateway setting
        workdir = Path(tempfile.mkdtemp(prefix="llm-router-bench-reliability-"))
        stack = Stack(
            "split",
            workdir,
            args.parallel,
            node_args=["--delay-ms", f"{args.delay_ms:g}"],
            gateway_args=list(gateway_args),
        )
        try:
            stack.start()
            capacity = _event_loop_run(calibrate(stack.port, args.parallel, args.calibration))
            capacities[gateway_args] = capacity
            print(
                f"gateway {' '.join(gateway_args) or '(defaults)'}: C = {capacity:.1f} requests/s "
                f"({args.parallel} slots x {args.delay_ms:g} ms)",
                file=sys.stderr,
                flush=True,
            )
            for config in (c for c in configs if c.gateway_args == gateway_args):
                run = _event_loop_run(
                    goodput_run(stack, config, capacity, args.warmup, args.duration, args.seed * 100 + len(runs))
                )
                runs.append(run)
                print(
                    f"{config.label:<40} goodput {run.goodput:.2f}x C  outcomes {dict(run.outcomes)}  "
                    f"p50 {percentile(run.ok_latencies_ms, 50):.0f} ms  p99 {percentile(run.ok_latencies_ms, 99):.0f} ms  "
                    f"node {run.node}  history {dict(run.history)}  other {run.cpu_other:.0f}%",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(0.5)
        finally:
            stack.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    return runs, capacities


# ---------------------------------------------------------------------------- soak


@dataclass
class Soak:
    requests: int = 0
    warmup: int = 0
    seconds: float = 0.0
    errors: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (s, gateway, node) after the warm-up
    rss_start: int = 0
    rss_end: int = 0
    node_rss_start: int = 0
    node_rss_end: int = 0
    history_stored: int = 0
    healthz: dict = field(default_factory=dict)
    cpu_other: float = 0.0

    @property
    def rss_max(self) -> int:
        return max([self.rss_start, self.rss_end, *(g for _, g, _ in self.rss)])

    @property
    def ratio(self) -> float:
        return self.rss_end / self.rss_start if self.rss_start else float("nan")

    def slope_per_10k(self) -> float:
        """Least-squares growth of the gateway's RSS, in bytes per 10,000 requests."""
        points = [(t, g) for t, g, _ in self.rss]
        if len(points) < 3 or self.seconds <= 0:
            return float("nan")
        mt = sum(t for t, _ in points) / len(points)
        mg = sum(g for _, g in points) / len(points)
        var = sum((t - mt) ** 2 for t, _ in points)
        per_s = sum((t - mt) * (g - mg) for t, g in points) / var if var else 0.0
        return per_s * self.seconds / self.requests * 10_000


async def _get_json(port: int, path: str) -> dict:
    conn = await connect(port)
    try:
        status, body = await asyncio.wait_for(conn.request(http_request("GET", path, port)), 5)
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"GET {path}: {status} {body[:300]!r}")
    return json.loads(body)


async def soak_loop(stack: Stack, requests: int, concurrency: int, soak: Soak) -> None:
    request = http_request("POST", "/v1/chat/completions", stack.port, CHAT_BODY)
    pids = stack.pids()
    gateway, node = psutil.Process(pids["gateway"]), psutil.Process(pids["node"])
    conns = [await connect(stack.port) for _ in range(concurrency)]
    clock = time.perf_counter_ns
    far = clock() + int(3600e9)

    def ok(answer: tuple[int, bytes]) -> bool:
        return answer[0] == 200 and EXPECTED in answer[1]

    async def ask(conn: Any) -> tuple[int, bytes]:
        return await conn.request(request)

    try:
        warm: list[int] = []
        sent, errors = await asyncio.wait_for(closed_loop(conns, ask, ok, 0, far, warm, limit=SOAK_WARMUP), 600)
        soak.warmup, soak.errors = sent, errors
        soak.rss_start, soak.node_rss_start = gateway.memory_info().rss, node.memory_info().rss
        started = time.monotonic()
        cpu_before = _cpu_times(pids)

        async def sampler() -> None:
            while True:
                await asyncio.sleep(1.0)
                soak.rss.append((time.monotonic() - started, gateway.memory_info().rss, node.memory_info().rss))

        task = asyncio.create_task(sampler())
        try:
            sent, errors = await asyncio.wait_for(
                closed_loop(conns, ask, ok, clock(), far, soak.latencies_ns, limit=requests), 3600
            )
        finally:
            task.cancel()
        soak.seconds = time.monotonic() - started
        cpu_after = _cpu_times(pids)
        soak.requests, soak.errors = sent, soak.errors + errors
        soak.rss_end, soak.node_rss_end = gateway.memory_info().rss, node.memory_info().rss
        busy = sum(cpu_after[k] - cpu_before[k] for k in cpu_after if k != SYSTEM and k in cpu_before)
        soak.cpu_other = max(0.0, 100 * ((cpu_after[SYSTEM] - cpu_before[SYSTEM]) - busy) / soak.seconds)
    finally:
        for conn in conns:
            conn.close()
    soak.history_stored = await stack.history_count(soak.warmup + soak.requests, timeout=60)
    soak.healthz = await _get_json(stack.port, "/healthz")


def run_soak(args: argparse.Namespace) -> Soak:
    workdir = Path(tempfile.mkdtemp(prefix="llm-router-bench-soak-"))
    stack = Stack("split", workdir, 64)
    soak = Soak()
    try:
        stack.start()
        _event_loop_run(soak_loop(stack, args.requests, args.concurrency, soak))
        print(
            f"soak: {soak.requests:,} requests in {soak.seconds:.1f} s, errors {soak.errors}, gateway RSS "
            f"{_mib(soak.rss_start)} -> max {_mib(soak.rss_max)} -> {_mib(soak.rss_end)} ({soak.ratio:.3f}x), "
            f"history {soak.history_stored:,}, healthz {soak.healthz}",
            file=sys.stderr,
            flush=True,
        )
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return soak


# ---------------------------------------------------------------------------- report


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _kib(n: float) -> str:
    return "-" if math.isnan(n) else f"{n / 2**10:+,.0f} KiB"


def _ms(values: list[float], p: float) -> str:
    return "-" if not values else f"{percentile(values, p):,.0f}"


def render_goodput(
    runs: list[GoodputRun], capacities: dict[tuple[str, ...], float], args: argparse.Namespace
) -> list[str]:
    cs = ", ".join(f"{c:.1f}" for c in capacities.values())
    lines = [
        "### Goodput under overload",
        "",
        f"One node, {args.parallel} slots, the bench engine holding each for {args.delay_ms:g} ms: capacity C measured "
        f"through the gateway = {cs} requests/s (one calibration per gateway setting). Open-loop Poisson arrivals, "
        f"{args.warmup:g} s warm-up + {args.duration:g} s measured per run; each client gives up after its timeout and "
        "closes its connection. Gateway defaults: `--queue-size 100 --queue-timeout 60`.",
        "",
        "| run | client timeout | sent | 200 in time | **goodput (x C)** | timed out | 429 | 503 | 504 | other | "
        "p50 / p99 of 200s (ms) | node: busy on abandoned work |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        o = r.outcomes
        other = r.sent - sum(o[k] for k in ("200", "timeout", "429", "503", "504"))
        busy = r.node["useful_s"] + r.node["wasted_s"]
        share = f"{100 * r.node['wasted_s'] / busy:.0f}% of {busy:.1f} s" if busy else "-"
        lines.append(
            f"| {r.config.label} | {r.config.timeout:g} s | {r.sent:,} | {o['200']:,} | **{r.goodput:.2f}** "
            f"| {o['timeout']:,} | {o['429']:,} | {o['503']:,} | {o['504']:,} | {other:,} "
            f"| {_ms(r.ok_latencies_ms, 50)} / {_ms(r.ok_latencies_ms, 99)} | {share} |"
        )
    lines += [
        "",
        "Node and history detail (sends to the node in the window, timed by the benchmark's NATS subscriber, "
        "so approximate when the machine is busy; history records by status):",
        "",
    ]
    for r in runs:
        nd = r.node
        slots = nd["slot_s"]
        hist = ", ".join(f"{k}: {v:,}" for k, v in sorted(r.history.items()))
        lines.append(
            f"- {r.config.label}: {nd['sends']:,} sends to the node ({nd['refused_busy']:,} refused `node_busy`), "
            f"{nd['abandoned']:,} ran for clients already gone ({nd['cut_short']:,} cancelled on the node), "
            f"{nd['unanswered']:,} cancelled before they started (no reply, by design); node slots "
            f"busy {100 * (nd['useful_s'] + nd['wasted_s']) / slots:.0f}% of {slots:.0f} slot-s: {nd['useful_s']:.1f} s "
            f"delivered, {nd['wasted_s']:.1f} s wasted; history: {hist}; after the run the gateway held "
            f"{r.after.get('gateway_inflight')} slots and {r.after.get('queue_waiting')} queued; other processes "
            f"{r.cpu_other:.0f}% of a core"
        )
    by = {r.config.label: r for r in runs}
    base = by.get("baseline 0.7x C")
    lines.append("")
    if base:
        expected = abs(base.goodput - base.config.load) <= 0.07 and base.outcomes["timeout"] <= 0.01 * base.sent
        lines.append(
            f"- Baseline: goodput {base.goodput:.2f}x C at {base.config.load:g}x C offered, "
            f"{base.outcomes['timeout']:,} timed out ({'as expected' if expected else '**not as expected**'})."
        )
    for r in runs:
        if r.config.load >= 2.0:
            healthy = r.goodput >= GOODPUT_HEALTHY
            lines.append(
                f"- {r.config.label}: goodput **{r.goodput:.2f}x C** under 2x overload "
                f"(healthy >= {GOODPUT_HEALTHY:g}x: {'met' if healthy else '**not met**'})."
            )
    return lines


def render_soak(soak: Soak, args: argparse.Namespace) -> list[str]:
    p50 = percentile([v / 1e6 for v in soak.latencies_ns], 50)
    p99 = percentile([v / 1e6 for v in soak.latencies_ns], 99)
    total = soak.warmup + soak.requests
    flat = soak.ratio <= 1 + RSS_TOLERANCE
    history_ok = soak.history_stored >= total and not soak.healthz.get("history", {}).get("dropped")
    verdict = flat and soak.errors == 0 and history_ok
    return [
        "### Soak: gateway memory over a long run",
        "",
        f"Instant engine (64 slots), closed loop of {args.concurrency} keep-alive clients, history on; "
        f"{soak.warmup:,} warm-up requests, then {soak.requests:,} measured, the gateway's RSS sampled every second "
        f"({len(soak.rss)} samples).",
        "",
        "| requests | seconds | requests/s | errors | p50 / p99 (ms) | gateway RSS start | max | end | end / start | "
        "growth per 10k requests (fit) | node RSS start -> end |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {soak.requests:,} | {soak.seconds:.1f} | {soak.requests / soak.seconds:,.0f} | {soak.errors} "
        f"| {p50:.2f} / {p99:.2f} | {_mib(soak.rss_start)} | {_mib(soak.rss_max)} | {_mib(soak.rss_end)} "
        f"| **{soak.ratio:.3f}** | {_kib(soak.slope_per_10k())} | {_mib(soak.node_rss_start)} -> "
        f"{_mib(soak.node_rss_end)} |",
        "",
        f"- History: {soak.history_stored:,} records in the HISTORY stream for {total:,} requests (warm-up included); "
        f"/healthz after the run: pending {soak.healthz.get('history', {}).get('pending')}, "
        f"dropped {soak.healthz.get('history', {}).get('dropped')}.",
        f"- Other processes used {soak.cpu_other:.0f}% of a core during the measured part.",
        f"- Verdict: {'**pass**' if verdict else '**FAIL**'}: gateway RSS end/start {soak.ratio:.3f} "
        f"(flat within {RSS_TOLERANCE:.0%}: {'yes' if flat else 'no'}), {soak.errors} errors, "
        f"history {'complete' if history_ok else 'incomplete'}.",
    ]


def render(
    runs: list[GoodputRun],
    capacities: dict,
    soak: Soak | None,
    args: argparse.Namespace,
    command: str,
    started: float,
    busy_before: float,
    loadavg: tuple[float, float],
) -> str:
    lines = [
        *report_header(started, command),
        f"Machine load: {busy_before:.0f}% of one core busy just before the run (`machine_busy()`); load average "
        f"{loadavg[0]:.2f} at the start, {loadavg[1]:.2f} at the end; the CPU other processes took during each run "
        "is given below it.",
        "",
    ]
    if runs:
        lines += render_goodput(runs, capacities, args) + [""]
    if soak is not None:
        lines += render_soak(soak, args)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 s goodput runs, 20,000-request soak")
    parser.add_argument("--only", choices=["goodput", "soak"], default=None, help="run one part only")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="engine service time per request [%(default)s]")
    parser.add_argument("--parallel", type=int, default=2, help="node slots in the goodput runs [%(default)s]")
    parser.add_argument("--client-timeout", type=float, default=1.0, help="seconds a client waits [%(default)s]")
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=0.5,
        help="the gateway's --queue-timeout in the last goodput run [%(default)s]",
    )
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds before each measured window [3; --quick: 2]"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="measured seconds per goodput run [25; --quick: 8]"
    )
    parser.add_argument("--calibration", type=float, default=None, help="seconds of calibration [4; --quick: 2]")
    parser.add_argument("--runs", default=RUNS, help="goodput runs to make, comma-separated [%(default)s]")
    parser.add_argument("--seed", type=int, default=1, help="seed of the arrival traces [%(default)s]")
    parser.add_argument("--requests", type=int, default=None, help="measured soak requests [100000; --quick: 20000]")
    parser.add_argument("--concurrency", type=int, default=32, help="soak clients [%(default)s]")
    parser.add_argument("--output", type=Path, default=None, help="also write the results into this Markdown file")
    args = parser.parse_args()
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if any(r not in RUNS.split(",") for r in args.runs):
        parser.error(f"--runs takes some of {RUNS}")
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 3.0)
    args.duration = args.duration if args.duration is not None else (8.0 if args.quick else 25.0)
    args.calibration = args.calibration if args.calibration is not None else (2.0 if args.quick else 4.0)
    args.requests = args.requests if args.requests is not None else (20_000 if args.quick else 100_000)
    command = ("python bench/reliability.py " + " ".join(sys.argv[1:])).strip()
    started = time.time()

    quiet_logs_and_check_machine()
    busy_before = machine_busy()
    load_start = os.getloadavg()[0]

    runs: list[GoodputRun] = []
    capacities: dict = {}
    soak = None
    if args.only in (None, "goodput"):
        runs, capacities = run_goodput(args)
    if args.only in (None, "soak"):
        soak = run_soak(args)
    text = render(runs, capacities, soak, args, command, started, busy_before, (load_start, os.getloadavg()[0]))
    publish(text, args.output, BEGIN, END)
    failed = soak is not None and (soak.errors or soak.ratio > 1 + RSS_TOLERANCE)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
