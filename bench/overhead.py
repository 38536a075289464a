"""How much latency and throughput the router itself costs, measured with an instant engine.

    python bench/overhead.py                      # ~3 min: both layouts, 3 concurrencies, keys on and off
    python bench/overhead.py --quick              # ~40 s: split layout only, shorter phases
    python bench/overhead.py --output docs/benchmarks.md

Three setups answer the same chat request with the same engine (``bench/minimal_engine.py``,
which returns "pong" at once):

(a) ``in-process``: the engine's ``chat`` method called directly in this process; no HTTP,
    no NATS. This is the floor the stack is compared with.
(b) ``stack``: the real deployment. An embedded nats-server (``broker.EmbeddedNats``), the
    registry, the gateway and one node (``NodeAgent(runtimes=[MinimalRuntime()],
    parallel=64)``), started by ``bench/stack.py`` in processes of their own: either each
    in its own process (layout ``split``, as on a cluster) or all three in one process
    (layout ``up``, the shape of ``llm-router up``). With ``--keys`` (on by default) the split
    layout has a second gateway with API keys on, every request sending a bearer key, measured
    right after the plain one at each concurrency: ``stack (split, keys)`` against ``stack (split)``. A tiny GGUF file is registered with
    ``Registry.register``, so the node loads the minimal engine through the normal
    registry -> node path. This process drives ``POST /v1/chat/completions`` (not streamed)
    over HTTP/1.1 keep-alive connections to 127.0.0.1, one connection per concurrent client.
(c) ``NATS -> node`` (``--nats-direct``, on by default, off with ``--quick``): the split
    layout's node asked directly over NATS, as the gateway's dispatcher asks it, which splits
    the stack's cost into "node + NATS" and "gateway + HTTP".

The load generator is a small HTTP/1.1 client on raw asyncio transports (uvloop), about
20 microseconds of CPU per request under load, so that it stays far from being the
bottleneck; its CPU use is reported with the results (``--client wrk`` drives the stack
with wrk instead, as a cross-check). Every level is warmed up before it is measured, and
every loop is bounded both in time and in request count.

Results are printed as Markdown. ``--output FILE`` also writes them into FILE between the
markers ``<!-- overhead:begin -->`` and ``<!-- overhead:end -->`` (replacing what was there,
appending the section when the file has no markers, creating the file when it is missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import psutil  # noqa: E402
from minimal_engine import TEXT, MinimalEngine  # noqa: E402

from llm_router import processes  # noqa: E402

MODEL = "bench-tiny"
KEYED = "gateway+keys"  # the split layout's second gateway, API keys on (--keys)
TARGET_AUTH_ADDED_US = 50.0  # API keys: at most this much p50 latency at concurrency 1...
TARGET_AUTH_RPS_LOSS = 0.05  # ...and at most this share of throughput at concurrency 64
NODE_ID = "bench-node"
BEGIN, END = "<!-- overhead:begin -->", "<!-- overhead:end -->"
TARGET_ADDED_P50_MS = 1.0
TARGET_RPS_AT_64 = 2000.0
MAX_REQUESTS_PER_PHASE = 2_000_000  # a bound on every loop, whatever the duration
CHAT_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8}, separators=(",", ":")
).encode()


# ---------------------------------------------------------------------------- results


@dataclass
class Result:
    setup: str
    concurrency: int
    latencies_ns: list[int]
    seconds: float
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> % of one core
    sent: int = 0  # every request answered, warm-up included
    reported: dict[str, float] | None = None  # from wrk's own report: requests, p50, p99 (ms)

    @property
    def requests(self) -> int:
        return int(self.reported["requests"]) if self.reported else len(self.latencies_ns)

    def percentile_ms(self, p: float) -> float:
        if self.reported:
            return self.reported[f"p{p:g}"]
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        rank = min(len(ordered), max(1, math.ceil(p / 100 * len(ordered))))  # nearest rank
        return ordered[rank - 1] / 1e6

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------- (a) in-process


async def run_in_process(concurrency: int, warmup: float, duration: float) -> Result:
    """``concurrency`` asyncio tasks, each calling ``engine.chat`` directly in a loop.

    The engine call is synchronous, so only one runs at a time whatever the concurrency; the
    tasks yield to the loop between calls, as a server would. Latency is the call alone.
    """
    import threading as _threading

    from events import codec
    from events.openai import ChatCompletionBody

    engine = MinimalEngine(__file__)
    body = codec.decode(CHAT_BODY, ChatCompletionBody)
    cancelled = _threading.Event()
    clock = time.perf_counter_ns
    start = clock()
    measure_from = start + int(warmup * 1e9)
    measure_to = measure_from + int(duration * 1e9)
    samples: list[int] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        chat = engine.chat
        n = 0
        while n < MAX_REQUESTS_PER_PHASE:
            t0 = clock()
            if t0 >= measure_to:
                return
            outcome = chat(body, None, cancelled)
            t1 = clock()
            if t0 >= measure_from:
                samples.append(t1 - t0)
                if outcome.text != TEXT:
                    errors += 1
            n += 1
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), warmup + duration + 30)
    return Result("in-process", concurrency, samples, duration, errors)


# ---------------------------------------------------------------------------- HTTP client


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time; Content-Length bodies only."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():  # none asked, or the asker gave up (timed out)
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self.waiter = None
            waiter.set_exception(ValueError("response without content-length"))
            return
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : line_end if line_end > 0 else len(head)])
        total = end + 4 + length
        if len(buf) < total:
            return
        status = int(buf[9:12])
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        self.waiter = None
        waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)
        self.waiter = None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.lost is not None:
            raise self.lost
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(HttpConnection, "127.0.0.1", port)
    return conn


def http_request(method: str, path: str, port: int, body: bytes = b"", api_key: str | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def closed_loop(
    clients: list[Any],
    ask: Any,
    ok: Any,
    measure_from: int,
    measure_to: int,
    samples: list[int],
    limit: int | None = None,
) -> tuple[int, int]:
    """One worker per client, each sending its next request when the previous answer arrived.

    ``ask(client)`` sends one request and returns the answer (raising on a transport failure);
    ``ok(answer)`` says whether it is right. Latencies of answers completed inside the window go
    into ``samples``. Returns (answers received, errors). Bounded in time and in count (at most
    ``limit`` requests in all, when given).
    """
    clock = time.perf_counter_ns
    errors = sent = issued = 0
    limit = MAX_REQUESTS_PER_PHASE * len(clients) if limit is None else limit

    async def worker(client: Any) -> None:
        nonlocal errors, sent, issued
        for _ in range(MAX_REQUESTS_PER_PHASE):
            t0 = clock()
            if t0 >= measure_to or issued >= limit:
                return
            issued += 1
            try:
                answer = await ask(client)
            except Exception:
                errors += 1
                return
            t1 = clock()
            sent += 1
            if measure_from <= t1 < measure_to:
                samples.append(t1 - t0)
                if not ok(answer):
                    errors += 1

    await asyncio.gather(*(worker(c) for c in clients))
    return sent, errors


async def run_nats_direct(
    nats_url: str, node_id: str, concurrency: int, warmup: float, duration: float, pids: dict[str, int]
) -> Result:
    """``--nats-direct``: the node alone, asked over NATS as the gateway's dispatcher asks it
    (an ``InferenceRequest`` on the node's own subject, the reply awaited), with no HTTP and no
    gateway; ``concurrency`` requests in flight on one nats-py connection."""
    import uuid

    import nats

    from events import codec, subjects
    from events.messages import InferenceRequest, TextDone
    from events.openai import ChatCompletionBody

    body = codec.decode(CHAT_BODY, ChatCompletionBody)
    subject = subjects.infer_on_node(subjects.CHAT, MODEL, node_id)
    nc = await nats.connect(nats_url, name="bench-nats-direct")
    clock = time.perf_counter_ns
    measure_from = clock() + int(warmup * 1e9)
    measure_to = measure_from + int(duration * 1e9)
    samples: list[int] = []
    cpu_start = _cpu_times(pids)
    t_start = time.monotonic()

    async def ask(_: Any) -> Any:
        request = InferenceRequest(
            request_id=uuid.uuid4().hex, model=MODEL, capability=subjects.CHAT, params=body, stream=False
        )
        msg = await nc.request(subject, codec.encode(request), timeout=10)
        return codec.decode_reply(msg.data)

    def ok(reply: Any) -> bool:
        return isinstance(reply, TextDone) and reply.text == TEXT

    try:
        sent, errors = await asyncio.wait_for(
            closed_loop([None] * concurrency, ask, ok, measure_from, measure_to, samples), warmup + duration + 30
        )
    finally:
        await nc.close()
    # CPU over the whole phase (warm-up included): same rate, as the load is steady.
    cpu_end, window = _cpu_times(pids), time.monotonic() - t_start
    cpu = {name: 100 * (cpu_end[name] - cpu_start[name]) / window for name in cpu_end if name in cpu_start}
    cpu[OTHER] = max(0.0, cpu.pop(SYSTEM) - sum(cpu.values()))
    return Result("NATS -> node", concurrency, samples, duration, errors, cpu, sent)


async def run_http(
    port: int, concurrency: int, warmup: float, duration: float, pids: dict[str, int], api_key: str | None = None
) -> Result:
    """``concurrency`` clients, each on its own connection, sending the next request when the
    previous answer arrived (a closed loop). Samples: requests completed in the window."""
    request = http_request("POST", "/v1/chat/completions", port, CHAT_BODY, api_key=api_key)
    expected = f'"content":"{TEXT}"'.encode()
    conns = [await connect(port) for _ in range(concurrency)]
    clock = time.perf_counter_ns
    measure_from = clock() + int(warmup * 1e9)
    measure_to = measure_from + int(duration * 1e9)
    samples: list[int] = []
    cpu_start: dict[str, Any] = {}
    cpu_window: list[float] = []

    async def sampler() -> None:  # CPU times of every process at the window's edges
        await asyncio.sleep(max(0.0, (measure_from - clock()) / 1e9))
        cpu_start.update(_cpu_times(pids))
        cpu_window.append(time.monotonic())
        await asyncio.sleep(max(0.0, (measure_to - clock()) / 1e9))
        cpu_window.append(time.monotonic())

    async def ask(conn: HttpConnection) -> tuple[int, bytes]:
        return await conn.request(request)

    def ok(answer: tuple[int, bytes]) -> bool:
        status, body = answer
        return status == 200 and expected in body

    cpu_task = asyncio.create_task(sampler())
    try:
        sent, errors = await asyncio.wait_for(
            closed_loop(conns, ask, ok, measure_from, measure_to, samples), warmup + duration + 30
        )
        await cpu_task
        cpu_end = _cpu_times(pids)
    finally:
        cpu_task.cancel()
        for conn in conns:
            conn.close()
    window = cpu_window[1] - cpu_window[0] if len(cpu_window) == 2 else duration
    cpu = {name: 100 * (cpu_end[name] - cpu_start[name]) / window for name in cpu_end if name in cpu_start}
    if SYSTEM in cpu:  # whatever else ran on the machine meanwhile (not ours)
        cpu[OTHER] = max(0.0, cpu.pop(SYSTEM) - sum(cpu.values()))
    return Result("stack", concurrency, samples, duration, errors, cpu, sent)


SYSTEM, OTHER = "_system", "other processes"

WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%s'
"""
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def run_wrk(port: int, concurrency: int, warmup: float, duration: float, pids: dict[str, int], workdir: Path) -> Result:
    """The same closed loop driven by ``wrk`` (one thread, ``concurrency`` connections).

    wrk checks status codes only (non-2xx responses are errors), not bodies. Its latency
    percentiles are its own (HdrHistogram-style, whole run); the warm-up is a separate wrk run.
    """
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("--client wrk: no wrk on PATH (Debian: apt-get install wrk)")
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT % CHAT_BODY.decode())
    base = [wrk, "-t", "1", "-c", str(concurrency), "--latency", "--timeout", "10s", "-s", str(script)]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    warm = subprocess.run(
        [*base, "-d", f"{max(1, round(warmup))}s", url], capture_output=True, text=True, timeout=warmup + 60, check=True
    )
    warm_count = re.search(r"^\s+(\d+) requests in", warm.stdout, re.M)
    pids = {name: pid for name, pid in pids.items() if name != "load generator"}
    before, t0 = _cpu_times(pids), time.monotonic()
    proc = subprocess.Popen([*base, "-d", f"{max(1, round(duration))}s", url], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + duration + 60
    while True:  # bounded wait; wait4 also gives wrk's own CPU time
        waited, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if waited:
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise TimeoutError("wrk did not finish")
        time.sleep(0.05)
    after, window = _cpu_times(pids), time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out}")
    cpu = {name: 100 * (after[name] - before[name]) / window for name in after if name in before}
    cpu["load generator"] = 100 * (usage.ru_utime + usage.ru_stime) / window
    cpu[OTHER] = max(0.0, cpu.pop(SYSTEM) - sum(cpu.values()))
    reported: dict[str, float] = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M):
        reported[f"p{pct}"] = float(value) * _WRK_UNITS[unit]
    match = re.search(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m)", out, re.M)
    if not match or "p50" not in reported or "p99" not in reported:
        raise RuntimeError(f"cannot read wrk's report:\n{out}")
    reported["requests"] = float(match.group(1))
    seconds = float(match.group(2)) * _WRK_UNITS[match.group(3)] / 1e3
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    sent = int(reported["requests"]) + (int(warm_count.group(1)) if warm_count else 0)
    return Result("stack", concurrency, [], seconds, errors, cpu, sent, reported)


