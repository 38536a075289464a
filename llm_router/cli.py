"""``llm-router``: run everything on one machine (``up``) or one component against a NATS URL.

Every option has an environment default with the ``LLM_ROUTER_`` prefix (shown in --help).
A component is a class with start()/stop(); ``up`` starts NATS, registry, gateway and node
and stops them in reverse order on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import logs

ENV_PREFIX = "LLM_ROUTER_"
DEMO_MODEL = "tiny-demo"
OBSERVE_COMMANDS = ("history", "logs", "nodes")  # llm_router.observe_commands: read a running gateway


def env(name: str, default: Any = None) -> Any:
    return os.environ.get(ENV_PREFIX + name, default)


def _add(parser: argparse.ArgumentParser, flag: str, env_name: str, default: Any, help: str, **kw: Any) -> None:
    parser.add_argument(
        flag, default=env(env_name, default), help=f"{help} [env {ENV_PREFIX}{env_name}, default: %(default)s]", **kw
    )


def _add_list(
    parser: argparse.ArgumentParser,
    flag: str,
    env_name: str,
    help: str,
    metavar: str = "HOST",
    sep: str = ",",
    note: str = "",
) -> None:
    """A repeatable option whose environment default is a ``sep``-separated list (``note``: after it in the help)."""
    named = "comma" if sep == "," else f"'{sep}'"
    parser.add_argument(
        flag,
        action="append",
        metavar=metavar,
        default=[value for value in env(env_name, "").split(sep) if value] or None,
        help=f"{help} [env {ENV_PREFIX}{env_name}, {named}-separated{note}]",
    )


def _add_switch(parser: argparse.ArgumentParser, flag: str, env_name: str, help: str) -> None:
    """An on/off option, on by default when its environment variable is 1, true or yes."""
    parser.add_argument(
        flag,
        action="store_true",
        default=env(env_name, "") in ("1", "true", "yes"),
        help=f"{help} [env {ENV_PREFIX}{env_name}]",
    )


def _nats_option(parser: argparse.ArgumentParser, required: bool) -> None:
    from .nats_options import add_nats_auth_options

    help = "NATS server URL(s), comma-separated" + ("" if required else "; when set, no embedded server is started")
    _add(parser, "--nats-url", "NATS_URL", None if not required else "nats://127.0.0.1:4222", help)
    add_nats_auth_options(parser, _add)
    _add(
        parser,
        "--replicas",
        "NATS_REPLICAS",
        None,
        "servers of a NATS cluster that keep a copy of every stream, KV bucket and object store (e.g. 3); "
        "applied to existing ones too. Unset: new ones get 1, existing ones keep theirs",
        type=int,
        choices=range(1, 6),
        metavar="1-5",
    )


def _gateway_options(parser: argparse.ArgumentParser) -> None:
    """What the HTTP gateway takes (``up`` and ``gateway``): where it listens, its limits, auth, history."""
    _add(parser, "--host", "HOST", "127.0.0.1", "address the HTTP gateway listens on")
    _add(parser, "--port", "PORT", 8080, "HTTP port of the gateway (0 picks a free one)", type=int)
    _add(parser, "--request-timeout", "REQUEST_TIMEOUT", 600.0, "seconds a request may take end to end", type=float)
    _add(
        parser,
        "--prices",
        "PRICES",
        None,
        "JSON file of USD prices per million tokens ('provider:model' -> {input, output}) over the built-in table",
    )
    _add(parser, "--queue-size", "QUEUE_SIZE", 100, "requests that may wait for a free node (then 429)", type=int)
    _add(
        parser,
        "--queue-timeout",
        "QUEUE_TIMEOUT",
        60.0,
        "seconds a request may wait for a free node (then 504)",
        type=float,
    )
    _add_switch(parser, "--no-auth", "NO_AUTH", "serve without API keys (refused unless --host is a loopback address)")
    _add_switch(parser, "--no-metrics", "NO_METRICS", "no Prometheus /metrics (nothing counted; 404)")
    _add(
        parser,
        "--forwarded-allow-ips",
        "FORWARDED_ALLOW_IPS",
        None,
        "reverse proxies (comma-separated addresses or networks) whose X-Forwarded-For names the client "
        "for the login throttle (default: none, the header is ignored)",
    )
    _add(
        parser,
        "--history-masking",
        "HISTORY_MASKING",
        "none",
        "what the request history keeps of bodies: none (all), partial (their shape, a hint of each text), "
        "full (no bodies, metadata only)",
        choices=["none", "partial", "full"],
    )


def _node_options(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--parallel", "PARALLEL", 1, "requests one loaded model runs at once on this node", type=int)
    _add(
        parser,
        "--shared-models-dir",
        "SHARED_MODELS_DIR",
        None,
        "models dir shared by several nodes (e.g. NFS): used in place, and downloads go there, one node at a time",
    )
    _add_list(
        parser,
        "--allow-origin",
        "ALLOW_ORIGINS",
        "host nodes may download models from (repeatable; 'none' for no origin)",
        note="; default: the Hugging Face endpoint in use",
    )
    _add_list(
        parser,
        "--allow-fetch-host",
        "ALLOW_FETCH_HOSTS",
        "host (or host:port) a vision chat's image_url may be fetched from even though it resolves to an "
        "internal address (repeatable); others must resolve to public addresses",
    )
    _add_switch(
        parser,
        "--no-remote-images",
        "NO_REMOTE_IMAGES",
        "never fetch a vision chat's http(s) image_url (only data: URLs are accepted)",
    )
    _add(
        parser,
        "--runtimes",
        "RUNTIMES",
        None,
        "comma-separated engine runtimes this node may use (llama_cpp, diffusers, faster_whisper, piper); default: all that are installed",
    )
    _add(
        parser,
        "--predownload",
        "PREDOWNLOAD",
        "registered",
        "fetch models when registered: 'all', 'registered' (those registered with predownload) or 'none' (on first request)",
        choices=["all", "registered", "none"],
    )
    _add(
        parser,
        "--memory-budget",
        "MEMORY_BUDGET",
        None,
        "RAM the node's loaded models may use: bytes (16GiB, 8GB, 512MiB) or a share of the machine's (80%%); "
        "models that do not fit are loaded on demand in place of the least recently used idle ones (default: 80%%)",
    )
    _add(
        parser,
        "--gpu-memory-budget",
        "GPU_MEMORY_BUDGET",
        None,
        "memory of each GPU the loaded models may use: bytes or a share (default: 90%%)",
    )
    _add(
        parser,
        "--keep-alive",
        "KEEP_ALIVE",
        None,
        "seconds an idle model loaded on demand stays loaded (unset: until its room is needed); "
        "models placed for a registration's minimum replicas stay",
        type=float,
    )
    parser.add_argument(
        "--no-share-downloads",
        action="store_true",
        default=env("NO_SHARE_DOWNLOADS", "") in ("1", "true", "yes"),
        help="do not put models this node fetched from the origin into the object store (by default the next "
        f"node fetches them over NATS, not from the origin again) [env {ENV_PREFIX}NO_SHARE_DOWNLOADS]",
    )
    _add(
        parser,
        "--gpu-layers",
        "GPU_LAYERS",
        None,
        "at most this many layers of a llama.cpp model offloaded to the GPU (default: all, when the "
        "llama-cpp-python build supports GPU offload and the machine has a GPU; 0: CPU only)",
        type=int,
    )


def _upstream_options(parser: argparse.ArgumentParser) -> None:
    _add(
        parser,
        "--upstream",
        "UPSTREAM",
        None,
        "serve the models of this existing OpenAI-compatible server (vLLM, Ollama, llama.cpp, LM Studio...) "
        "instead of engines of the node's own, e.g. http://gpu-box:8000",
    )
    parser.add_argument(  # not _add: its help shows the default, which here would be the key itself
        "--upstream-key",
        default=env("UPSTREAM_KEY"),
        help="API key the upstream server wants (sent as a Bearer token; never logged). Prefer the environment, "
        f"[env {ENV_PREFIX}UPSTREAM_KEY]: a command line shows in process listings",
    )
    _add(parser, "--upstream-prefix", "UPSTREAM_PREFIX", "", "put before each upstream model's name, e.g. 'box1/'")
    _add(
        parser,
        "--upstream-interval",
        "UPSTREAM_INTERVAL",
        5.0,
        "seconds between health checks of the upstream (each also re-reads its model list)",
        type=float,
    )
    _add(
        parser,
        "--upstream-failures",
        "UPSTREAM_FAILURES",
        3,
        "failed health checks in a row after which the node goes offline (it comes back on the next success)",
        type=int,
    )


def _upstream(args: argparse.Namespace) -> Any:
    """The upstream link of ``llm-router node --upstream URL``, or None."""
    if not getattr(args, "upstream", None):
        return None
    from nodes.upstream import UpstreamServer
    from nodes.upstream_link import UpstreamLink

    try:
        server = UpstreamServer(args.upstream, args.upstream_key)
    except ValueError as exc:
        raise SystemExit(f"llm-router: {exc}") from None
    return UpstreamLink(
        server,
        prefix=args.upstream_prefix or "",
        interval=float(args.upstream_interval),
        failures=int(args.upstream_failures),
    )


def _node_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "parallel": int(args.parallel),
        "shared_models_dir": Path(args.shared_models_dir).expanduser() if args.shared_models_dir else None,
        "allow_origins": args.allow_origin,
        "predownload": args.predownload,
        "runtimes": _runtimes(args.runtimes, _image_fetcher(args), args.gpu_layers),
        "memory_budget": _budget_option(args.memory_budget, "--memory-budget"),
        "gpu_memory_budget": _budget_option(args.gpu_memory_budget, "--gpu-memory-budget"),
        "keep_alive_s": args.keep_alive,
        "share_downloads": not args.no_share_downloads,
    }


def _budget_option(value: str | None, flag: str) -> str | None:
    from nodes.memory import parse_budget

    if value is not None:
        try:
            parse_budget(value, 1 << 40, default="80%")
        except ValueError as exc:
            raise SystemExit(f"llm-router: {flag}: {exc}") from None
    return value


def _image_fetcher(args: argparse.Namespace) -> Any:
    from nodes.remote_media import ImageFetcher

    return ImageFetcher.from_settings(enabled=not args.no_remote_images, allow_hosts=args.allow_fetch_host or [])


def _runtimes(names: str | None, images: Any = None, gpu_layers: int | None = None) -> list[Any]:
    from nodes.runtimes import default_runtimes

    try:
        chosen = [n.strip() for n in names.split(",") if n.strip()] if names else None
        return default_runtimes(chosen, images=images, gpu_layers=gpu_layers)
    except ValueError as exc:
        raise SystemExit(f"llm-router: --runtimes: {exc}") from None


def _registry_options(parser: argparse.ArgumentParser) -> None:
    _add(
        parser, "--hf-cache-ttl", "HF_CACHE_TTL", 600.0, "seconds a Hugging Face catalog page stays cached", type=float
    )
    _add(
        parser,
        "--hf-timeout",
        "HF_TIMEOUT",
        5.0,
        "seconds to wait for Hugging Face before answering from the cache",
        type=float,
    )
    _add(
        parser,
        "--catalog",
        "CATALOG",
        None,
        "curated model catalog to use instead of the built-in supported_models.json",
    )
    _add_list(
        parser,
        "--model-root",
        "MODEL_ROOTS",
        "directory a model registered by path must lie under, symlinks resolved (repeatable); with none, "
        "registering a path is refused (`up` adds its data dir and each --model's directory)",
        metavar="DIR",
        sep=os.pathsep,
    )


def _registry(
    args: argparse.Namespace, nats_url: str | None, nats_auth: Any, extra_roots: list[Path] | None = None
) -> Any:
    """``extra_roots``: models roots besides --model-root (``up``'s own)."""
    from registry import Registry

    return Registry(
        nats_url=nats_url,
        nats_auth=nats_auth,
        catalog_path=Path(args.catalog) if args.catalog else None,
        hf_cache_ttl=float(args.hf_cache_ttl),
        hf_timeout=float(args.hf_timeout),
        replicas=args.replicas,
        model_roots=[*(args.model_root or []), *(extra_roots or [])],
    )


def _gateway(args: argparse.Namespace, nats_url: str | None, nats_auth: Any) -> Any:
    from gateway import Gateway
    from gateway.providers import Clouds, PriceTable

    clouds = Clouds.from_env(prices=PriceTable.load(args.prices), request_timeout=float(args.request_timeout))
    return Gateway(
        nats_url=nats_url,
        nats_auth=nats_auth,
        host=args.host,
        port=int(args.port),
        request_timeout=float(args.request_timeout),
        queue_size=int(args.queue_size),
        queue_timeout=float(args.queue_timeout),
        replicas=args.replicas,
        auth=not args.no_auth,
        clouds=clouds,
        history_masking=args.history_masking,
        metrics=not args.no_metrics,
        forwarded_allow_ips=args.forwarded_allow_ips,
    )


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    default = str(Path.home() / ".llm-router")
    _add(parser, "--data-dir", "DATA_DIR", default, "where NATS data, the node id and model files live")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-router", description="One OpenAI-compatible endpoint over a NATS cluster of GPU (or CPU) machines."
    )
    _add(parser, "--log-level", "LOG_LEVEL", "info", "debug, info, warning or error")
    _add(parser, "--log-format", "LOG_FORMAT", None, "console or json (default: console on a terminal)")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run NATS, registry, gateway and one node on this machine")
    _gateway_options(up)
    _data_dir_option(up)
    _nats_option(up, required=False)
    _add(up, "--nats-port", "NATS_PORT", 4222, "port of the embedded NATS server (0 picks a free one)", type=int)
    _add(
        up,
        "--nats-host",
        "NATS_HOST",
        "127.0.0.1",
        "address the embedded NATS server listens on (0.0.0.0: nodes on other machines may join, with credentials)",
    )
    up.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH",
        help="register a model under its file or folder name (repeatable): a GGUF file, a Piper voice "
        "(.onnx beside its .onnx.json), a diffusers pipeline folder or a CTranslate2 Whisper folder",
    )
    up.add_argument(
        "--demo",
        action="store_true",
        help=f"write a tiny random-weight GGUF and serve it as '{DEMO_MODEL}' (a plumbing demo: its text is random)",
    )
    _node_options(up)
    _registry_options(up)

    gateway = commands.add_parser("gateway", help="run the HTTP gateway")
    _gateway_options(gateway)
    _nats_option(gateway, required=True)

    registry = commands.add_parser("registry", help="run the model registry")
    _nats_option(registry, required=True)
    _registry_options(registry)

    node = commands.add_parser("node", help="run a node agent")
    _nats_option(node, required=True)
    _data_dir_option(node)
    _node_options(node)
    _add_switch(node, "--allow-cpu", "ALLOW_CPU", "serve on a machine without a GPU (refused otherwise)")
    _upstream_options(node)

    from .model_commands import add_model_commands

    add_model_commands(commands, _add)
    from .key_commands import add_key_commands

    add_key_commands(commands, _add)
    from .user_commands import add_user_commands

    add_user_commands(commands, _add)
    from .creds_commands import add_creds_command

    add_creds_command(commands, _add, _data_dir_option)
    from .observe_commands import add_observe_commands

    add_observe_commands(commands, _add)
    return parser


