"""The request history read back: ``GET /v0/history`` (pages, every filter, totals, cursors,
``after``), ``/v0/history/{id}``, the JSONL and CSV export, masking, scopes, and the CLI.

A real registry, gateway (keys on) and node with the instant engine run in this test's event
loop (tests/inprocess.py) on the session's nats-server. A few thousand records go straight to
the HISTORY stream through the gateway's own HistoryWriter (the real writer: subjects, masking,
the id index), in three bursts a moment apart so a time range can pick one; real requests
through the gateway add a few more. Expected pages are computed here from what was written,
in the order it was written: newest first.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import msgspec
import pytest
from inprocess import minimal_engine, running

from broker.windows import Windows
from events import storage, subjects
from events.messages import HistoryRecord, RegisterModel, Usage
from gateway import Gateway

RUN = uuid.uuid4().hex[:6]
MODELS = [f"hist-{RUN}-a", f"hist-org/{RUN}-b:Q4_K_M", f"hist-{RUN}.c"]  # '/', ':' and '.' in subject tokens
NODES = ["hist-n1", "hist-n2", None]
KEYS = ["key_h1", "key_h2", "user:hist", None]
STATUSES = [200, 200, 200, 200, 400, 404, 429, 499, 500, 503]
CAPABILITIES = ["chat", "chat", "completion", "embedding"]
BURST = 1000
WORDS = ["needle", "haystack", 'Quoted "word"']


def _record(i: int, t0: float) -> HistoryRecord:
    word = WORDS[i % 3] if i % 37 == 0 else "plain"
    body = {"model": MODELS[i % 3], "messages": [{"role": "user", "content": f"question {i} {word}"}]}
    return HistoryRecord(
        id=f"h{RUN}-{i}",
        capability=CAPABILITIES[i % 4],
        endpoint="/v1/chat/completions",
        model=MODELS[i % 3],
        status_code=STATUSES[i % 10],
        started_at=t0 + i / 1000,
        duration_ms=float(i % 50),
        node_id=NODES[i % 3 if i % 7 else 2],
        key_id=KEYS[i % 4],
        usage=Usage(1, i % 5, 1 + i % 5),
        error="boom" if STATUSES[i % 10] >= 500 else None,
        request=msgspec.Raw(msgspec.json.encode(body)),
        response={"choices": [{"message": {"role": "assistant", "content": f"answer {i}"}}]},
    )


@pytest.fixture(scope="module")
async def stack(nats_url, tmp_path_factory, tiny_gguf):
    async with running(nats_url, tmp_path_factory.mktemp("history")) as stack:
        reply = await stack.registry.register(RegisterModel(path=str(tiny_gguf), name=f"hist-real-{RUN}"))
        assert reply.ok, reply.message
        await stack.serving(f"hist-real-{RUN}")
        yield stack


@pytest.fixture(scope="module")
async def written(stack):
    """Three bursts of records and the times around them: ``(records, [t_start, t_1, t_2, t_end])``."""
    t0 = time.time()
    records, marks = [], [t0 - 0.001]
    for burst in range(3):
        if burst:
            await asyncio.sleep(0.3)
            marks.append(time.time())
            await asyncio.sleep(0.3)
        for i in range(burst * BURST, (burst + 1) * BURST):
            record = _record(i, t0)
            records.append(record)
            stack.gateway.history.append(record)
        await stack.gateway.history.flush(timeout=30)
    marks.append(time.time())
    return records, marks


def _window(marks: list[float]) -> dict[str, str]:
    """The time range of the written records, and of nothing else."""
    return {"since": f"{marks[0]:.6f}", "until": f"{marks[3]:.6f}"}


async def _get(stack, path: str, key: str | None = None, **params) -> dict:
    answer = await stack.client.get(path, params=params, headers=stack.bearer(key))
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _detail(client: httpx.AsyncClient, record_id: str, headers: dict | None = None) -> dict:
    """``GET /v0/history/{id}``, once its index entry (a plain publish after the record's
    acknowledgement) is stored: a moment after the record itself."""
    deadline = time.monotonic() + 10
    while True:
        answer = await client.get(f"/v0/history/{record_id}", headers=headers or {})
        if answer.status_code != 404 or time.monotonic() > deadline:
            assert answer.status_code == 200, answer.text
            return answer.json()
        await asyncio.sleep(0.05)


async def _all_pages(stack, per_page: int = 100, **params) -> tuple[list[dict], list[int]]:
    """Every page of a query: its rows in order, and the total each page said."""
    rows, totals, cursor = [], [], None
    while True:
        page = await _get(stack, "/v0/history", per_page=per_page, **params, **({"cursor": cursor} if cursor else {}))
        assert page["object"] == "list" and len(page["data"]) <= per_page
        assert page["has_more"] == (page["next_cursor"] is not None)
        rows += page["data"]
        totals.append(page["total"])
        if not page["has_more"]:
            return rows, totals
        assert len(page["data"]) == per_page or page["total"] is None  # only a text scan may stop short
        cursor = page["next_cursor"]


def _expect(records: list[HistoryRecord], test) -> list[str]:
    return [r.id for r in reversed(records) if test(r)]


def _status_in(record: HistoryRecord, statuses: list[str]) -> bool:
    return any(
        record.status_code // 100 == int(s[0]) if s.endswith("xx") else record.status_code == int(s) for s in statuses
    )


CASES = [
    # (query, which records match)
    ({}, lambda r: True),
    ({"model": MODELS[0]}, lambda r: r.model == MODELS[0]),
    ({"model": [MODELS[1], MODELS[2]]}, lambda r: r.model in MODELS[1:]),
    ({"capability": "embedding"}, lambda r: r.capability == "embedding"),
    ({"status": "5xx"}, lambda r: r.status_code >= 500),
    ({"status": "429"}, lambda r: r.status_code == 429),
    ({"status": ["4xx", "404", "503"]}, lambda r: _status_in(r, ["4xx", "503"])),
    ({"node": "hist-n1"}, lambda r: r.node_id == "hist-n1"),
    ({"node": "-"}, lambda r: r.node_id is None),
    ({"key_id": "user:hist"}, lambda r: r.key_id == "user:hist"),
    ({"key_id": "-"}, lambda r: r.key_id is None),
    (
        {"model": MODELS[1], "status": "2xx", "node": ["hist-n1", "hist-n2"], "capability": ["chat", "completion"]},
        lambda r: (
            r.model == MODELS[1]
            and r.status_code == 200
            and r.node_id in ("hist-n1", "hist-n2")
            and r.capability != "embedding"
        ),
    ),
    ({"q": "needle"}, lambda r: "needle" in bytes(r.request).decode()),
    ({"q": "NEEDLE", "status": "2xx"}, lambda r: "needle" in bytes(r.request).decode() and r.status_code == 200),
    ({"q": 'quoted "word"'}, lambda r: 'Quoted \\"word\\"' in bytes(r.request).decode()),
    ({"q": "answer 1234"}, lambda r: r.id.endswith("-1234")),  # the response body is searched too
]


@pytest.mark.parametrize(("params", "test"), CASES, ids=[json.dumps(c[0])[:60] for c in CASES])
async def test_pages_and_filters_return_the_right_records_newest_first(stack, written, params, test) -> None:
    records, marks = written
    rows, totals = await _all_pages(stack, **_window(marks), **params)
    expected = _expect(records, test)
    assert [row["id"] for row in rows] == expected
    assert expected, "a filter that matches nothing tests nothing"
    assert set(totals) == ({None} if "q" in params else {len(expected)})
    seqs = [row["seq"] for row in rows]
    assert seqs == sorted(seqs, reverse=True)


async def test_time_range_page_sizes_and_the_row(stack, written) -> None:
    records, marks = written
    middle = [r.id for r in reversed(records[BURST : 2 * BURST])]
    rows, totals = await _all_pages(stack, per_page=50, since=str(marks[1]), until=str(marks[2]))
    assert [row["id"] for row in rows] == middle and set(totals) == {BURST}
    iso = {"since": _rfc3339(marks[1]), "until": _rfc3339(marks[2])}
    assert [row["id"] for row in (await _all_pages(stack, **iso))[0]] == middle

    since = _window(marks)
    first = await _get(stack, "/v0/history", **since)
    assert first["per_page"] == 50 and len(first["data"]) == 50 and first["total"] == 3 * BURST
    for per_page in (10, 25, 100):
        page = await _get(stack, "/v0/history", per_page=per_page, **since)
        assert [r["id"] for r in page["data"]] == [r.id for r in reversed(records)][:per_page]

    row = first["data"][0]
    newest = records[-1]
    assert row["object"] == "history_record" and "request" not in row and "response" not in row
    assert {k: row[k] for k in ("id", "model", "status_code", "node_id", "key_id", "capability", "error")} == {
        "id": newest.id,
        "model": newest.model,
        "status_code": newest.status_code,
        "node_id": newest.node_id,
        "key_id": newest.key_id,
        "capability": newest.capability,
        "error": newest.error,
    }
    assert row["usage"] == msgspec.to_builtins(newest.usage) and marks[2] < row["recorded_at"] < time.time()


def _rfc3339(seconds: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat().replace("+00:00", "Z")


async def test_a_cursor_keeps_its_total_while_new_records_arrive(stack, written) -> None:
    records, marks = written
    since = {"since": str(marks[0]), "model": MODELS[0]}  # no end: the late record is in the grown set
    first = await _get(stack, "/v0/history", per_page=10, **since)
    stack.gateway.history.append(msgspec.structs.replace(records[0], id=f"h{RUN}-late"))
    await stack.gateway.history.flush()
    second = await _get(stack, "/v0/history", per_page=10, cursor=first["next_cursor"], **since)
    assert second["total"] == first["total"]  # the set the first page counted, not the grown one
    assert [r["id"] for r in second["data"]] == _expect(records, lambda r: r.model == MODELS[0])[10:20]
    newer = await _get(stack, "/v0/history", after=first["newest_seq"], **since)
    assert [r["id"] for r in newer["data"]] == [f"h{RUN}-late"] and not newer["has_more"]
    assert (await _get(stack, "/v0/history", after=newer["next_after"], **since))["data"] == []


async def test_after_reads_forward_oldest_first(stack, written) -> None:
    records, marks = written
    newest = (await _get(stack, "/v0/history", per_page=25, **_window(marks)))["data"]
    rows, after = [], newest[-1]["seq"] - 1
    while True:
        page = await _get(stack, "/v0/history", per_page=10, after=after, **_window(marks))
        assert len(page["data"]) <= 10
        rows += page["data"]
        after = page["next_after"]
        if not page["has_more"]:
            break
    assert [r["id"] for r in rows] == [r["id"] for r in reversed(newest)]
    assert after == newest[0]["seq"]


async def test_a_real_request_is_recorded_whole(stack) -> None:
    s, model = stack, f"hist-real-{RUN}"
    chat = {"model": model, "messages": [{"role": "user", "content": f"hello history {RUN}"}]}
    answer = await s.client.post("/v1/chat/completions", json=chat, headers=s.bearer())
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["x-request-id"]
    streamed = await s.client.post("/v1/chat/completions", json={**chat, "stream": True}, headers=s.bearer())
    stream_id = streamed.headers["x-request-id"]
    refused = await s.client.post("/v1/chat/completions", json={**chat, "model": "no-such-model"}, headers=s.bearer())
    assert refused.status_code == 404
    await s.gateway.history.flush()

    detail = await _detail(s.client, request_id, s.bearer())
    assert detail["id"] == request_id and detail["status_code"] == 200 and detail["model"] == model
    assert detail["request"]["messages"] == chat["messages"]
    assert detail["response"]["choices"][0]["message"]["content"] == minimal_engine.TEXT
    assert detail["node_id"] == s.node.node_id and detail["key_id"] == s.gateway.keys.check(s.admin).id
    assert detail["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    assert detail["masking"] == "none"
    streamed_detail = await _detail(s.client, stream_id, s.bearer())
    assert streamed_detail["stream"] is True and minimal_engine.TEXT in json.dumps(streamed_detail["response"])

    page = await _get(s, "/v0/history", model=model, per_page=10)
    assert [r["id"] for r in page["data"]] == [stream_id, request_id] and page["total"] == 2
    refusals = await _get(s, "/v0/history", q=f"hello history {RUN}", status="404")
    assert [r["model"] for r in refusals["data"]] == ["no-such-model"]  # recorded although no node saw it
    assert refusals["data"][0]["node_id"] is None

    # The subject others consume (`nats sub 'history.>'`) carries what the filters use.
    stored = await Windows(s.gateway.nc, storage.HISTORY).get(detail["seq"])
    assert stored.subject == subjects.history("chat", model, 200, s.node.node_id, detail["key_id"])

    missing = await s.client.get("/v0/history/not-a-record", headers=s.bearer())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "record_not_found"


async def test_export_equals_the_filtered_pages(stack, written) -> None:
    records, marks = written
    for params in (_window(marks), {**_window(marks), "status": "5xx", "model": MODELS[1]}):
        rows, _ = await _all_pages(stack, **params)
        answer = await stack.client.get("/v0/history/export", params=params, headers=stack.bearer())
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-ndjson"
        assert answer.headers["content-disposition"] == 'attachment; filename="history.jsonl"'
        lines = [json.loads(line) for line in answer.text.splitlines()]
        assert [{k: v for k, v in line.items() if k not in ("request", "response")} for line in lines] == rows
        by_id = {r.id: r for r in records}
        assert all(line["request"] == msgspec.json.decode(by_id[line["id"]].request) for line in lines)

        answer = await stack.client.get(
            "/v0/history/export", params={**params, "format": "csv"}, headers=stack.bearer()
        )
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(answer.text)))
        assert [(r["id"], int(r["seq"]), int(r["status_code"])) for r in table] == [
            (row["id"], row["seq"], row["status_code"]) for row in rows
        ]
        assert all(r["node_id"] == (row["node_id"] or "") for r, row in zip(table, rows))


async def test_bad_queries_are_refused_with_openai_errors(stack) -> None:
    await stack.refuses(
        "/v0/history",
        (
            ({"per_page": "7"}, "per_page"),
            ({"per_page": "abc"}, "per_page"),
            ({"status": "6xx"}, "status"),
            ({"status": "50"}, "status"),
            ({"capability": "telepathy"}, "capability"),
            ({"cursor": "nope"}, "cursor"),
            ({"since": "yesterday"}, "since"),
            ({"since": "2026-02-30"}, "since"),
            ({"since": "200", "until": "100"}, "since"),
            ({"q": "x" * 201}, "q"),
            ({"model": [f"m{i}" for i in range(21)]}, "model"),
            ({"model": "x" * 300}, "model"),
            ({"after": "-1"}, "after"),
            ({"after": "5", "cursor": "1.2"}, "after"),
        ),
    )
    too_many = {
        "model": [f"m{i}" for i in range(9)],
        "node": [f"n{i}" for i in range(9)],
        "status": ["2xx", "3xx", "4xx", "5xx"],
    }
    answer = await stack.client.get("/v0/history", params=too_many, headers=stack.bearer())
    assert answer.status_code == 400 and "combinations" in answer.json()["error"]["message"]
    answer = await stack.client.get("/v0/history/export", params={"format": "xml"}, headers=stack.bearer())
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "format"


async def test_scopes_and_a_key_limited_to_models(stack, written) -> None:
    records, marks = written
    read = await stack.create_key(scopes=["read"])
    inference = await stack.create_key(scopes=["inference"])
    limited = await stack.create_key(scopes=["read"], models=[MODELS[2]])
    since = _window(marks)
    assert (await _get(stack, "/v0/history", read["key"], per_page=10, **since))["total"] == 3 * BURST
    answer = await stack.client.get("/v0/history", headers=stack.bearer(inference["key"]))
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "insufficient_scope"
    answer = await stack.client.get("/v0/history", headers={})
    assert answer.status_code == 401

    page = await _get(stack, "/v0/history", limited["key"], per_page=100, **since)
    assert page["total"] == BURST and {r["model"] for r in page["data"]} == {MODELS[2]}
    answer = await stack.client.get("/v0/history", params={"model": MODELS[0]}, headers=stack.bearer(limited["key"]))
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "model_not_allowed"
    other = next(r for r in records if r.model == MODELS[0])
    assert (await _detail(stack.client, other.id, stack.bearer()))["id"] == other.id  # there, for the admin
    assert (await stack.client.get(f"/v0/history/{other.id}", headers=stack.bearer(limited["key"]))).status_code == 404
    mine = next(r for r in records if r.model == MODELS[2])
    assert (await _detail(stack.client, mine.id, stack.bearer(limited["key"])))["id"] == mine.id
    exported = await stack.client.get("/v0/history/export", params=since, headers=stack.bearer(limited["key"]))
    assert {json.loads(line)["model"] for line in exported.text.splitlines()} == {MODELS[2]}


@pytest.mark.parametrize("mode", ["partial", "full"])
async def test_masking_hides_bodies_before_they_are_stored(stack, nats_url, mode) -> None:
    """A gateway with --history-masking: the secret in the prompt and the answer's text are in
    no stored byte, and the record says how it was masked."""
    gateway = Gateway(nats_url=nats_url, auth=False, history_masking=mode)
    await gateway.start(serve_http=False)
    try:
        model = f"hist-real-{RUN}"
        deadline = time.monotonic() + 20
        while not gateway.directory.serving(model):
            assert time.monotonic() < deadline, "the second gateway never saw the node"
            await asyncio.sleep(0.05)
        secret = f"XYZ secret passphrase {RUN}"
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw")
        async with client:
            chat = {"model": model, "temperature": 0.5, "messages": [{"role": "user", "content": secret}]}
            answer = await client.post("/v1/chat/completions", json=chat)
            assert answer.status_code == 200
            await gateway.history.flush()
            detail = await _detail(client, answer.headers["x-request-id"])
        stored = await Windows(gateway.nc, storage.HISTORY).get(detail["seq"])
        assert secret.encode() not in stored.data and b"passphrase" not in stored.data
        assert minimal_engine.TEXT.encode() not in stored.data.split(b'"response"')[1]
        assert detail["masking"] == mode and detail["status_code"] == 200 and detail["usage"]["total_tokens"] == 2
        if mode == "full":
            assert detail["request"] is None and detail["response"] is None
        else:
            assert detail["request"]["model"] == model and detail["request"]["temperature"] == 0.5
            assert detail["request"]["messages"] == [{"role": "user", "content": f"XYZ…[{len(secret)} chars]"}]
            assert detail["response"]["choices"][0]["message"]["role"] == "assistant"
    finally:
        await gateway.stop()


def test_masking_modes_are_refused_when_unknown(nats_url) -> None:
    with pytest.raises(RuntimeError, match="history-masking"):
        Gateway(nats_url=nats_url, auth=False, history_masking="some")


async def test_the_cli_prints_what_the_api_returns(stack, nats_url, written) -> None:
    records, marks = written
    gateway = Gateway(nats_url=nats_url, auth=False, port=0)
    await gateway.start()  # over HTTP, as the CLI talks to it
    http = httpx.AsyncClient(base_url=gateway.url, timeout=30)
    try:
        params = {"since": str(marks[0]), "model": MODELS[0], "status": "5xx"}  # no end: --follow sees the late one
        api = (await http.get("/v0/history", params={**params, "per_page": 25})).json()
        argv = ["--url", gateway.url, "--model", MODELS[0], "--status", "5xx", "--since", params["since"]]
        printed = await _cli("history", *argv, "--per-page", "25", "--json")
        assert json.loads(printed) == api
        table = await _cli("history", *argv, "--per-page", "10")
        assert all(row["id"] in table for row in api["data"][:10]) and f"10 of {api['total']}" in table
        shown = json.loads(await _cli("history", "--url", gateway.url, "--show", api["data"][0]["id"]))
        assert shown == (await http.get("/v0/history/" + api["data"][0]["id"])).json()
        exported = await _cli("history", *argv, "--export", "csv", raw=True)
        assert exported == (await http.get("/v0/history/export", params={**params, "format": "csv"})).content

        follow = subprocess.Popen(
            [sys.executable, "-m", "llm_router", "history", *argv, "--follow", "--json"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            late = msgspec.structs.replace(records[-10], id=f"h{RUN}-followed", model=MODELS[0], status_code=503)
            lines: list[str] = []

            async def read_lines(count: int) -> None:
                while len(lines) < count:
                    lines.append(await asyncio.to_thread(follow.stdout.readline))

            first = min(api["total"], 50)  # the first page (--per-page 50), oldest first
            await asyncio.wait_for(read_lines(first), 30)
            assert [json.loads(line)["id"] for line in lines[-5:]] == [r["id"] for r in reversed(api["data"][:5])]
            gateway.history.append(late)
            await asyncio.wait_for(read_lines(first + 1), 30)
            assert json.loads(lines[-1])["id"] == late.id
        finally:
            follow.terminate()
            follow.wait(10)

        nodes = json.loads(await _cli("nodes", "--url", gateway.url, "--json"))
        assert stack.node.node_id in [n["id"] for n in nodes["data"]]
        table = await _cli("nodes", "--url", gateway.url)
        assert stack.node.node_id in table and f"hist-real-{RUN}" in table
    finally:
        await http.aclose()
        await gateway.stop()


async def _cli(*args: str, raw: bool = False) -> Any:
    """What ``llm-router ARGS`` prints (bytes with ``raw``: CSV lines end in CRLF)."""
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "llm_router", *args], capture_output=True, text=not raw, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_errors_are_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llm_router", "history", "--url", "http://127.0.0.1:9", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3 and done.stderr.count("\n") == 1 and "cannot reach the gateway" in done.stderr