def _cpu_times(pids: dict[str, int]) -> dict[str, float]:
    total = psutil.cpu_times()
    busy = ("user", "nice", "system", "irq", "softirq", "steal")
    out = {SYSTEM: sum(getattr(total, name, 0.0) for name in busy)}
    for name, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[name] = times.user + times.system
    return out


# ---------------------------------------------------------------------------- the stack


class Stack:
    """nats-server + registry + gateway + nodes of ``bench/stack.py``, in ``split`` or ``up``
    layout; the processes are started and stopped by ``llm_router.processes.Stack``."""

    def __init__(
        self,
        layout: str,
        workdir: Path,
        parallel: int,
        *,
        node_args: list[str] | None = None,
        gateway_args: list[str] | None = None,
        nodes: list[tuple[str, list[str]]] | None = None,
        common_args: list[str] | None = None,
        keyed_gateway: bool = False,
    ) -> None:
        """``node_args``/``gateway_args``: extra ``bench/stack.py`` options (``--delay-ms``,
        ``--queue-timeout``...); in the ``up`` layout both go to the one process. ``nodes``:
        (node id, its own extra options) per node of the split layout (default: one, NODE_ID).
        ``common_args``: for every process (``--log-level warning``). ``keyed_gateway``: the
        split layout also gets a second gateway with API keys on (``keyed_port``, ``api_key``)."""
        self.layout = layout
        self.workdir = workdir
        self.parallel = parallel
        self.node_args = list(node_args or [])
        self.gateway_args = list(gateway_args or [])
        self.node_ids = [node_id for node_id, _ in nodes] if nodes else [NODE_ID]
        self._nodes = nodes or [(NODE_ID, [])]
        self.common_args = list(common_args or [])
        self.nats = None
        self.processes: processes.Stack | None = None
        self.port = 0
        self.keyed_gateway = keyed_gateway
        self.keyed_port = 0
        self.api_key: str | None = None  # the keyed gateway's admin key: every request to it sends it

    def launch(self) -> None:
        """Every process started and READY (blocking); then wait until the model is served."""
        from broker import EmbeddedNats
        from nodes.demo_model import write_tiny_gguf

        model_path = write_tiny_gguf(self.workdir / "models" / f"{MODEL}.gguf")
        self.nats = EmbeddedNats(self.workdir / "nats", port=0)
        # Started from the thread that runs the benchmark: the server dies with the thread that
        # started it (PR_SET_PDEATHSIG), like the children below.
        url = self.nats.start_sync()
        self.processes = stack = processes.Stack(url, self.workdir)
        common = self.common_args
        registry_args = ["--model-path", str(model_path), "--model-name", MODEL]
        gateway_args = ["--port", "0", *self.gateway_args]

        def node_args(node_id: str, extra: list[str]) -> list[str]:
            data_dir = str(self.workdir / node_id)
            return ["--data-dir", data_dir, "--parallel", str(self.parallel), "--node-id", node_id, *extra]

        if self.layout == "up":
            args = [*common, *registry_args, *node_args(NODE_ID, self.node_args), *gateway_args]
            gateway = stack.start_bench("up", *args)
        else:
            stack.start_bench("registry", *common, *registry_args)
            for node_id, extra in self._nodes:
                name = node_id if len(self._nodes) > 1 else "node"  # "node" is what the report's columns name
                stack.start_bench("node", *common, *node_args(node_id, [*self.node_args, *extra]), name=name)
            gateway = stack.start_bench("gateway", *common, *gateway_args)
            if self.keyed_gateway:
                keys = ["--auth", "--data-dir", str(self.workdir / "keys")]
                keyed = stack.start_bench("gateway", *common, *gateway_args, *keys, name=KEYED)
                self.keyed_port, self.api_key = int(keyed.info["port"]), keyed.info["api_key"]
        self.port = int(gateway.info["port"])

    def start(self) -> None:
        self.launch()
        asyncio.run(self.wait_until_served())

    async def wait_until_served(self, timeout: float = 60.0) -> None:
        """Until the gateway lists every node as serving the model."""
        wanted = set(self.node_ids)
        deadline = time.monotonic() + timeout
        last = b""
        while time.monotonic() < deadline:
            try:
                conn = await connect(self.port)
                try:
                    request = http_request("GET", f"/v0/models/{MODEL}", self.port)
                    status, last = await asyncio.wait_for(conn.request(request), 5)
                finally:
                    conn.close()
                if status == 200 and wanted <= set(json.loads(last).get("nodes") or []):
                    return
            except (TimeoutError, OSError, ValueError):
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(
            f"the gateway did not see all of {sorted(wanted)} serving {MODEL!r} within {timeout}s; "
            f"last /v0/models/{MODEL}: {last[:500]!r}"
        )

    async def history_count(self, expected: int, timeout: float = 15.0) -> int:
        """Records in the HISTORY stream, once the gateway's background writer caught up."""
        import nats

        from events import storage

        nc = await nats.connect(self.nats.url, name="bench")
        try:
            js = nc.jetstream()
            deadline, count, last_change = time.monotonic() + timeout, -1, time.monotonic()
            while time.monotonic() < deadline:
                now = (await js.stream_info(storage.HISTORY)).state.messages
                if now != count:
                    count, last_change = now, time.monotonic()
                if count >= expected or time.monotonic() - last_change > 2.0:
                    break
                await asyncio.sleep(0.1)
            return count
        finally:
            await nc.close()

    def pids(self, keyed: bool = False) -> dict[str, int]:
        """Processes to measure, by name; ``keyed``: the keyed gateway as "gateway" (the plain
        one left out), else the plain gateway (the keyed one, idle then, left out)."""
        out = {proc.name: proc.pid for proc in self.processes.processes} if self.processes else {}
        keyed_pid = out.pop(KEYED, None)
        if keyed and keyed_pid is not None:
            out["gateway"] = keyed_pid
        if self.nats is not None and self.nats._proc is not None:
            out["nats-server"] = self.nats._proc.pid
        out["load generator"] = os.getpid()
        return out

    def stop(self) -> None:
        if self.processes is not None:
            self.processes.stop()
        if self.nats is not None:
            self.nats.stop_sync()


