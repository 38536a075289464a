"""``llm-router model ...``: the model admin API from a terminal, over the gateway's HTTP.

Every failure is one line on stderr (the API's own error message) and a non-zero exit:
1 for an error the server reported, 2 for bad usage, 3 when the gateway cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8080"


class CommandError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_model_commands(commands: Any, add: Callable[..., None]) -> None:
    model = commands.add_parser("model", help="list, add, show and remove models (talks to a running gateway)")
    add(model, "--url", "URL", DEFAULT_URL, "gateway URL")
    add(
        model,
        "--api-key",
        "API_KEY",
        None,
        "API key sent as a bearer token (default: the one `up` keeps in its data dir)",
    )
    model.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    verbs = model.add_subparsers(dest="verb", required=True)

    listing = verbs.add_parser("list", help="GGUF models on Hugging Face, with their quantisations")
    listing.add_argument("--search", default="", help="words in the repository name")
    listing.add_argument("--page", type=int, default=1)
    listing.add_argument("--per-page", type=int, default=50)

    hub = verbs.add_parser("hub", help="the curated catalog and what this cluster has of it")
    hub.add_argument("--search", default="", help="words in the id, name, repository or tags")

    add_cmd = verbs.add_parser("add", help="register a model (metadata only; nodes fetch the files)")
    add_cmd.add_argument(
        "source",
        help="ORG/REPO, ORG/REPO:QUANT, a Hugging Face URL, a catalog id, "
        "or a local path the nodes can see (GGUF, diffusers or Whisper folder, Piper voice)",
    )
    add_cmd.add_argument("--file", help="the GGUF file in the repository")
    add_cmd.add_argument("--revision", help="branch, tag or commit (default: main)")
    add_cmd.add_argument("--name", help="register under this name instead of ORG/REPO:QUANT")
    add_cmd.add_argument(
        "--predownload", action="store_true", help="nodes fetch it right away, not on the first request"
    )
    add_cmd.add_argument(
        "--replicas",
        metavar="MIN[:MAX]",
        help="nodes that keep it loaded: MIN placed at once, up to MAX while requests keep queueing "
        "(default: every node that has its files, where it fits)",
    )

    download = verbs.add_parser("download", help="fetch a model onto nodes now, with a progress bar per node")
    download.add_argument("model")
    where = download.add_mutually_exclusive_group(required=True)
    where.add_argument("--all", action="store_true", help="every live node that can run the model")
    where.add_argument("--node", help="this node id")
    download.add_argument("--timeout", type=float, default=24 * 3600.0, help="give up after this many seconds")

    rm = verbs.add_parser("rm", help="delete a registration; nodes delete their copies")
    rm.add_argument("model")

    show = verbs.add_parser("show", help="one registered model, with its state and nodes")
    show.add_argument("model")

    verbs.add_parser("ls", help="registered models")


def _default_key() -> str | None:
    """The admin key `llm-router up` keeps in its default data dir, when there is one."""
    path = Path(os.environ.get("LLM_ROUTER_DATA_DIR") or Path.home() / ".llm-router") / "admin.key"
    try:
        return path.expanduser().read_text().strip() or None
    except OSError:
        return None


def run_model_command(args: argparse.Namespace) -> int:
    client = _Client(args.url, args.api_key or _default_key())
    out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)
    try:
        handler = _VERBS[args.verb]
        data = handler(client, args)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            _PRINTERS[args.verb](out, data)
        return 0
    except CommandError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return exc.code


class _Client:
    def __init__(self, base: str, api_key: str | None) -> None:
        self.base = base.rstrip("/")
        self.api_key = api_key

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if data else {}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise CommandError(_error_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CommandError(
                f"cannot reach the gateway at {self.base} ({reason}); is `llm-router up` running?", 3
            ) from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    raw = exc.read()
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode(errors="replace").strip() or exc.reason
    return f"{message} (HTTP {exc.code})"


def _quote(model: str) -> str:
    return urllib.parse.quote(model, safe="/:")


# ---------------------------------------------------------------- verbs


def _list(client: _Client, args: argparse.Namespace) -> Any:
    if args.page < 1 or not 1 <= args.per_page <= 100:
        raise CommandError("--page must be >= 1 and --per-page between 1 and 100", 2)
    return client.request(
        "GET", "/v0/models/hf", query={"search": args.search, "page": args.page, "per_page": args.per_page}
    )


def _hub(client: _Client, args: argparse.Namespace) -> Any:
    return client.request("GET", "/v0/models/hub", query={"search": args.search} if args.search else None)


def _add(client: _Client, args: argparse.Namespace) -> Any:
    source = args.source.strip()
    body: dict[str, Any] = {}
    if source.startswith(("/", "./", "../", "~")):  # a path, as the nodes (and the registry) see it
        if args.file:
            raise CommandError("--file goes with ORG/REPO; a path names its file itself", 2)
        body["path"] = str(Path(source).expanduser().absolute())
    elif "/" in source or "://" in source:
        body["url" if "://" in source else "repo"] = source
        if args.file:
            if "://" in source:
                raise CommandError("--file goes with ORG/REPO; a URL names its file itself", 2)
            body["filename"] = args.file
    else:
        if args.file:
            raise CommandError(f"{source!r} is a catalog id; --file goes with ORG/REPO", 2)
        body["catalog_id"] = source
    if args.revision:
        body["revision"] = args.revision
    if args.name:
        body["name"] = args.name
    if args.predownload:
        body["predownload"] = True
    if args.replicas:
        body["replicas"] = _replicas(args.replicas)
    return client.request("POST", "/v0/models/register", body)


def _replicas(text: str) -> dict[str, int]:
    low, _, high = text.partition(":")
    try:
        wanted = {"min": int(low)} | ({"max": int(high)} if high else {})
    except ValueError:
        raise CommandError(f"--replicas {text!r}: give MIN or MIN:MAX, e.g. 1:3", 2) from None
    return wanted


def _rm(client: _Client, args: argparse.Namespace) -> Any:
    return client.request("DELETE", "/v0/models/" + _quote(args.model))


def _show(client: _Client, args: argparse.Namespace) -> Any:
    return client.request("GET", "/v0/models/" + _quote(args.model))


def _ls(client: _Client, args: argparse.Namespace) -> Any:
    return client.request("GET", "/v0/models")


def _download(client: _Client, args: argparse.Namespace) -> Any:
    """Start the task, follow each node's report until done or failed, then wait for ``ready``."""
    body = {"all": True} if args.all else {"node": args.node}
    answer = client.request("POST", f"/v0/models/{_quote(args.model)}/download", body)
    task = answer["task"]
    replies = {reply["node_id"]: reply for reply in task["nodes"]}
    finals: dict[str, dict] = {}
    for node_id, reply in replies.items():
        if not reply["ok"]:
            finals[node_id] = {"state": "failed", "error": reply["message"]}
    deadline = time.monotonic() + args.timeout
    interactive = sys.stdout.isatty() and not args.json
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=Console(highlight=False), disable=args.json, auto_refresh=interactive) as progress:
        bars = {
            node_id: progress.add_task(f"node {node_id}", total=None, note=reply["message"][:60])
            for node_id, reply in replies.items()
        }
        while len(finals) < len(replies):
            if time.monotonic() > deadline:
                raise CommandError(f"timed out after {args.timeout:g} s; the download goes on (task {task['task_id']})")
            status = client.request("GET", f"/v0/downloads/{task['task_id']}")
            for node_id, report in (status.get("progress") or {}).items():
                if node_id in finals or not report or report.get("task_id") != replies[node_id]["task_id"]:
                    continue
                progress.update(
                    bars[node_id],
                    completed=report["bytes_done"],
                    total=report["bytes_total"] or None,
                    note=report["state"],
                )
                if report["state"] in ("done", "failed"):
                    finals[node_id] = report
                    if not interactive:
                        progress.console.print(
                            f"node {node_id}: {report['state']}{' - ' + report['error'] if report.get('error') else ''}"
                        )
            if not interactive:
                progress.refresh()
            time.sleep(0.3)
    failed = {node: final for node, final in finals.items() if final["state"] == "failed"}
    if failed:
        raise CommandError("; ".join(f"node {node}: {final.get('error')}" for node, final in failed.items()))
    model = _wait_ready(client, args.model, set(replies), deadline)
    return {"task": task, "progress": finals, "model": model}