def _stop_event() -> asyncio.Event:
    """Set on SIGINT/SIGTERM. Installed before anything prints "ready", so that a signal sent as
    soon as the ready line appears stops the components cleanly instead of interrupting them."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _run_components(components: list[Any], after_start: Any = None) -> int:
    started: list[Any] = []
    stop = _stop_event()
    try:
        for component in components:
            await component.start()
            started.append(component)
        if after_start is not None:
            code = await after_start()
            if code:
                return code
        await stop.wait()
        return 0
    finally:
        for component in reversed(started):
            try:
                await component.stop()
            except Exception as exc:  # keep stopping the others
                print(f"error while stopping {type(component).__name__}: {exc}", file=sys.stderr)


class _EmbeddedNatsComponent:
    """The embedded nats-server, started again (same port, same store) if it dies."""

    def __init__(self, data_dir: Path, port: int, host: str, auth: Any) -> None:
        from broker import EmbeddedNats

        self.server = EmbeddedNats(data_dir / "nats", host=host, port=port, auth=auth)
        self.url: str | None = None
        self._keeper: asyncio.Task | None = None

    async def start(self) -> None:
        self.url = await self.server.start()
        self._keeper = asyncio.create_task(self.server.keep_running(), name="keep-nats-running")

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        await self.server.stop()


def _node_argv(args: argparse.Namespace, nats_url: str, data_dir: Path, nats_auth: Any = None) -> list[str]:
    """``llm-router node`` with ``up``'s node options: the node ``up`` runs as its own process."""
    from .nats_options import nats_auth_argv

    argv = [sys.executable, "-m", "llm_router", "--log-level", str(args.log_level)]
    if args.log_format:
        argv += ["--log-format", str(args.log_format)]
    argv += [
        "node",
        "--nats-url",
        nats_url,
        "--data-dir",
        str(data_dir),
        "--allow-cpu",
        "--parallel",
        str(args.parallel),
        "--predownload",
        str(args.predownload),
    ]
    if args.shared_models_dir:
        argv += ["--shared-models-dir", str(Path(args.shared_models_dir).expanduser())]
    for origin in args.allow_origin or []:
        argv += ["--allow-origin", origin]
    if args.runtimes:
        argv += ["--runtimes", str(args.runtimes)]
    for host in args.allow_fetch_host or []:
        argv += ["--allow-fetch-host", host]
    if args.no_remote_images:
        argv += ["--no-remote-images"]
    if args.no_share_downloads:
        argv += ["--no-share-downloads"]
    if args.replicas is not None:
        argv += ["--replicas", str(args.replicas)]
    for flag, value in (
        ("--memory-budget", args.memory_budget),
        ("--gpu-memory-budget", args.gpu_memory_budget),
        ("--keep-alive", args.keep_alive),
        ("--gpu-layers", args.gpu_layers),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (nats_auth_argv(nats_auth) if nats_auth is not None else [])


async def _up(args: argparse.Namespace) -> int:
    from events.messages import RegisterModel
    from nodes.system import persistent_node_id

    from .supervisor import SupervisedProcess

    data_dir = Path(args.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    nats_url = args.nats_url
    _runtimes(args.runtimes)  # a bad --runtimes stops `up` here, not in a child restarted forever
    node_id = persistent_node_id(data_dir / "node")
    embedded: _EmbeddedNatsComponent | None = None
    if nats_url:
        from .nats_options import nats_auth

        auths = dict.fromkeys(("gateway", "registry", "node"), nats_auth(args))  # the operator's own NATS users
    else:  # our server: every component with its role's credential, the node with its own
        from .creds_commands import embedded_credentials

        authority, auths = embedded_credentials(data_dir, node_id)
        embedded = _EmbeddedNatsComponent(data_dir, int(args.nats_port), str(args.nats_host), authority)
        await embedded.start()
        nats_url = embedded.url
    # The data dir (the demo model) and each --model's directory are models roots of `up`'s registry.
    roots = [data_dir, *(Path(p).expanduser().resolve().parent for p in args.model)]
    registry = _registry(args, nats_url, auths["registry"], roots)
    gateway = _gateway(args, nats_url, auths["gateway"])
    # The node (its engines: native code that can crash) runs as its own process, restarted if it dies.

    async def node_died(how: str) -> None:
        """Gateways drop the node now: its in-flight requests fail or go elsewhere within a second."""
        from events import codec, subjects
        from events.messages import NodeGoodbye

        goodbye = NodeGoodbye(node_id=node_id, reason=f"process died ({how})")
        await gateway.nc.publish(subjects.node_goodbye(node_id), codec.encode(goodbye))

    node = SupervisedProcess("node", _node_argv(args, nats_url, data_dir, auths["node"]), on_death=node_died)

    models: list[tuple[Path, str | None, dict[str, str]]] = [(Path(p), None, {}) for p in args.model]
    if args.demo:
        from nodes.demo_model import write_tiny_gguf

        demo_path = data_dir / "models" / "demo" / f"{DEMO_MODEL}.gguf"
        if not demo_path.exists():
            write_tiny_gguf(demo_path)
        models.append((demo_path, DEMO_MODEL, {"demo": "plumbing demo: random weights, random text"}))

    async def after_start() -> int:
        names = []
        for path, name, labels in models:
            request = RegisterModel(path=str(path), name=name, labels=labels)
            reply = await registry.register(request)
            again = reply.status == 409 and reply.record is not None and reply.record.source.path == str(path.resolve())
            if not reply.ok and not again:  # the same file registered by an earlier run is fine
                print(f"llm-router: cannot register {path}: {reply.message}", file=sys.stderr)
                return 2
            names.append(reply.record.name)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            not gateway.directory.is_live(node_id) or any(not gateway.directory.serving(n) for n in names)
        ):
            await asyncio.sleep(0.05)
        base = f"http://{args.host}:{gateway.port}"
        if gateway.auth:
            from gateway.auth import admin_key

            key_path = data_dir / "admin.key"
            secret, created = await admin_key(gateway.keys, key_path)
            if created:
                print(f"Admin API key (shown once; kept in {key_path}, mode 0600): {secret}", flush=True)
            else:
                print(f"Admin API key: in {key_path}", flush=True)
        print(f"LLM Router ready: {base}/v1  (NATS {nats_url})", flush=True)
        if embedded is not None:
            from .creds_commands import join_instructions

            print(join_instructions(data_dir, str(args.nats_host), nats_url), flush=True)
        if names:
            print("Serving: " + ", ".join(names), flush=True)
            if args.demo:
                print(
                    f"'{DEMO_MODEL}' is a plumbing demo with random weights: its answers are random text.", flush=True
                )
        else:
            print(
                "No model yet. Start again with --model PATH/TO/model.gguf, or --demo for a tiny test model.",
                flush=True,
            )
        beat = next((b for b in gateway.directory.live() if b.node_id == node_id), None)
        if beat is not None and not beat.gpus:
            print(
                "No GPU found: models run on the CPU (`up` allows that; `llm-router node` needs --allow-cpu).",
                flush=True,
            )
        print("Press Ctrl-C to stop.", flush=True)
        return 0

    try:
        return await _run_components([registry, gateway, node], after_start)
    finally:
        if embedded is not None:
            await embedded.stop()


async def _single(args: argparse.Namespace) -> int:
    from .nats_options import checked_nats_auth

    auth = checked_nats_auth(args, args.command)
    if args.command == "gateway":
        gateway = _gateway(args, args.nats_url, auth)

        async def ready() -> int:
            print(f"LLM Router gateway ready: http://{args.host}:{gateway.port}/v1", flush=True)
            return 0

        return await _run_components([gateway], ready)
    if args.command == "registry":

        async def registry_ready() -> int:
            print("LLM Router registry ready", flush=True)
            return 0

        return await _run_components([_registry(args, args.nats_url, auth)], registry_ready)
    from nodes import NodeAgent

    identity = auth.identity()  # a node credential names the node: it serves as that node
    upstream = _upstream(args)
    settings = _node_settings(args)
    if upstream is not None and not args.runtimes:
        settings["runtimes"] = []  # the upstream's models only, unless --runtimes asks for engines too
    node = NodeAgent(
        nats_url=args.nats_url,
        nats_auth=auth,
        node_id=identity.node_id if identity is not None else None,
        data_dir=Path(args.data_dir).expanduser() / "node",
        allow_cpu=bool(args.allow_cpu),
        replicas=args.replicas,
        upstream=upstream,
        **settings,
    )

    async def node_ready() -> int:
        print(
            f"LLM Router node {node.node_id} ready, serving: {', '.join(sorted(node.served)) or 'nothing yet'}",
            flush=True,
        )
        return 0

    return await _run_components([node], node_ready)


def _event_loop_runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "model":
        from .model_commands import run_model_command

        return run_model_command(args)
    if args.command == "keys":
        from .key_commands import run_key_command

        return run_key_command(args)
    if args.command == "users":
        from .user_commands import run_user_command

        return run_user_command(args)
    if args.command == "nats-creds":
        from .creds_commands import run_creds_command

        return run_creds_command(args)
    if args.command in OBSERVE_COMMANDS:
        from .observe_commands import run_observe_command

        return run_observe_command(args)
    try:  # files under the data dir of `up` and `node`, else LLM_ROUTER_LOG_DIR or ~/.llm-router/logs
        directory = logs.log_dir(getattr(args, "data_dir", None))
        logs.configure(args.log_level, args.log_format, component=args.command, directory=directory)
    except (OSError, RuntimeError) as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 1
    run = _event_loop_runner()
    try:
        if args.command == "up":
            return run(_up(args))
        return run(_single(args))
    except KeyboardInterrupt:
        return 130
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 1
