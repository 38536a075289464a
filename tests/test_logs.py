"""Logs of every component: structlog records to the LOGS stream and to daily files, ``GET
/v0/logs`` and ``llm-router logs``.

The registry, gateway and node run in this test's event loop (tests/inprocess.py), with this
process's structlog configured as ``llm-router`` configures it (``llm_router.logs.configure``):
their records go through the real shipper to the session's nats-server and through the real
file writer to a temporary log dir. A node started as its own process writes its own files.
Rotation is tested on the file writer with records of made-up days (the records' own times
decide their file). The outage test stops and restarts a nats-server of its own.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import structlog
from inprocess import running

from broker import EmbeddedNats, connect, provision
from broker.logship import REQUEST_ID, LogShipper
from broker.windows import Windows
from events import storage, subjects
from gateway import Gateway
from llm_router import logs
from llm_router.log_files import DailyFiles, day_of

RUN = uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("log-files")
    logs.configure("info", "json", component="up", directory=directory, cache=False)
    yield directory
    files = logs.files()
    if files is not None:
        files.stop()
    structlog.reset_defaults()


@pytest.fixture(scope="module")
async def stack(nats_url, tmp_path_factory, log_dir):
    async with running(nats_url, tmp_path_factory.mktemp("logs")) as stack:
        yield stack


async def _logs(stack, key: str | None = None, **params) -> dict:
    answer = await stack.client.get("/v0/logs", params=params, headers=stack.bearer(key))
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _eventually(stack, count: int, timeout: float = 10.0, **params) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = (await _logs(stack, **params))["data"]
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"{count} records for {params} never came: {rows}"
        await asyncio.sleep(0.1)


def _file_lines(directory: Path, stem: str = "up") -> list[dict]:
    files = logs.files()
    if files is not None:
        files.flush()
    lines = []
    for path in sorted(directory.glob(f"{stem}.jsonl.*")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


async def test_a_nodes_records_reach_the_api_and_the_files(stack, log_dir) -> None:
    s, node = stack, stack.node.node_id
    for verb in ("drain", "resume"):
        answer = await s.client.post(f"/v0/nodes/{node}/{verb}", headers=s.bearer())
        assert answer.status_code == 200, answer.text
    rows = await _eventually(s, 2, node=node, q="node command")
    assert [r["fields"]["command"] for r in rows[:2]] == ["resume", "drain"]  # newest first
    row = rows[0]
    assert row["object"] == "log_record" and row["component"] == "node" and row["instance"] == node
    assert row["node_id"] == node and row["level"] == "info" and row["logger"] == "node" and row["seq"] > rows[1]["seq"]
    assert row["ts"] <= time.time()

    # The same records in the file of the day, as JSON lines.
    written = [line for line in _file_lines(log_dir) if line["event"] == "node command" and line["node_id"] == node]
    assert [line["fields"]["command"] for line in written][-2:] == ["drain", "resume"]
    assert {line["component"] for line in written} == {"node"}
    assert (log_dir / f"up.jsonl.{day_of(time.time())}").exists()

    # Every component of this process: the registry and the gateway by their loggers' names.
    started = await _eventually(s, 1, component="registry", q="registry started")
    assert started[0]["component"] == "registry" and started[0]["fields"]["catalog"] >= 0


async def test_filters_levels_text_regex_time_and_paging(stack) -> None:
    s = stack
    since = time.time()
    marker = f"probe-{uuid.uuid4().hex[:8]}"
    gw, other = structlog.get_logger("gateway.probe"), structlog.get_logger("broker.probe")
    for i in range(30):
        gw.info(f"{marker} info", i=i)
    gw.warning(f"{marker} warn", i=30)
    gw.error(f"{marker} error", i=31)
    with structlog.contextvars.bound_contextvars(request_id=f"req-{marker}"):
        other.info(f"{marker} in a request")
    serving = REQUEST_ID.set(f"node-req-{marker}")  # as a node sets it around each request it serves
    try:
        structlog.get_logger("node").info(f"{marker} serving")
    finally:
        REQUEST_ID.reset(serving)
    rows = await _eventually(s, 34, q=marker, since=str(since))
    # Newest first. Records of one component keep their order; those of different components go
    # out on each component's own connection, so they may reach the stream in any order.
    by_event = {r["event"]: r for r in rows}
    served, in_request, error = (by_event[f"{marker} {e}"] for e in ("serving", "in a request", "error"))
    assert [r["seq"] for r in rows] == sorted((r["seq"] for r in rows), reverse=True)
    assert served["request_id"] == f"node-req-{marker}" and served["component"] == "node"
    assert served["node_id"] == s.node.node_id and served["instance"] == s.node.node_id
    assert in_request["request_id"] == f"req-{marker}" and in_request["component"] == "up"  # not one component's logger
    assert error["component"] == "gateway" and error["level"] == "error"
    gateway_rows = [r["event"] for r in rows if r["component"] == "gateway"]
    assert gateway_rows[:2] == [f"{marker} error", f"{marker} warn"]
    until = time.time()

    errors = (await _logs(s, q=marker, level="warning"))["data"]
    assert [r["level"] for r in errors] == ["error", "warning"]
    assert [r["event"] for r in (await _logs(s, q=marker, component="gateway", level="error"))["data"]] == [
        f"{marker} error"
    ]
    assert (await _logs(s, q=marker, component="registry"))["data"] == []
    found = (await _logs(s, regex=rf"{marker} (warn|error)|i=2[0-9]\b", since=str(since)))["data"]
    assert sorted(r["fields"]["i"] for r in found) == [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]
    assert len((await _logs(s, q=marker.upper(), since=str(since)))["data"]) == 34  # ASCII case-insensitive

    # Pages of 10, newest first, then forward from a seq.
    pages, before = [], None
    while True:
        page = await _logs(
            s, q=marker, limit=10, since=str(since), until=str(until), **({"before": before} if before else {})
        )
        pages += page["data"]
        if not page["has_more"]:
            break
        before = page["next_before"]
    assert [r["seq"] for r in pages] == [r["seq"] for r in rows]
    forward = (await _logs(s, q=marker, after=pages[-1]["seq"] - 1, limit=5))["data"]
    assert [r["seq"] for r in forward] == [r["seq"] for r in reversed(pages)][:5]
    assert (await _logs(s, q=marker, since=str(until + 60)))["data"] == []


async def test_secrets_are_redacted(stack, nats_url) -> None:
    marker = f"secret-{uuid.uuid4().hex[:8]}"
    key = "sk-llmr-" + uuid.uuid4().hex
    structlog.get_logger("gateway.probe").warning(
        marker, password="hunter2", authorization=f"Bearer {key}", detail=f"the key {key} leaked", count=3
    )
    (row,) = await _eventually(stack, 1, q=marker)
    assert row["fields"] == {
        "password": "[redacted]",
        "authorization": "[redacted]",
        "detail": "the key [redacted] leaked",
        "count": 3,
    }
    stored = await Windows(stack.gateway.nc, storage.LOGS).get(row["seq"])
    assert key.encode() not in stored.data and b"hunter2" not in stored.data
    assert stored.subject == subjects.logs("gateway", row["instance"], "warning")


async def test_bad_log_queries_are_refused(stack) -> None:
    await stack.refuses(
        "/v0/logs",
        (
            ({"limit": "0"}, "limit"),
            ({"limit": "1001"}, "limit"),
            ({"level": "loud"}, "level"),
            ({"component": "toaster"}, "component"),
            ({"regex": "(unclosed"}, "regex"),
            ({"regex": "x" * 201}, "regex"),
            ({"q": ""}, "q"),
            ({"before": "5", "after": "1"}, "after"),
            ({"node": "n1", "component": "gateway"}, "node"),
            ({"since": "soon"}, "since"),
        ),
    )

    # A pattern that backtracks forever is stopped, not run forever.
    marker = f"backtrack-{uuid.uuid4().hex[:8]}"
    structlog.get_logger("gateway.probe").info(f"{marker} " + "a" * 900 + "!")
    await _eventually(stack, 1, q=marker)
    started = time.monotonic()
    answer = await stack.client.get("/v0/logs", params={"regex": "(a+)+$", "limit": 1000}, headers=stack.bearer())
    assert answer.status_code == 400 and "too long" in answer.json()["error"]["message"]
    assert time.monotonic() - started < 5

    limited = await stack.create_key(scopes=["read"], models=["some-model"])
    answer = await stack.client.get("/v0/logs", headers=stack.bearer(limited["key"]))
    assert answer.status_code == 403
    inference = await stack.create_key(scopes=["inference"])
    assert (await stack.client.get("/v0/logs", headers=stack.bearer(inference["key"]))).status_code == 403


def test_daily_files_rotate_and_keep_seven_days(tmp_path) -> None:
    """Records of ten days in a row: one file a day, each with its own day's records, and only
    the last seven days' files left."""
    files = DailyFiles(tmp_path, "node", retention_days=7, interval=3600)
    first = datetime.datetime(2026, 3, 1, 23, 59, tzinfo=datetime.UTC).timestamp()
    stale = tmp_path / "node.jsonl.2026-01-01"
    stale.write_text("{}\n")
    other = tmp_path / "gateway.jsonl.2026-01-01"  # another component's: not this writer's to delete
    other.write_text("{}\n")
    files.start(first)
    assert not stale.exists() and other.exists()
    for day in range(10):
        for minute in (0, 1):  # 23:59 and 00:00 of the next day: a rollover between them
            when = first + day * 86400 + minute * 60
            files.emit((when, "info", "node", {"event": f"day {day} minute {minute}", "day": day}))
        files.flush()
    files.stop()
    names = sorted(path.name for path in tmp_path.glob("node.jsonl.*"))
    assert names == [f"node.jsonl.2026-03-{d:02d}" for d in range(5, 12)]
    lines = [json.loads(line) for line in (tmp_path / "node.jsonl.2026-03-08").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["day 6 minute 1", "day 7 minute 0"]  # 00:00 of the 8th, 23:59 of it
    assert all(day_of(line["ts"]) == "2026-03-08" for line in lines)


async def test_records_wait_while_nats_is_down_and_the_oldest_are_dropped(tmp_path) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=0)
    url = await server.start()
    server.port = int(url.rsplit(":", 1)[1])  # restarted below on the same port and store
    nc = await connect(url, name="gateway")
    shipper = LogShipper(max_pending=50, interval=0.05)
    shipper.identity.instance = f"outage-{RUN}"
    try:
        await provision(nc.jetstream())
        shipper.attach(nc, "gateway")
        server.stop_sync()
        deadline = time.monotonic() + 20
        while nc.is_connected:
            assert time.monotonic() < deadline, "the client never noticed the outage"
            await asyncio.sleep(0.05)
        for i in range(80):
            shipper.emit((time.time(), "info", "gateway.probe", {"event": f"while down {i}"}))
        await asyncio.sleep(0.2)
        assert shipper.stats == {"pending": 50, "shipped": 0, "dropped": 30}  # kept the newest, counted the rest
        server.start_sync()
        deadline = time.monotonic() + 20
        while shipper.stats["pending"]:
            assert time.monotonic() < deadline, f"not shipped after the restart: {shipper.stats}"
            await asyncio.sleep(0.05)
        await nc.flush()
        windows = Windows(nc, storage.LOGS)
        bounds = await windows.bounds()
        stored = await windows.read([subjects.logs_filter("gateway", f"outage-{RUN}")], bounds.first, 100)
        assert [json.loads(m.data)["event"] for m in stored] == [f"while down {i}" for i in range(30, 80)]
    finally:
        await shipper.detach(nc)
        await nc.close()
        await server.stop()