# ---------------------------------------------------------------------------- report


def _ms(value: float) -> str:
    return f"{value:.4f}" if value < 0.01 else f"{value:.3f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(
    results: list[Result],
    args: argparse.Namespace,
    command: str,
    started: float,
    sent: dict[str, int],
    stored: dict[str, int],
) -> str:
    by = {(r.setup, r.concurrency): r for r in results}
    lines = [
        *report_header(started, command),
        "| setup | concurrency | requests | errors | p50 (ms) | p99 (ms) | requests/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.setup} | {r.concurrency} | {r.requests:,} | {r.errors} | {_ms(r.percentile_ms(50))} "
            f"| {_ms(r.percentile_ms(99))} | {r.rps:,.0f} |"
        )
    lines.append("")
    base1 = by.get(("in-process", 1))
    summary = []
    for layout in args.layouts:
        setup = f"stack ({layout})"
        s1, s64 = by.get((setup, 1)), by.get((setup, 64))
        if base1 and s1:
            added = s1.percentile_ms(50) - base1.percentile_ms(50)
            summary.append(
                f"- {setup}: added p50 latency at concurrency 1 = {added:.3f} ms "
                f"(target <= {TARGET_ADDED_P50_MS:g} ms: {_verdict(added <= TARGET_ADDED_P50_MS)})"
            )
        if s64:
            summary.append(
                f"- {setup}: {s64.rps:,.0f} requests/s at concurrency 64 "
                f"(target >= {TARGET_RPS_AT_64:,.0f}: {_verdict(s64.rps >= TARGET_RPS_AT_64)})"
            )
    plain1, keyed1 = by.get(("stack (split)", 1)), by.get(("stack (split, keys)", 1))
    plain64, keyed64 = by.get(("stack (split)", 64)), by.get(("stack (split, keys)", 64))
    if plain1 and keyed1:
        added_us = 1000 * (keyed1.percentile_ms(50) - plain1.percentile_ms(50))
        summary.append(
            f"- API keys on (split, keys vs split): {added_us:+.0f} µs of p50 latency at concurrency 1 "
            f"(target <= {TARGET_AUTH_ADDED_US:g} µs: {_verdict(added_us <= TARGET_AUTH_ADDED_US)})"
        )
    if plain64 and keyed64 and plain64.rps > 0:
        loss = 1 - keyed64.rps / plain64.rps
        summary.append(
            f"- API keys on (split, keys vs split): {100 * loss:+.1f}% throughput lost at concurrency 64 "
            f"(target <= {100 * TARGET_AUTH_RPS_LOSS:g}%: {_verdict(loss <= TARGET_AUTH_RPS_LOSS)})"
        )
    for layout in args.layouts:
        if layout in stored:
            summary.append(
                f"- stack ({layout}): {stored[layout]:,} records in the HISTORY stream after the run, for "
                f"{sent[layout]:,} answers the client received (warm-up included)"
            )
    lines += summary
    cpu_rows = [r for r in results if r.cpu]
    if cpu_rows:
        names = sorted({name for r in cpu_rows for name in r.cpu}, key=_process_order)
        lines += [
            "",
            "CPU use during each measured window, in % of one core (the machine has "
            f"{os.cpu_count()} cores = {100 * (os.cpu_count() or 1)}%), and in parentheses the CPU time "
            "per answered request:",
            "",
            "| setup | concurrency | " + " | ".join(names) + " | machine total |",
            "|---|---:|" + "---:|" * (len(names) + 1),
        ]
        for r in cpu_rows:
            cells = [_cpu_cell(r, n) for n in names]
            lines.append(f"| {r.setup} | {r.concurrency} | " + " | ".join(cells) + f" | {sum(r.cpu.values()):.0f} |")
        lines += [
            "",
            f"`{OTHER}`: CPU the machine spent outside the benchmark's processes during the window "
            "(another job on a shared machine skews every number above).",
        ]
    return "\n".join(lines) + "\n"


