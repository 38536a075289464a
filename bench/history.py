"""Latency of history pages with 100,000 records in the HISTORY stream.

    python bench/history.py                          # ~2 minutes on 2 cores
    python bench/history.py --records 20000 --repeat 10
    python bench/history.py --output docs/benchmarks.md

An embedded nats-server and a gateway (in this process, its app called through
httpx.ASGITransport, so the figure is the route's own: parameters, JetStream requests,
decoding, JSON) on a fresh store. The records are written by the gateway's own HistoryWriter
(subjects, id index), as requests would write them: 10 models, 5 nodes, 20 keys, 2% 5xx,
bodies of a few hundred bytes. Then each query below is timed ``--repeat`` times, a page
(``per_page=50``) at a time; the table has the median and the slowest. Results go between
``<!-- history:begin -->`` and ``<!-- history:end -->`` of ``--output``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import httpx  # noqa: E402
import msgspec  # noqa: E402
from overhead import _event_loop_run, bench_options, publish, quiet_logs_and_check_machine, report_header  # noqa: E402

from broker import EmbeddedNats  # noqa: E402
from events.messages import HistoryRecord, Usage  # noqa: E402
from gateway import Gateway  # noqa: E402

BEGIN, END = "<!-- history:begin -->", "<!-- history:end -->"
TARGET_MS = 100.0
MODELS = [f"org/model-{i}:Q4_K_M" for i in range(10)]
NODES = [f"node-{i}" for i in range(5)]
KEYS = [f"key_{i:012x}" for i in range(20)]


def record(i: int, t0: float) -> HistoryRecord:
    status = 503 if i % 50 == 7 else 429 if i % 50 == 19 else 200
    word = " zebra" if i % 100 == 3 else ""
    body = {
        "model": MODELS[i % 10],
        "messages": [{"role": "user", "content": f"request {i}: " + "lorem ipsum " * 20 + word}],
    }
    return HistoryRecord(
        id=f"chatcmpl-{i:09d}",
        capability="embedding" if i % 10 == 9 else "chat",
        endpoint="/v1/chat/completions",
        model=MODELS[i % 10],
        status_code=status,
        started_at=t0 + i / 100,
        duration_ms=20.0 + i % 300,
        node_id=NODES[i % 5] if status != 503 else None,
        key_id=KEYS[i % 20],
        usage=Usage(30, 40, 70),
        request=msgspec.Raw(msgspec.json.encode(body)),
        response={"choices": [{"message": {"role": "assistant", "content": "dolor sit amet " * 10}}]},
    )


async def fill(gateway: Gateway, count: int) -> tuple[float, list[float]]:
    """Write ``count`` records in ten slices; the times between slices (for time ranges)."""
    t0, marks = time.time(), []
    started = time.perf_counter()
    for part in range(10):
        marks.append(time.time())
        for i in range(part * count // 10, (part + 1) * count // 10):
            gateway.history.append(record(i, t0))
            if i % 2000 == 0:
                await asyncio.sleep(0)  # let the writer run: its backlog stays bounded
        await gateway.history.flush(timeout=120)
    marks.append(time.time())
    return time.perf_counter() - started, marks


async def timed(client: httpx.AsyncClient, path: str, params: dict, repeat: int) -> tuple[list[float], dict]:
    times, body = [], {}
    for _ in range(repeat):
        started = time.perf_counter()
        answer = await client.get(path, params=params)
        times.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200, answer.text
        body = answer.json() if answer.headers["content-type"] == "application/json" else {"bytes": len(answer.content)}
    return times, body


async def run(args: argparse.Namespace) -> str:
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-history-"))
    server = EmbeddedNats(work / "nats", port=0)
    url = await server.start()
    gateway = Gateway(nats_url=url, auth=False)
    await gateway.start(serve_http=False)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw", timeout=120)
    try:
        took, marks = await fill(gateway, args.records)
        first = (await client.get("/v0/history")).json()
        cursor = first["next_cursor"]
        for _ in range(8):  # the cursor of page 10
            cursor = (await client.get("/v0/history", params={"cursor": cursor})).json()["next_cursor"]
        some_id = record(args.records // 2, 0).id
        queries = [
            ("first page, no filter", "/v0/history", {}),
            ("page 10 (a cursor), no filter", "/v0/history", {"cursor": cursor}),
            ("one model (10%)", "/v0/history", {"model": MODELS[3]}),
            ("status=5xx (2%)", "/v0/history", {"status": "5xx"}),
            ("one model and one key (5%)", "/v0/history", {"model": MODELS[3], "key_id": KEYS[3]}),
            ("node=- (no node: the 503s)", "/v0/history", {"node": "-"}),
            ("a time range (the middle tenth)", "/v0/history", {"since": str(marks[5]), "until": str(marks[6])}),
            (
                "model + status=2xx + a time range",
                "/v0/history",
                {"model": MODELS[1], "status": "2xx", "since": str(marks[2])},
            ),
            ("free text q= (1%, reads up to 20,000)", "/v0/history", {"q": "zebra"}),
            ("one record by id", f"/v0/history/{some_id}", {}),
            ("export of status=5xx as CSV", "/v0/history/export", {"status": "5xx", "format": "csv"}),
        ]
        rows = []
        for label, path, params in queries:
            times, body = await timed(client, path, params, args.repeat)
            total = (
                body.get("total", "-") if "total" in body else ("1" if "request" in body else body.get("bytes", "-"))
            )
            rows.append((label, statistics.median(times), max(times), total))
    finally:
        await client.aclose()
        await gateway.stop()
        await server.stop()
    slowest_page = max(p50 for label, p50, _, _ in rows if "export" not in label)
    lines = report_header(started, f"python bench/history.py --records {args.records} --repeat {args.repeat}")
    lines += [
        f"{args.records:,} records written through the gateway's HistoryWriter in {took:.1f} s "
        f"({args.records / took:,.0f}/s, acknowledged, with their id index); then each query "
        f"{args.repeat} times, `per_page=50`, the route called in-process (httpx.ASGITransport).",
        "",
        "| query | p50 (ms) | max (ms) | total / size |",
        "| --- | --- | --- | --- |",
        *(f"| {label} | {p50:.1f} | {worst:.1f} | {total} |" for label, p50, worst, total in rows),
        "",
        f"Target: a page well under {TARGET_MS:.0f} ms with 100,000 records: "
        f"{'met' if slowest_page < TARGET_MS else '**missed**'} (slowest median page {slowest_page:.1f} ms).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = bench_options(__doc__.split("\n")[0], records=100_000, repeat=20)
    quiet_logs_and_check_machine()
    return publish(_event_loop_run(run(args)), args.output, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