@pytest.mark.e2e
async def test_a_node_process_writes_its_files_and_ships_its_records(stack, nats_url, tmp_path, spawn) -> None:
    node = spawn(
        "--log-format",
        "console",
        "node",
        "--nats-url",
        nats_url,
        "--data-dir",
        str(tmp_path),
        "--allow-cpu",
        "--runtimes",
        "llama_cpp",
        env={"LLM_ROUTER_LOG_DIR": ""},  # the default: <data dir>/logs
    )
    ready = await asyncio.to_thread(node.wait_for, r"LLM Router node (\S+) ready", 60)
    node_id = ready.group(1)
    rows = await _eventually(stack, 1, timeout=20, node=node_id, q="node started")
    assert rows[0]["component"] == "node" and rows[0]["instance"] == node_id
    path = tmp_path / "logs" / f"node.jsonl.{day_of(time.time())}"
    deadline = time.monotonic() + 20
    while not (path.exists() and "node started" in path.read_text()):
        assert time.monotonic() < deadline, f"no 'node started' in {path}"
        await asyncio.sleep(0.1)
    line = next(json.loads(x) for x in path.read_text().splitlines() if "node started" in x)
    assert line["node_id"] == node_id and line["component"] == "node"
    assert "node started" in node.output() and '"event"' not in node.output()  # the console stays for people