def _cpu_cell(r: Result, name: str) -> str:
    if name not in r.cpu:
        return "-"
    if name == OTHER or r.rps <= 0:
        return f"{r.cpu[name]:.0f}"
    return f"{r.cpu[name]:.0f} ({per_request_us(r, name):.0f} µs)"


def per_request_us(r: Result, name: str) -> float:
    return r.cpu[name] / 100 / r.rps * 1e6 if r.rps > 0 else float("nan")


def _process_order(name: str) -> tuple[int, str]:
    order = ["gateway", "node", "registry", "up", "nats-server", "load generator", OTHER]
    return (order.index(name) if name in order else len(order), name)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, {loop}"


def machine_busy(seconds: float = 1.0) -> float:
    """CPU used by the whole machine over ``seconds``, in % of one core."""
    before = _cpu_times({})[SYSTEM]
    time.sleep(seconds)
    return 100 * (_cpu_times({})[SYSTEM] - before) / seconds


def quiet_logs_and_check_machine() -> None:
    """Warnings-only logs for the components, and a warning when the machine is already busy."""
    from llm_router import logs

    logs.configure("warning", "json")
    logging.getLogger().setLevel(logging.WARNING)
    busy = machine_busy()
    if busy > 20:
        print(
            f"warning: the machine is already busy ({busy:.0f}% of one core used by other processes); "
            "the numbers will be noisier than on an idle machine",
            file=sys.stderr,
            flush=True,
        )


