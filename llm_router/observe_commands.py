"""``llm-router history``, ``logs`` and ``nodes``: what a running cluster did and does, from a terminal.

Each talks to a gateway's HTTP API (``--url``, ``--api-key``; the key `up` keeps by default) with
the model commands' client, and prints a table or line per record, or the API's own JSON with
``--json`` (one JSON object per line while following). ``--follow`` asks for the records after
the newest one seen, once a second (``after=<seq>``); ``logs -f --nats-url`` follows the LOGS
stream's subjects on NATS instead, live, without a gateway. Failures are one line on stderr and
the exit codes of :mod:`llm_router.model_commands`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

from .model_commands import DEFAULT_URL, CommandError, _Client, _default_key, _error_message

FOLLOW_INTERVAL_S = 1.0


def _gateway_options(parser: argparse.ArgumentParser, add: Callable[..., None]) -> None:
    add(parser, "--url", "URL", DEFAULT_URL, "gateway URL")
    add(parser, "--api-key", "API_KEY", None, "API key sent as a bearer token (default: the one `up` keeps)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")


def add_observe_commands(commands: Any, add: Callable[..., None]) -> None:
    history = commands.add_parser("history", help="the request history, newest first (from a running gateway)")
    _gateway_options(history, add)
    for flag, help in (
        ("--model", "only this model (repeatable)"),
        ("--capability", "only this capability: chat, completion, embedding, ... (repeatable)"),
        ("--status", "only this status: a code (503) or a class (5xx) (repeatable)"),
        ("--node", "only what this node answered; '-': requests no node saw (repeatable)"),
        ("--key-id", "only the requests of this API key id (repeatable)"),
    ):
        history.add_argument(flag, action="append", default=[], help=help)
    _time_options(history)
    history.add_argument("-q", "--query", help="free text anywhere in the record, bodies included")
    history.add_argument("--per-page", type=int, default=50, choices=(10, 25, 50, 100))
    history.add_argument("--cursor", help="the next_cursor of a page: the page after it")
    history.add_argument("-f", "--follow", action="store_true", help="keep printing new records as they come")
    history.add_argument("--show", metavar="ID", help="one record with its request and response (JSON)")
    history.add_argument("--export", choices=("jsonl", "csv"), help="every filtered record to stdout, streamed")

    logs = commands.add_parser("logs", help="log records of every component, newest last (from a running gateway)")
    _gateway_options(logs, add)
    logs.add_argument(
        "--component", action="append", default=[], choices=("up", "gateway", "registry", "node"), help="repeatable"
    )
    logs.add_argument("--node", action="append", default=[], help="only this node's records (repeatable)")
    logs.add_argument("--level", choices=("debug", "info", "warning", "error", "critical"), help="and above")
    _time_options(logs)
    logs.add_argument("-q", "--query", help="text in the message or its fields")
    logs.add_argument("--regex", help="a regular expression the message or its fields match")
    logs.add_argument("-n", "--limit", type=int, default=200, help="records (1 to 1000) [200]")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new records as they come")
    from .nats_options import add_nats_auth_options

    add(logs, "--nats-url", "NATS_URL", None, "with -f: follow the LOGS subjects on this NATS instead of the gateway")
    add_nats_auth_options(logs, add)

    nodes = commands.add_parser("nodes", help="nodes, their models, slots and state (from a running gateway)")
    _gateway_options(nodes, add)


def _time_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="from this time: seconds since the epoch or RFC 3339")
    parser.add_argument("--until", help="before this time: seconds since the epoch or RFC 3339")


def run_observe_command(args: argparse.Namespace) -> int:
    client = _Client(args.url, args.api_key or _default_key())
    out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    try:
        if args.command == "history":
            return _history(client, args, out)
        if args.command == "logs":
            return _logs(client, args, out)
        data = client.request("GET", "/v0/nodes")
        _print(data, args.json, out, _print_nodes)
        return 0
    except CommandError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 0  # the end of --follow
    except BrokenPipeError:  # `llm-router history | head`
        return 0


# ---------------------------------------------------------------- history


def _history_query(args: argparse.Namespace) -> dict[str, Any]:
    query: dict[str, Any] = {
        "model": args.model,
        "capability": args.capability,
        "status": args.status,
        "node": args.node,
        "key_id": args.key_id,
    }
    for name, value in (("since", args.since), ("until", args.until), ("q", args.query)):
        if value is not None:
            query[name] = value
    return {name: value for name, value in query.items() if value != []}


def _history(client: _Client, args: argparse.Namespace, out: Console) -> int:
    if args.show:
        print(json.dumps(client.request("GET", "/v0/history/" + urllib.parse.quote(args.show, safe="")), indent=2))
        return 0
    query = _history_query(args)
    if args.export:
        _stream(client, "/v0/history/export", {**query, "format": args.export})
        return 0
    page_query = {**query, "per_page": args.per_page, **({"cursor": args.cursor} if args.cursor else {})}
    page = client.request("GET", "/v0/history", query=page_query)
    if not args.follow:
        _print(page, args.json, out, _print_history)
        return 0
    rows = list(reversed(page["data"]))  # oldest first, then the new ones below them
    _emit(out, rows, args.json, _history_line)
    after = page["newest_seq"] or 0
    _follow(client, "/v0/history", {**query, "per_page": 100}, after, args.json, out, _history_line)
    return 0


def _follow(
    client: _Client,
    path: str,
    query: dict[str, Any],
    after: int,
    as_json: bool,
    out: Console,
    line: Callable[[dict], str],
) -> None:
    while True:
        page = client.request("GET", path, query={**query, "after": after})
        _emit(out, page["data"], as_json, line)
        after = page["next_after"]
        if not page["has_more"]:
            time.sleep(FOLLOW_INTERVAL_S)


def _print(data: Any, as_json: bool, out: Console, printer: Callable[[Console, Any], None]) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        printer(out, data)


def _emit(out: Console, rows: Iterable[dict], as_json: bool, line: Callable[[dict], str]) -> None:
    """Rows as they come: a JSON object or a line each."""
    for row in rows:
        if as_json:
            print(json.dumps(row))
        else:
            out.print(line(row), markup=False)
    sys.stdout.flush()


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _tokens(row: dict) -> str:
    usage = row.get("usage") or {}
    return f"{usage.get('prompt_tokens', 0)}/{usage.get('completion_tokens', 0)}" if usage else "-"


def _history_line(row: dict) -> str:
    return (
        f"{_when(row['recorded_at'])} {row['status_code']} {row['capability']} {row['model']} "
        f"node={row['node_id'] or '-'} key={row['key_id'] or '-'} {row['duration_ms']:.0f}ms "
        f"tokens={_tokens(row)} {row['id']}" + (f" error={row['error']}" if row.get("error") else "")
    )


def _print_history(out: Console, page: dict) -> None:
    table = Table("time", "status", "capability", "model", "node", "key", "ms", "tokens", "id", box=None)
    for row in page["data"]:
        table.add_row(
            _when(row["recorded_at"]),
            str(row["status_code"]),
            row["capability"],
            row["model"],
            row["node_id"] or "-",
            row["key_id"] or "-",
            f"{row['duration_ms']:.0f}",
            _tokens(row),
            row["id"],
        )
    out.print(table)
    total = page["total"] if page["total"] is not None else "?"
    more = f"; next page: --cursor {page['next_cursor']}" if page["next_cursor"] else ""
    out.print(f"{len(page['data'])} of {total}{more}", markup=False)


def _stream(client: _Client, path: str, query: dict[str, Any]) -> None:
    """A streamed answer, copied to stdout as it arrives."""
    url = client.base + path + "?" + urllib.parse.urlencode(query, doseq=True)
    headers = {"authorization": f"Bearer {client.api_key}"} if client.api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=120) as response:
            while chunk := response.read(65536):
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    except urllib.error.HTTPError as exc:
        raise CommandError(_error_message(exc)) from None
    except (urllib.error.URLError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        raise CommandError(f"cannot reach the gateway at {client.base} ({getattr(exc, 'reason', exc)})", 3) from None


# ---------------------------------------------------------------- logs


def _logs_query(args: argparse.Namespace) -> dict[str, Any]:
    query: dict[str, Any] = {"component": args.component, "node": args.node}
    for name, value in (
        ("level", args.level),
        ("since", args.since),
        ("until", args.until),
        ("q", args.query),
        ("regex", args.regex),
    ):
        if value is not None:
            query[name] = value
    return {name: value for name, value in query.items() if value != []}


def _logs(client: _Client, args: argparse.Namespace, out: Console) -> int:
    if not 1 <= args.limit <= 1000:
        raise CommandError("--limit is 1 to 1000", 2)
    if args.follow and args.nats_url:
        return asyncio.run(_follow_nats(args, out))
    query = _logs_query(args)
    page = client.request("GET", "/v0/logs", query={**query, "limit": args.limit})
    if args.json and not args.follow:
        print(json.dumps(page, indent=2))
        return 0
    rows = page["data"]
    _emit(out, reversed(rows), args.json, _log_line)  # oldest first, as a log reads
    if args.follow:
        after = rows[0]["seq"] if rows else page.get("next_before") or 0
        if not rows:
            newest = client.request("GET", "/v0/logs", query={"limit": 1})["data"]
            after = newest[0]["seq"] if newest else 0
        _follow(client, "/v0/logs", {**query, "limit": 1000}, after, args.json, out, _log_line)
    return 0


def _log_line(row: dict) -> str:
    where = row["component"] + (f"[{row['instance']}]" if row["component"] == "node" else "")
    fields = " ".join(f"{key}={value}" for key, value in (row.get("fields") or {}).items())
    request = f" request_id={row['request_id']}" if row.get("request_id") else ""
    return f"{_when(row['ts'])} {row['level']:<8} {where} {row['event']}{request} {fields}".rstrip()


async def _follow_nats(args: argparse.Namespace, out: Console) -> int:
    """``logs -f`` on the LOGS subjects themselves: live records, filtered as the API would."""
    import msgspec

    from broker import connect
    from events import codec, subjects
    from events.messages import LogRecord

    from .nats_options import nats_auth

    levels = list(subjects.LOG_LEVELS[subjects.LOG_LEVELS.index(args.level) :]) if args.level else [None]
    pairs = [("node", node) for node in args.node] or [(c, None) for c in args.component] or [(None, None)]
    filters = [subjects.logs_filter(component, instance, level) for component, instance in pairs for level in levels]
    pattern = re.compile(args.regex) if args.regex else None
    needle = args.query.lower() if args.query else None
    nc = await connect(args.nats_url, name="llm-router logs", auth=nats_auth(args))
    done = asyncio.Event()

    async def show(msg: Any) -> None:
        try:
            record = codec.decode(msg.data, LogRecord)
        except (msgspec.DecodeError, msgspec.ValidationError):  # not a record of ours on logs.>: skipped
            return
        row = {"object": "log_record", **msgspec.structs.asdict(record)}
        text = " ".join([record.event, *(f"{k}={v}" for k, v in record.fields.items())])
        if (needle is None or needle in text.lower()) and (pattern is None or pattern.search(text)):
            _emit(out, [row], args.json, _log_line)

    for subject in filters:
        await nc.subscribe(subject, cb=show)
    try:
        await done.wait()
    finally:
        await nc.close()
    return 0


# ---------------------------------------------------------------- nodes


def _print_nodes(out: Console, data: dict) -> None:
    table = Table("node", "state", "host", "models", "slots", "gpus", "seen", box=None)
    for node in data["data"]:
        models = ", ".join(
            f"{m['name']}" + (f" ({m['state']})" if m["state"] != "ready" else "") for m in node.get("models", [])
        )
        slots = f"{node.get('active_requests', 0)}/{node.get('max_parallel', 1)}"
        gpus = ", ".join(g["name"] for g in node.get("gpus", [])) or "cpu"
        table.add_row(
            node["id"], node["state"], node.get("hostname", ""), models or "-", slots, gpus, f"{node['last_seen_s']}s"
        )
    out.print(table)
    queue = data.get("queue") or {}
    out.print(f"queue: {queue.get('waiting', 0)} waiting of {queue.get('size', 0)}", markup=False)