def _wait_ready(client: _Client, name: str, nodes: set[str], deadline: float) -> dict:
    """After the files arrive the nodes load the model; done when all of them serve it."""
    while True:
        model = client.request("GET", "/v0/models/" + _quote(name))
        if nodes <= set(model.get("nodes") or []):
            return model
        if model.get("state") == "error" or time.monotonic() > deadline:
            raise CommandError(f"downloaded, but not ready on every node: {model.get('error') or model.get('state')}")
        time.sleep(0.2)


_VERBS = {"list": _list, "hub": _hub, "add": _add, "rm": _rm, "show": _show, "ls": _ls, "download": _download}


# ---------------------------------------------------------------- output


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _print_list(out: Console, page: dict) -> None:
    table = Table(
        title=f"Hugging Face GGUF models, page {page['page']}"
        + (" (STALE: Hugging Face unreachable)" if page.get("stale") else "")
    )
    for column in ("repository", "downloads", "likes", "quantisations (size)"):
        table.add_column(column, overflow="fold")
    for model in page["models"]:
        variants = ", ".join(
            f"{v['quantization'] or v['filename']} ({_size(v['size_bytes'])})" for v in model["variants"]
        )
        table.add_row(model["id"], str(model.get("downloads") or 0), str(model.get("likes") or 0), variants or "-")
    out.print(table)
    if page.get("has_more"):
        out.print(f"More: --page {page['page'] + 1}")