def report_header(started: float, command: str) -> list[str]:
    """The lines every results section starts with: when, on what machine, the exact command."""
    return [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} on {machine()}.",
        "",
        "```",
        command,
        "```",
        "",
    ]


def output_options(parser: argparse.ArgumentParser) -> None:
    """``--output`` and ``--keep``, as every benchmark that runs a stack takes them."""
    parser.add_argument("--output", type=Path, default=None, help="also write the results into this Markdown file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, NATS data) for inspection")


def bench_options(description: str, helps: dict[str, str] | None = None, **defaults: float) -> argparse.Namespace:
    """The command line of a benchmark that takes a few numbers: ``--NAME`` for each of ``defaults``
    (``size_mb=200``: ``--size-mb``, an int as its default is; ``helps`` says what some mean), and
    ``--output``, the Markdown file its results section also goes into."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        help_line = (helps or {}).get(name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=help_line)
    parser.add_argument("--output", type=Path, default=None, help="also write the results into this Markdown file")
    return parser.parse_args()


def publish(text: str, output: Path | None, begin: str = BEGIN, end: str = END) -> int:
    """Print a results section, and write it between its markers in ``output`` when given."""
    print(text)
    if output is not None:
        write_section(output, text, begin, end)
        print(f"written to {output}", file=sys.stderr)
    return 0


def write_section(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path`` (append it when absent)."""
    section = f"{begin}\n{text}{end}\n"
    if path.exists():
        current = path.read_text()
        if begin in current and end in current:
            before = current.split(begin, 1)[0]
            after = current.split(end, 1)[1].lstrip("\n")
            path.write_text(before + section + ("\n" + after if after else ""))
            return
        path.write_text(current.rstrip("\n") + "\n\n" + section)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Benchmarks\n\n" + section)


