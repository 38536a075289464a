"""What the gateway adds to a cloud or upstream call, over calling the provider directly.

    python bench/clouds.py                              # ~1 min on 2 cores
    python bench/clouds.py --rounds 3000 --output docs/benchmarks.md

One fake OpenAI provider (``tests/fake_providers.py``, its own process, uvicorn + Starlette:
the real protocol, answers in well under a millisecond) is asked three ways, each streamed and
not, with the same chat body:

- ``direct``: straight to the fake (``POST /v1/chat/completions``, model ``gpt-4o-mini``);
- ``cloud``: through ``llm-router gateway`` with ``OPENAI_BASE_URL`` pointing at the fake
  (model ``openai:gpt-4o-mini``): HTTP in, the provider module, one pooled httpx connection
  out, the history record and the usage counters;
- ``upstream``: through the same gateway to ``llm-router node --upstream FAKE`` (model
  ``gpt-4o-mini``, announced by the node): HTTP in, dispatch over NATS, the node's upstream
  engine, httpx out, the replies back over NATS.

Each is its own process on one embedded nats-server; the client is this process, one
keep-alive connection per path, one request at a time (concurrency 1: the target is about
latency, not throughput). Rounds alternate the six (path, stream) kinds so all see the same
machine state; latencies are to the last byte of the answer (``[DONE]`` for a stream). The
target (issue 17): each path adds at most 1 ms at the median over ``direct``. ``--output FILE``
writes the section between ``<!-- clouds:begin -->`` and ``<!-- clouds:end -->``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

from overhead import machine_busy, publish, quiet_logs_and_check_machine, report_header  # noqa: E402

from llm_router.processes import Process, cli  # noqa: E402

BEGIN, END = "<!-- clouds:begin -->", "<!-- clouds:end -->"
KEY = "sk-fake-openai-0123456789"  # tests/fake_providers.py KEYS["openai"]
TARGET_MS = 1.0
PATHS = ("direct", "cloud", "upstream")


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: a request, then its whole answer (Content-Length or chunked)."""

    def __init__(self) -> None:
        self.transport = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        if b"transfer-encoding: chunked" in head:
            last = buf.find(b"\r\n0\r\n\r\n", end)
            if last < 0:
                return
            total = last + 7
            body = _dechunk(bytes(buf[end + 4 : total]))
        else:
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
        status = int(buf[9:12])
        del buf[:total]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((status, body))

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("closed"))

    async def ask(self, data: bytes) -> tuple[int, bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await asyncio.wait_for(self.waiter, 30)


def _dechunk(raw: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        eol = raw.find(b"\r\n", pos)
        size = int(raw[pos:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += raw[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


def request(port: int, path: str, body: dict, key: str | None) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "")
    return (head + "\r\n").encode() + data


def body_of(model: str, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "stream": stream}


def answered(status: int, body: bytes, stream: bool) -> bool:
    return status == 200 and b"hello" in body and (not stream or body.rstrip().endswith(b"data: [DONE]"))


async def measure(ports: dict[str, int], rounds: int, warmup: int) -> dict[tuple[str, bool], list[float]]:
    loop = asyncio.get_running_loop()
    conns = {}
    for name in PATHS:
        _, conns[name] = await loop.create_connection(Connection, "127.0.0.1", ports[name])
    requests = {
        ("direct", s): request(ports["direct"], "/v1/chat/completions", body_of("gpt-4o-mini", s), KEY)
        for s in (False, True)
    }
    requests |= {
        ("cloud", s): request(ports["cloud"], "/v1/chat/completions", body_of("openai:gpt-4o-mini", s), None)
        for s in (False, True)
    }
    requests |= {
        ("upstream", s): request(ports["upstream"], "/v1/chat/completions", body_of("gpt-4o-mini", s), None)
        for s in (False, True)
    }
    samples: dict[tuple[str, bool], list[float]] = {kind: [] for kind in requests}
    clock = time.perf_counter_ns
    for round_ in range(warmup + rounds):
        for kind, data in requests.items():
            t0 = clock()
            status, body = await conns[kind[0]].ask(data)
            took = (clock() - t0) / 1e6
            if not answered(status, body, kind[1]):
                raise RuntimeError(f"{kind}: bad answer {status} {body[:200]!r}")
            if round_ >= warmup:
                samples[kind].append(took)
    for conn in conns.values():
        conn.transport.close()
    return samples


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def render(samples: dict[tuple[str, bool], list[float]], started: float, command: str, busy: float) -> str:
    lines = report_header(started, command)
    lines += [f"Other processes used {busy:.0f}% of a core just before the run (the machine is shared).", ""]
    lines += [
        "| path | stream | requests | p50 (ms) | p90 (ms) | p99 (ms) | added at p50 (ms) | target <= 1 ms |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    verdicts = []
    for stream in (False, True):
        base = statistics.median(samples[("direct", stream)])
        for name in PATHS:
            values = samples[(name, stream)]
            p50 = statistics.median(values)
            added = p50 - base
            verdict = "" if name == "direct" else ("met" if added <= TARGET_MS else "**missed**")
            if name != "direct":
                verdicts.append(added <= TARGET_MS)
            lines.append(
                f"| {name} | {'yes' if stream else 'no'} | {len(values):,} | {p50:.3f} | {percentile(values, 90):.3f} "
                f"| {percentile(values, 99):.3f} | {'' if name == 'direct' else f'{added:+.3f}'} | {verdict} |"
            )
    lines += ["", f"All four paths within the target: {'yes' if all(verdicts) else 'no'}.", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1500, help="measured rounds of the six kinds [%(default)s]")
    parser.add_argument("--warmup", type=int, default=200, help="rounds before measuring [%(default)s]")
    parser.add_argument("--output", type=Path, default=None, help="also write the results into this Markdown file")
    args = parser.parse_args()
    quiet_logs_and_check_machine()
    busy = machine_busy()
    started = time.time()
    command = "python bench/clouds.py" + "".join(
        f" --{k} {v}" for k, v in (("rounds", args.rounds), ("warmup", args.warmup)) if v != parser.get_default(k)
    )
    if args.output is not None:
        command += f" --output {args.output}"

    from broker import EmbeddedNats

    with tempfile.TemporaryDirectory(prefix="bench-clouds-") as tmp:
        work = Path(tmp)
        nats = EmbeddedNats(work / "nats", port=0)
        url = nats.start_sync()
        procs: list[Process] = []
        try:
            fake = Process([sys.executable, str(ROOT / "tests" / "fake_providers.py"), "openai"], name="fake-openai")
            procs.append(fake)
            fake_url = fake.wait_for(r"^ready (http://\S+)$", 30).group(1)
            env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": fake_url + "/v1", "LLM_ROUTER_LOG_LEVEL": "warning"}
            gateway = Process(cli("gateway", "--nats-url", url, "--no-auth", "--port", "0"), name="gateway", env=env)
            procs.append(gateway)
            gateway_url = gateway.wait_for(r"gateway ready: (http://\S+)/v1", 60).group(1)
            node_args = ["node", "--nats-url", url, "--data-dir", str(work / "node"), "--parallel", "8"]
            node_args += ["--upstream", fake_url, "--upstream-key", KEY]
            node = Process(cli(*node_args), name="node", env={"LLM_ROUTER_LOG_LEVEL": "warning"})
            procs.append(node)
            node.wait_for(r"node (\S+) ready", 60)
            port = int(gateway_url.rsplit(":", 1)[1])
            ports = {"direct": int(fake_url.rsplit(":", 1)[1]), "cloud": port, "upstream": port}
            time.sleep(1.0)  # the node's first heartbeat and the cloud model list reach the gateway
            samples = asyncio.run(measure(ports, args.rounds, args.warmup))
        finally:
            for proc in reversed(procs):
                if proc.running:
                    proc.stop()
            nats.stop_sync()
    return publish(render(samples, started, command, busy), args.output, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
