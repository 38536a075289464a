"""How well requests are spread over nodes of different speeds: the gateway's dispatch against
NATS's random pick, round-robin and a simulated ideal join-shortest-queue.

    python bench/dispatch.py                      # ~5 min: loads 70% and 90%, 5 s warm-up + 25 s each
    python bench/dispatch.py --quick              # ~1.5 min: the same, a quarter of the time
    python bench/dispatch.py --output docs/benchmarks.md

The stack is the real one, each component in its own process (``bench/stack.py``, as in
``bench/overhead.py``): an embedded nats-server (``broker.EmbeddedNats``, started from the
event loop that runs the benchmark), the registry, the gateway and three nodes, each
``NodeAgent(runtimes=[MinimalRuntime(delay)], parallel=1)``. A tiny GGUF written by
``nodes.demo_model.write_tiny_gguf`` is registered with ``Registry.register``, so every node
loads the minimal engine of ``bench/minimal_engine.py`` through the normal registry -> node
path; each node's engine holds its single slot for a fixed service time per request (node
``slow`` 4x, ``medium`` 2x, ``fast`` 1x ``--base-ms``: 80, 40 and 20 ms by default), so the
speeds differ 1:2:4 and the total capacity is the sum of 1/service time (87.5 requests/s by
default). A node that is busy queues a request on its slot semaphore (FIFO), so no policy
fails a request for lack of a slot; it just waits.

Load is open-loop: Poisson arrivals (seeded) at ``--loads`` x capacity (70% and 90%), the
same arrival trace for every policy at a given load. Each run sends the trace's warm-up part
(not measured) and then its measured window; latency is send -> final answer of the requests
sent in the window (waited for after the window, up to ``--drain`` seconds; whatever is still
unanswered then counts as an error and is cancelled), throughput is the answers that arrived
within the window divided by its length. Policies:

1. ``ours``: ``POST /v1/chat/completions`` (not streamed) through the gateway over HTTP/1.1
   keep-alive connections from a pool that grows with the offered concurrency; the gateway
   chooses the node. The node shares come from the gateway's history records.
2. ``nats-random``: this process publishes the ``InferenceRequest`` the gateway would send on
   the shared queue-group subject ``infer.chat.<model>``, so nats-server picks a node at
   random, and reads the final reply on its own inbox.
3. ``round-robin``: the same, on each node's own subject in turn (slow, medium, fast, ...).
4. Simulated (a discrete-event simulation over the same arrival trace and the same service
   times, no overhead at all; each node one FIFO server): ``ideal JSQ (simulated)``, an
   arrival joins the node with the fewest requests present, ties to the fastest node; and
   ``random (simulated)`` (median of ``--sim-seeds`` seeded runs) and ``round-robin
   (simulated)``, to check the measured ones against.

Before the runs, each node's effective service time is measured: a burst of requests queued
at once on its own subject, the spacing of the answers (the engine's delay plus the node's own
work per request). The report repeats the JSQ and round-robin simulations with those times,
since near saturation a millisecond more per request moves the queues noticeably.

With speeds 1:2:4, random and round-robin send a third of the load to the slow node, which
has a seventh of the capacity: above ~43% load its queue grows for the whole run, so their
latencies grow with the run's length. That is the point of the comparison, not a flaw of the
setup; the simulated rows show what the same trace must give.

Results are printed as Markdown. ``--output FILE`` also writes them into FILE between the
markers ``<!-- dispatch:begin -->`` and ``<!-- dispatch:end -->`` (``write_section`` of
``bench/overhead.py``). Every loop is bounded in time and in count, and every process is
stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

from minimal_engine import TEXT  # noqa: E402
from overhead import (  # noqa: E402
    CHAT_BODY,
    MODEL,
    HttpConnection,
    Stack,
    _event_loop_run,
    connect,
    http_request,
    output_options,
    publish,
    quiet_logs_and_check_machine,
    report_header,
)

BEGIN, END = "<!-- dispatch:begin -->", "<!-- dispatch:end -->"
NODES = [("slow", 4), ("medium", 2), ("fast", 1)]  # name, service time in multiples of --base-ms
NODE_PREFIX = "bench-"
POLICIES = ["ours", "nats-random", "round-robin"]
OURS, RANDOM, ROUND_ROBIN = POLICIES
SIM_JSQ, SIM_RANDOM, SIM_RR = "ideal JSQ (simulated)", "random (simulated)", "round-robin (simulated)"
TARGET_JSQ_RATIO = 1.10  # ours p99 <= 110% of the simulated ideal JSQ p99
TARGET_RANDOM_FACTOR = 2.0  # ours p99 at least 2x better than random, at 90% load
MAX_ARRIVALS = 200_000  # a bound on every trace, whatever the rate and duration
IDLE_CONN_S = 3.0  # keep-alive connections idle longer are dropped (uvicorn closes them at 5 s)


# ---------------------------------------------------------------------------- results


@dataclass
class Row:
    load: float
    policy: str
    requests: int  # requests sent in the measured window
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int
    shares: dict[str, int] | None  # node name -> requests (measured window), when known
    simulated: bool = False
    lag_ms: float = 0.0  # how late the load generator sent a measured request, at worst


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(p / 100 * len(ordered))))  # nearest rank
    return ordered[rank - 1]


def summarize(
    load: float,
    policy: str,
    trace: list[float],
    warmup: float,
    duration: float,
    done: list[float | None],
    ok: list[bool],
    nodes: list[str | None],
    *,
    sent: list[float | None] | None = None,
    simulated: bool = False,
) -> Row:
    """One table row from per-request outcomes; times are seconds from the run's start.

    Measured requests: those whose arrival in ``trace`` falls in the window; their latency runs
    from ``sent`` (the actual send, default the trace's time) to ``done``. Throughput: correct
    answers that arrived within the window, whenever they were sent.
    """
    lo, hi = warmup, warmup + duration
    latencies: list[float] = []
    shares: Counter[str] = Counter()
    errors = requests = completed = 0
    lag = 0.0
    for at, start, end, good, node in zip(trace, sent or trace, done, ok, nodes, strict=True):
        if good and end is not None and lo <= end < hi:
            completed += 1
        if not lo <= at < hi:
            continue
        requests += 1
        if start is not None:
            lag = max(lag, start - at)
        if not good or end is None:
            errors += 1
            continue
        latencies.append((end - (at if start is None else start)) * 1000)
        if node is not None:
            shares[node] += 1
    return Row(
        load,
        policy,
        requests,
        percentile(latencies, 50),
        percentile(latencies, 99),
        completed / duration,
        errors,
        dict(shares) if shares else None,
        simulated,
        lag * 1000,
    )


# ---------------------------------------------------------------------------- arrivals and simulation


def poisson_trace(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival times (s from the start) of a Poisson process of ``rate`` per second."""
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds and len(out) < MAX_ARRIVALS:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def simulate(trace: list[float], service_s: list[float], policy: str, seed: int = 0) -> tuple[list[float], list[int]]:
    """Departure time and node of every arrival; each node is one FIFO server.

    ``jsq``: join the node with the fewest requests present (in service or waiting), ties to
    the fastest; ``random``: uniform; ``round-robin``: node ``i % n`` in the given order.
    """
    n = len(service_s)
    fastest_first = sorted(range(n), key=lambda k: service_s[k])
    present = [deque() for _ in range(n)]  # departure times of the requests at each node
    free_at = [0.0] * n
    rng = random.Random(seed)
    done: list[float] = []
    where: list[int] = []
    for i, at in enumerate(trace):
        for q in present:
            while q and q[0] <= at:
                q.popleft()
        if policy == "jsq":
            k = min(fastest_first, key=lambda j: len(present[j]))  # min keeps the first (fastest) of equals
        elif policy == "random":
            k = rng.randrange(n)
        elif policy == "round-robin":
            k = i % n
        else:
            raise ValueError(policy)
        free_at[k] = max(at, free_at[k]) + service_s[k]
        present[k].append(free_at[k])
        done.append(free_at[k])
        where.append(k)
    return done, where


def simulated_rows(
    load: float,
    trace: list[float],
    service_s: list[float],
    names: list[str],
    warmup: float,
    duration: float,
    seeds: int,
    seed: int,
) -> list[Row]:
    def row(policy: str, label: str, s: int = 0) -> Row:
        done, where = simulate(trace, service_s, policy, s)
        return summarize(
            load,
            label,
            trace,
            warmup,
            duration,
            list(done),
            [True] * len(trace),
            [names[k] for k in where],
            simulated=True,
        )

    randoms = [row("random", SIM_RANDOM, seed * 7919 + s) for s in range(max(1, seeds))]
    med = Row(
        load,
        SIM_RANDOM,
        randoms[0].requests,
        statistics.median(r.p50_ms for r in randoms),
        statistics.median(r.p99_ms for r in randoms),
        statistics.median(r.rps for r in randoms),
        0,
        {name: round(statistics.median((r.shares or {}).get(name, 0) for r in randoms)) for name in names},
        simulated=True,
    )
    return [row("jsq", SIM_JSQ), med, row("round-robin", SIM_RR)]


# ---------------------------------------------------------------------------- load generator


async def open_loop(
    trace: list[float], send: Callable[[int], Awaitable[tuple[bool, str | None]]], drain: float
) -> tuple[list[float | None], list[float | None], list[bool], list[str | None]]:
    """Send request ``i`` at ``trace[i]`` (open loop: never waiting for answers), then wait up to
    ``drain`` seconds for the outstanding ones; those still unanswered are cancelled.

    Returns, per request, the send and answer times (s from the start; None when not sent or
    unanswered), whether the answer was right, and the node that gave it.
    """
    clock = time.perf_counter
    n = len(trace)
    sent: list[float | None] = [None] * n
    done: list[float | None] = [None] * n
    ok = [False] * n
    nodes: list[str | None] = [None] * n
    gc.collect()
    gc.freeze()  # what exists now is never scanned again: no long collection pauses the sender
    t0 = clock() + 0.05

    async def one(i: int) -> None:
        sent[i] = clock() - t0
        try:
            good, node = await send(i)
        except asyncio.CancelledError:
            raise
        except Exception:
            good, node = False, None
        done[i] = clock() - t0
        ok[i], nodes[i] = good, node

    tasks: list[asyncio.Task] = []
    try:
        for i, at in enumerate(trace):
            delay = t0 + at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        if tasks:
            await asyncio.wait(tasks, timeout=drain)
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
    return sent, done, ok, nodes


class HttpPool:
    """Keep-alive connections to the gateway, one request at a time each; grows on demand."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[HttpConnection, float]] = []  # LIFO: the hottest connection first
        self.opened: list[HttpConnection] = []

    async def request(self, data: bytes) -> tuple[int, bytes]:
        conn = None
        now = time.monotonic()
        while self.idle:
            candidate, since = self.idle.pop()
            if candidate.lost is None and now - since < IDLE_CONN_S:
                conn = candidate
                break
            candidate.close()
        if conn is None:
            conn = await connect(self.port)
            self.opened.append(conn)
        try:
            answer = await conn.request(data)
        except BaseException:
            conn.close()
            raise
        self.idle.append((conn, time.monotonic()))
        return answer

    def close(self) -> None:
        for conn in self.opened:
            conn.close()
        self.opened.clear()
        self.idle.clear()


class NatsAsker:
    """Publishes ``InferenceRequest``s and awaits their final reply, one wildcard inbox for all."""

    def __init__(self, nc: Any) -> None:
        from events import codec
        from events.openai import ChatCompletionBody

        self.nc = nc
        self.prefix = nc.new_inbox()
        self.ids = itertools.count()
        self.waiting: dict[str, asyncio.Future] = {}
        self.body = codec.decode(CHAT_BODY, ChatCompletionBody)
        self.sub = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(f"{self.prefix}.*", cb=self._on_reply)

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()

    async def _on_reply(self, msg: Any) -> None:
        from events import codec
        from events.messages import FINAL_REPLIES

        future = self.waiting.get(msg.subject)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(RuntimeError("no responders"))
            return
        try:
            reply = codec.decode_reply(msg.data)
        except Exception as exc:
            future.set_exception(exc)
            return
        if isinstance(reply, FINAL_REPLIES):
            future.set_result(reply)

    async def ask(self, subject: str) -> tuple[bool, str | None]:
        from events import codec, subjects
        from events.messages import CancelRequest, InferenceRequest, TextDone

        request = InferenceRequest(
            request_id=uuid.uuid4().hex, model=MODEL, capability=subjects.CHAT, params=self.body, stream=False
        )
        inbox = f"{self.prefix}.{next(self.ids)}"
        future = asyncio.get_running_loop().create_future()
        self.waiting[inbox] = future
        try:
            await self.nc.publish(subject, codec.encode(request), reply=inbox)
            reply = await future
        except asyncio.CancelledError:  # given up (drain bound): free the node's slot
            await self.nc.publish(
                subjects.infer_cancel(request.request_id), codec.encode(CancelRequest(request_id=request.request_id))
            )
            raise
        finally:
            self.waiting.pop(inbox, None)
        return isinstance(reply, TextDone) and reply.text == TEXT, getattr(reply, "node_id", None)


# ---------------------------------------------------------------------------- the stack


class DispatchStack(Stack):
    """nats-server + registry + gateway + the three nodes of NODES, each its own process, each
    node with one slot and its own service time."""

    def __init__(self, workdir: Path, base_ms: float) -> None:
        self.nodes = [(NODE_PREFIX + name, factor * base_ms) for name, factor in NODES]  # node id, service ms
        nodes = [(node_id, ["--delay-ms", f"{ms:g}"]) for node_id, ms in self.nodes]
        super().__init__("split", workdir, 1, nodes=nodes, common_args=["--log-level", "warning"])

    async def start(self) -> None:
        self.launch()
        await self.wait_until_served()


async def settle(asker: NatsAsker, node_ids: list[str], timeout: float = 120.0) -> None:
    """One request to each node on its own subject, answered in FIFO order behind whatever the
    node still had queued: when all are back, every node is idle."""
    from events import subjects

    answers = await asyncio.wait_for(
        asyncio.gather(*(asker.ask(subjects.infer_on_node(subjects.CHAT, MODEL, n)) for n in node_ids)), timeout
    )
    if not all(good for good, _ in answers):
        raise RuntimeError(f"a node did not answer correctly before the run: {answers}")


async def calibrate(asker: NatsAsker, nodes: list[tuple[str, float]], seconds: float = 1.5) -> list[float]:
    """Effective service time of each node, in seconds: a burst of requests queued at once on
    the node's own subject, answered one after another; the mean spacing of the answers is the
    engine's delay plus what the node spends per request between two engine calls."""
    from events import subjects

    async def burst(node_id: str, ms: float) -> float:
        subject = subjects.infer_on_node(subjects.CHAT, MODEL, node_id)
        times: list[float] = []

        async def ask() -> None:
            good, _ = await asker.ask(subject)
            if good:
                times.append(time.perf_counter())

        await asyncio.gather(*(ask() for _ in range(max(8, int(seconds * 1000 / ms)))))
        times.sort()
        return (times[-1] - times[0]) / (len(times) - 1)

    return list(await asyncio.wait_for(asyncio.gather(*(burst(n, ms) for n, ms in nodes)), 120))


async def run_policy(
    policy: str,
    load: float,
    trace: list[float],
    args: argparse.Namespace,
    stack: DispatchStack,
    asker: NatsAsker,
    nc: Any,
) -> Row:
    from events import subjects

    node_ids = [node_id for node_id, _ in stack.nodes]
    names = {node_id: node_id.removeprefix(NODE_PREFIX) for node_id in node_ids}
    await settle(asker, node_ids)
    await asyncio.sleep(0.2)
    history: list[tuple[float, str]] = []
    pool = HttpPool(stack.port)
    sub = None
    try:
        if policy == OURS:
            import msgspec

            class Seen(msgspec.Struct):  # the two fields of a history record used here
                started_at: float
                node_id: str | None = None

            async def on_history(msg: Any) -> None:
                try:
                    record = msgspec.json.decode(msg.data, type=Seen)
                except msgspec.DecodeError:
                    return
                if record.node_id:
                    history.append((record.started_at, record.node_id))

            sub = await nc.subscribe(subjects.HISTORY_ALL, cb=on_history)
            data = http_request("POST", "/v1/chat/completions", stack.port, CHAT_BODY)
            expected = f'"content":"{TEXT}"'.encode()

            async def send(i: int) -> tuple[bool, str | None]:
                status, body = await pool.request(data)
                return status == 200 and expected in body, None

        elif policy == RANDOM:
            shared = subjects.infer(subjects.CHAT, MODEL)

            async def send(i: int) -> tuple[bool, str | None]:
                return await asker.ask(shared)

        elif policy == ROUND_ROBIN:
            own = [subjects.infer_on_node(subjects.CHAT, MODEL, n) for n in node_ids]

            async def send(i: int) -> tuple[bool, str | None]:
                return await asker.ask(own[i % len(own)])

        else:
            raise ValueError(policy)

        wall_start = time.time() + 0.05  # open_loop's t0, on the clock the gateway's records use
        sent, done, ok, nodes = await open_loop(trace, send, args.drain)
        row = summarize(
            load,
            policy,
            trace,
            args.warmup,
            args.duration,
            done,
            ok,
            [names.get(n) if n else None for n in nodes],
            sent=sent,
        )
        if policy == OURS:
            await asyncio.sleep(1.0)  # the gateway writes history records in the background
            lo, hi = wall_start + args.warmup, wall_start + args.warmup + args.duration
            shares = Counter(names.get(node, node) for started, node in history if lo <= started < hi)
            row.shares = dict(shares) if shares else None
        return row
    finally:
        pool.close()
        if sub is not None:
            await sub.unsubscribe()


# ---------------------------------------------------------------------------- report


def _share_cell(row: Row, names: list[str]) -> str:
    if not row.shares:
        return "-"
    total = sum(row.shares.values()) or 1
    return " / ".join(f"{100 * row.shares.get(name, 0) / total:.0f}" for name in names)


def _f(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:,.1f}"


def render(
    rows: list[Row],
    args: argparse.Namespace,
    command: str,
    started: float,
    service_ms: list[float],
    capacity: float,
    effective_ms: list[float],
    effective_rows: list[Row],
) -> str:
    names = [name for name, _ in NODES]
    speeds = ", ".join(f"{name} {ms:g} ms" for name, ms in zip(names, service_ms, strict=True))
    lines = [
        *report_header(started, command),
        f"3 nodes, one slot each, service times {speeds} (capacity {capacity:.1f} requests/s); "
        f"Poisson arrivals (seed {args.seed}), {args.warmup:g} s warm-up + {args.duration:g} s measured per run.",
        "",
        "| load | policy | requests | p50 (ms) | p99 (ms) | throughput (req/s) | errors | share "
        + "/".join(names)
        + " (%) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        offered = f"{r.load:.0%} ({r.load * capacity:.1f}/s)"
        lines.append(
            f"| {offered} | {r.policy} | {r.requests:,} | {_f(r.p50_ms)} | {_f(r.p99_ms)} | {r.rps:.1f} "
            f"| {'-' if r.simulated else r.errors} | {_share_cell(r, names)} |"
        )
    lines += ["", *checks(rows)]
    eff = ", ".join(f"{name} {ms:.2f} ms" for name, ms in zip(names, effective_ms, strict=True))
    lines.append(
        f"- effective service times, measured (spacing of the answers to a burst queued on each node's "
        f"own subject; the engine's delay plus the node's own work per request): {eff}"
    )
    for r in effective_rows:
        lines.append(
            f"  - {r.load:.0%} load, {r.policy} with these times: p50 {_f(r.p50_ms)} ms, p99 {_f(r.p99_ms)} ms, throughput {r.rps:.1f}/s"
        )
    measured = [r for r in rows if not r.simulated]
    if measured:
        lines.append(
            f"- load generator: sent at worst {max(r.lag_ms for r in measured):.1f} ms after the trace's "
            "time (latencies count from the actual send)"
        )
    return "\n".join(lines) + "\n"


def checks(rows: list[Row]) -> list[str]:
    by = {(r.load, r.policy): r for r in rows}
    out = []
    for load in sorted({r.load for r in rows}):
        ours, jsq = by.get((load, OURS)), by.get((load, SIM_JSQ))
        if ours and jsq:
            ratio = ours.p99_ms / jsq.p99_ms if jsq.p99_ms > 0 else float("nan")
            verdict = "met" if ratio <= TARGET_JSQ_RATIO else "NOT met"
            out.append(
                f"- {load:.0%} load: ours p99 {_f(ours.p99_ms)} ms vs ideal JSQ (simulated) "
                f"{_f(jsq.p99_ms)} ms = {ratio:.2f}x (target <= {TARGET_JSQ_RATIO:.2f}x): {verdict}"
            )
    high = max((r.load for r in rows), default=None)
    if high is not None:
        ours, rnd = by.get((high, OURS)), by.get((high, RANDOM))
        if ours and rnd:
            factor = rnd.p99_ms / ours.p99_ms if ours.p99_ms > 0 else float("nan")
            verdict = "met" if factor >= TARGET_RANDOM_FACTOR else "NOT met"
            out.append(
                f"- {high:.0%} load: nats-random p99 {_f(rnd.p99_ms)} ms / ours p99 {_f(ours.p99_ms)} ms "
                f"= {factor:.1f}x better (target >= {TARGET_RANDOM_FACTOR:g}x): {verdict}"
            )
    for load in sorted({r.load for r in rows}):
        for policy, sim in ((RANDOM, SIM_RANDOM), (ROUND_ROBIN, SIM_RR)):
            m, s = by.get((load, policy)), by.get((load, sim))
            if m and s:
                out.append(
                    f"- {load:.0%} load, measured vs simulated {policy}: p50 {_f(m.p50_ms)} vs {_f(s.p50_ms)} ms, "
                    f"p99 {_f(m.p99_ms)} vs {_f(s.p99_ms)} ms ({m.p99_ms / s.p99_ms:.2f}x), "
                    f"throughput {m.rps:.1f} vs {s.rps:.1f}/s"
                )
    return out


# ---------------------------------------------------------------------------- main


async def run_all(args: argparse.Namespace, started: float, command: str) -> tuple[list[Row], str]:
    import nats

    service_ms = [factor * args.base_ms for _, factor in NODES]
    service_s = [ms / 1000 for ms in service_ms]
    capacity = sum(1 / s for s in service_s)
    names = [name for name, _ in NODES]
    rows: list[Row] = []
    workdir = Path(tempfile.mkdtemp(prefix="llm-router-bench-dispatch-"))
    stack = DispatchStack(workdir, args.base_ms)
    nc = asker = None
    try:
        t0 = time.monotonic()
        await stack.start()
        print(
            f"stack up in {time.monotonic() - t0:.1f} s: gateway on port {stack.port}, nodes "
            + ", ".join(f"{n} {ms:g} ms" for n, ms in stack.nodes),
            file=sys.stderr,
            flush=True,
        )
        nc = await nats.connect(stack.nats.url, name="bench-dispatch")
        asker = NatsAsker(nc)
        await asker.start()
        await settle(asker, [node_id for node_id, _ in stack.nodes])
        effective_s = await calibrate(asker, stack.nodes)
        effective_rows: list[Row] = []
        print(
            "effective service times: "
            + ", ".join(f"{n} {1000 * s:.2f} ms" for n, s in zip(names, effective_s, strict=True)),
            file=sys.stderr,
            flush=True,
        )
        for load in args.loads:
            trace = poisson_trace(load * capacity, args.warmup + args.duration, args.seed * 1000 + round(load * 1000))
            sims = simulated_rows(load, trace, service_s, names, args.warmup, args.duration, args.sim_seeds, args.seed)
            for r in sims:
                print(
                    f"{load:.0%} {r.policy:<26} p50={_f(r.p50_ms)} ms  p99={_f(r.p99_ms)} ms  {r.rps:.1f} req/s",
                    file=sys.stderr,
                    flush=True,
                )
            for policy in args.policies:
                t1 = time.monotonic()
                r = await run_policy(policy, load, trace, args, stack, asker, nc)
                rows.append(r)
                print(
                    f"{load:.0%} {policy:<26} p50={_f(r.p50_ms)} ms  p99={_f(r.p99_ms)} ms  {r.rps:.1f} req/s  "
                    f"errors={r.errors}  shares={r.shares}  lag={r.lag_ms:.1f} ms  ({time.monotonic() - t1:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            rows.extend(sims)
            effective_rows += [
                r
                for r in simulated_rows(
                    load, trace, effective_s, names, args.warmup, args.duration, args.sim_seeds, args.seed
                )
                if r.policy in (SIM_JSQ, SIM_RR)
            ]
        return rows, render(
            rows, args, command, started, service_ms, capacity, [1000 * s for s in effective_s], effective_rows
        )
    finally:
        if asker is not None:
            await asker.stop()
        if nc is not None:
            await nc.close()
        stack.stop()
        if args.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a quarter of the time: 1.25 s warm-up + 6 s per run")
    parser.add_argument("--loads", default="0.7,0.9", help="offered load as fractions of capacity [%(default)s]")
    parser.add_argument("--policies", default=",".join(POLICIES), help="measured policies [%(default)s]")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per run [5; --quick: 1.25]")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per run [25; --quick: 6]")
    parser.add_argument(
        "--base-ms",
        type=float,
        default=20.0,
        help="service time of the fastest node; the others take 2x and 4x [%(default)s]",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the arrival traces [%(default)s]")
    parser.add_argument("--sim-seeds", type=int, default=21, help="seeded runs of the random simulation [%(default)s]")
    parser.add_argument(
        "--drain",
        type=float,
        default=None,
        help="seconds to wait for answers after the last arrival [max(60, 3 x run)]",
    )
    output_options(parser)
    args = parser.parse_args()
    args.loads = [float(x) for x in args.loads.split(",") if x.strip()]
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if any(p not in POLICIES for p in args.policies):
        parser.error(f"--policies takes some of {', '.join(POLICIES)}")
    if any(not 0 < load < 1.5 for load in args.loads):
        parser.error("--loads: fractions of capacity, e.g. 0.7,0.9")
    args.warmup = args.warmup if args.warmup is not None else (1.25 if args.quick else 5.0)
    args.duration = args.duration if args.duration is not None else (6.0 if args.quick else 25.0)
    args.drain = args.drain if args.drain is not None else max(60.0, 3 * (args.warmup + args.duration))
    command = ("python bench/dispatch.py " + " ".join(sys.argv[1:])).strip()
    started = time.time()

    quiet_logs_and_check_machine()

    rows, text = _event_loop_run(run_all(args, started, command))
    publish(text, args.output, BEGIN, END)
    measured = [r for r in rows if not r.simulated]
    return 1 if any(r.errors or r.requests == 0 for r in measured) else 0


if __name__ == "__main__":
    sys.exit(main())