def _print_hub(out: Console, data: dict) -> None:
    table = Table(title="Curated models")
    for column in ("id", "capabilities", "size", "status", "lifecycle", "repository"):
        table.add_column(column, overflow="fold")
    for entry in data["data"]:
        table.add_row(
            entry["id"],
            ", ".join(entry["capabilities"]),
            _size(entry["size_bytes"]),
            entry["status"],
            entry.get("lifecycle_status") or "-",
            entry["repo"],
        )
    out.print(table)


def _print_model(out: Console, model: dict) -> None:
    source = model.get("source", {})
    where = source.get("path") or "/".join(p for p in (source.get("repo"), source.get("filename")) if p)
    out.print(
        f"[bold]{model['id']}[/bold]  {model['state']}{'  (ready on ' + ', '.join(model['nodes']) + ')' if model.get('nodes') else ''}"
    )
    out.print(f"  source:        {where}")
    out.print(f"  format:        {model['format']} ({model['runtime']})  {model.get('quantization') or ''}")
    out.print(f"  capabilities:  {', '.join(model['capabilities'])}")
    out.print(
        f"  size:          {_size(model.get('size_bytes'))}, needs about {_size(model.get('required_memory_bytes'))} of memory"
    )
    for warning in model.get("warnings") or []:
        out.print(f"  [yellow]warning:[/yellow] {warning}")
    if model.get("error"):
        out.print(f"  [red]error:[/red] {model['error']}")


def _print_deleted(out: Console, data: dict) -> None:
    out.print(f"deleted {data['id']}")


def _print_registered(out: Console, model: dict) -> None:
    out.print("registered:")
    _print_model(out, model)


def _print_ls(out: Console, data: dict) -> None:
    table = Table(title="Registered models")
    for column in ("id", "state", "ready", "capabilities", "size", "source"):
        table.add_column(column, overflow="fold")
    for model in data["data"]:
        source = model["source"]
        table.add_row(
            model["id"],
            model["state"],
            "yes" if model["ready"] else "no",
            ", ".join(model["capabilities"]),
            _size(model.get("size_bytes")),
            source.get("path") or source.get("repo") or "-",
        )
    out.print(table)


def _print_downloaded(out: Console, data: dict) -> None:
    out.print(f"{data['model']['id']} is ready on " + ", ".join(sorted(data["progress"])))


_PRINTERS = {
    "list": _print_list,
    "hub": _print_hub,
    "add": _print_registered,
    "rm": _print_deleted,
    "show": _print_model,
    "ls": _print_ls,
    "download": _print_downloaded,
}
