"""What shipping log records costs: per log line on the caller's path, and CPU per line in all.

    python bench/log_shipping.py                       # ~30 s
    python bench/log_shipping.py --output docs/benchmarks.md

Two structlog set-ups log the same line (``log.info("request done", model=..., node_id=...,
duration_ms=...)``, as an access log would, once per request) to a console that discards it:

- ``off``: the set-up before log shipping (context, level, ISO time, JSON renderer);
- ``on``: ``llm_router.logs.configure`` as ``llm-router gateway`` runs it: the same, plus every
  record to the LOGS stream (the shipper attached to a real connection to an embedded
  nats-server) and to a daily JSON-lines file in a temporary directory.

Measured, in rounds that alternate the two: the caller's time per line (``time.perf_counter``
around the ``log.info`` calls alone), and the process's CPU per line in all (``process_time``
from the first line until the shipper and the file writer have drained everything: the
background task and the writer thread included; nats-server's own CPU is not in it). Also the
cost of the request id a node binds for the duration of each request. Results go between
``<!-- log-shipping:begin -->`` and ``<!-- log-shipping:end -->`` of ``--output``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import structlog  # noqa: E402
from overhead import _event_loop_run, bench_options, publish, report_header  # noqa: E402

from broker import EmbeddedNats, connect, provision  # noqa: E402
from broker.logship import REQUEST_ID, SHIPPER  # noqa: E402
from llm_router import logs  # noqa: E402

BEGIN, END = "<!-- log-shipping:begin -->", "<!-- log-shipping:end -->"
BATCH = 500  # lines between two yields to the event loop, as requests would interleave


def configure_off(sink) -> None:
    """structlog as ``llm_router.logs.configure`` set it up before log shipping, JSON to ``sink``."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sink),
        cache_logger_on_first_use=False,
    )


async def one_round(lines: int) -> tuple[float, float]:
    """(caller µs per line, process CPU µs per line) of the current set-up."""
    log = structlog.get_logger("gateway")
    caller = 0.0
    cpu0 = time.process_time()
    for start in range(0, lines, BATCH):
        t = time.perf_counter()
        for i in range(start, start + BATCH):
            log.info("request done", model="org/model:Q4_K_M", node_id="node-1", duration_ms=12.5, status=200, i=i)
        caller += time.perf_counter() - t
        await asyncio.sleep(0)
    files = logs.files()
    while SHIPPER.stats["pending"] or (files is not None and files._pending):
        await asyncio.sleep(0.001)
    return caller / lines * 1e6, (time.process_time() - cpu0) / lines * 1e6


async def binding(count: int) -> float:
    """µs per request id set and reset around a request (nodes/agent.py)."""
    ids = [str(i) for i in range(count)]
    t = time.perf_counter()
    for request_id in ids:
        token = REQUEST_ID.set(request_id)
        REQUEST_ID.reset(token)
    return (time.perf_counter() - t) / count * 1e6


async def run(args: argparse.Namespace) -> str:
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    server = EmbeddedNats(work / "nats", port=0)
    url = await server.start()
    nc = await connect(url, name="gateway")
    await provision(nc.jetstream())
    sink = open(os.devnull, "w")  # noqa: SIM115 - the console that discards every line
    real_stderr, sys.stderr = sys.stderr, sink
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    try:
        SHIPPER.attach(nc, "gateway")
        for _ in range(args.rounds):
            configure_off(sink)
            results["off"].append(await one_round(args.lines))
            logs.configure("info", "json", component="gateway", directory=work / "logs", cache=False)
            results["on"].append(await one_round(args.lines))
        bound = await binding(args.lines)
        shipped, dropped = SHIPPER.stats["shipped"], SHIPPER.stats["dropped"]
    finally:
        sys.stderr = real_stderr
        files = logs.files()
        if files is not None:
            files.stop()
        await SHIPPER.detach(nc)
        await nc.close()
        await server.stop()
        structlog.reset_defaults()
    off_caller, off_cpu = (statistics.median(v) for v in zip(*results["off"]))
    on_caller, on_cpu = (statistics.median(v) for v in zip(*results["on"]))
    lines = report_header(started, f"python bench/log_shipping.py --lines {args.lines} --rounds {args.rounds}")
    lines += [
        f"{args.lines:,} lines a round, {args.rounds} rounds alternating; medians. One line is one access-log-style "
        "record (5 key-values); the gateway itself logs nothing per successful request, so this is the cost a "
        "request pays for each line it logs.",
        "",
        "| set-up | caller (µs / line) | CPU in all (µs / line) |",
        "| --- | --- | --- |",
        f"| off: console only (before) | {off_caller:.2f} | {off_cpu:.2f} |",
        f"| on: console + LOGS stream + daily file | {on_caller:.2f} | {on_cpu:.2f} |",
        f"| difference | {on_caller - off_caller:+.2f} | {on_cpu - off_cpu:+.2f} |",
        "",
        f"Shipped {shipped:,} records, dropped {dropped:,}. A node binds the request id for each request it "
        f"serves (its log lines carry it): {bound:.2f} µs a request.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    helps = {"lines": "a round; under the shipper's buffer (10,000)"}
    args = bench_options(__doc__.split("\n")[0], helps, lines=5_000, rounds=10)
    return publish(_event_loop_run(run(args)), args.output, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