# ---------------------------------------------------------------------------- main


def _event_loop_run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~20 s: layout split only, 1 s warm-up + 3 s per level")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated levels [%(default)s]")
    parser.add_argument("--layouts", default=None, help="split and/or up, comma-separated [split,up; --quick: split]")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per level [2; --quick: 1]")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per level [10; --quick: 3]")
    parser.add_argument("--parallel", type=int, default=64, help="node slots for the model [%(default)s]")
    parser.add_argument(
        "--client",
        choices=["python", "wrk"],
        default="python",
        help="load generator for the stack: the built-in asyncio client or wrk [%(default)s]",
    )
    parser.add_argument(
        "--keys",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="split layout: a second gateway with API keys on, measured after the plain one at each level [on]",
    )
    parser.add_argument(
        "--nats-direct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure the node alone over NATS, without gateway and HTTP, in the split layout [on; --quick: off]",
    )
    output_options(parser)
    args = parser.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.layouts = [
        s.strip() for s in (args.layouts or ("split" if args.quick else "split,up")).split(",") if s.strip()
    ]
    if any(layout not in ("split", "up") for layout in args.layouts):
        parser.error("--layouts takes split and/or up")
    if args.nats_direct is None:
        args.nats_direct = not args.quick
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    in_process_duration = min(duration, 1.0 if args.quick else 2.0)
    command = "python bench/overhead.py " + " ".join(sys.argv[1:])
    started = time.time()

    quiet_logs_and_check_machine()

    results: list[Result] = []
    sent: dict[str, int] = {}
    stored: dict[str, int] = {}
    for c in args.levels:
        r = _event_loop_run(run_in_process(c, min(warmup, 0.5), in_process_duration))
        results.append(r)
        print(
            f"in-process      c={c:<3} p50={r.percentile_ms(50):.4f} ms  p99={r.percentile_ms(99):.4f} ms  {r.rps:,.0f} req/s",
            file=sys.stderr,
            flush=True,
        )

    for layout in args.layouts:
        workdir = Path(tempfile.mkdtemp(prefix=f"llm-router-bench-{layout}-"))
        stack = Stack(layout, workdir, args.parallel, keyed_gateway=args.keys and layout == "split")
        try:
            t0 = time.monotonic()
            stack.start()
            print(
                f"stack ({layout}) up in {time.monotonic() - t0:.1f} s on port {stack.port}",
                file=sys.stderr,
                flush=True,
            )
            # With --keys, each level is measured on the plain gateway, then on the keyed one
            # (same NATS, node and moment): the difference is what API keys cost.
            runs = [(f"stack ({layout})", stack.port, None, stack.pids(keyed=False))]
            if stack.keyed_port:
                runs.append((f"stack ({layout}, keys)", stack.keyed_port, stack.api_key, stack.pids(keyed=True)))
            for c, (setup, port, key, pids) in ((c, run) for c in args.levels for run in runs):
                if args.client == "wrk":
                    r = run_wrk(port, c, warmup, duration, pids, workdir)
                else:
                    r = _event_loop_run(run_http(port, c, warmup, duration, pids, key))
                r.setup = setup
                results.append(r)
                sent[layout] = sent.get(layout, 0) + r.sent
                print(
                    f"{setup:<20} c={c:<3} p50={r.percentile_ms(50):.3f} ms  p99={r.percentile_ms(99):.3f} ms  "
                    f"{r.rps:,.0f} req/s  errors={r.errors}  cpu%="
                    + ", ".join(f"{k}:{v:.0f}" for k, v in sorted(r.cpu.items(), key=lambda kv: _process_order(kv[0]))),
                    file=sys.stderr,
                    flush=True,
                )
            stored[layout] = _event_loop_run(stack.history_count(sent[layout]))
            if args.nats_direct and layout == "split":
                for c in args.levels:
                    pids = {k: v for k, v in stack.pids(keyed=False).items() if k != "gateway"}
                    r = _event_loop_run(run_nats_direct(stack.nats.url, NODE_ID, c, warmup, duration, pids))
                    r.setup = "NATS -> node (split)"
                    results.append(r)
                    print(
                        f"NATS -> node    c={c:<3} p50={r.percentile_ms(50):.3f} ms  p99={r.percentile_ms(99):.3f} ms  "
                        f"{r.rps:,.0f} req/s  errors={r.errors}",
                        file=sys.stderr,
                        flush=True,
                    )
            print(
                f"stack ({layout}) history records stored: {stored[layout]:,} of {sent[layout]:,} requests",
                file=sys.stderr,
                flush=True,
            )
        finally:
            stack.stop()
            if args.keep:
                print(f"work dir kept: {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)

    text = render(results, args, command.strip(), started, sent, stored)
    publish(text, args.output)
    failed = any(r.errors for r in results) or any(r.requests == 0 for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