async def test_the_cli_prints_what_the_api_returns(stack, nats_url) -> None:
    marker = f"cli-{uuid.uuid4().hex[:8]}"
    for i in range(5):
        structlog.get_logger("gateway.probe").info(f"{marker} line {i}")
    await _eventually(stack, 5, q=marker)
    gateway = Gateway(nats_url=nats_url, auth=False, port=0)
    await gateway.start()
    http = httpx.AsyncClient(base_url=gateway.url, timeout=30)
    try:
        api = (await http.get("/v0/logs", params={"q": marker, "limit": 3})).json()
        printed = await _cli("logs", "--url", gateway.url, "-q", marker, "--limit", "3", "--json")
        assert json.loads(printed) == api
        text = await _cli("logs", "--url", gateway.url, "-q", marker, "--limit", "3")
        assert text.splitlines()[-1].endswith(f"gateway {marker} line 4") and len(text.splitlines()) == 3

        for via in (["--url", gateway.url], ["--nats-url", nats_url]):
            follow = subprocess.Popen(
                [sys.executable, "-m", "llm_router", "logs", *via, "-q", marker, "-f", "--json"],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                if via[0] == "--url":
                    first = [json.loads(await asyncio.to_thread(follow.stdout.readline)) for _ in range(5)]
                    assert [r["event"] for r in first] == [f"{marker} line {i}" for i in range(5)]
                else:
                    await asyncio.sleep(2)  # subscribed: live records only
                late = f"{marker} late {via[0]}"
                structlog.get_logger("gateway.probe").warning(late)
                line = await asyncio.wait_for(asyncio.to_thread(follow.stdout.readline), 30)
                assert json.loads(line)["event"] == late
            finally:
                follow.terminate()
                follow.wait(10)
    finally:
        await http.aclose()
        await gateway.stop()


async def _cli(*args: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "llm_router", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_console_stays_readable_and_a_bad_retention_is_refused(tmp_path) -> None:
    script = "import structlog; from llm_router import logs; logs.configure('info', 'console', directory=None); structlog.get_logger('gateway').info('hello there', answer=42)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    console = re.sub(r"\x1b\[[0-9;]*m", "", done.stderr)  # its colours
    assert re.search(r"\[info\s*\] hello there\s+answer=42", console) and "{" not in console, console
    env = {"LLM_ROUTER_LOG_RETENTION_DAYS": "soon", "LLM_ROUTER_LOG_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "llm_router", "gateway", "--nats-url", "nats://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert done.returncode == 1 and "LLM_ROUTER_LOG_RETENTION_DAYS" in done.stderr
