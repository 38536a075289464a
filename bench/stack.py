"""Runs router components for the overhead benchmark, each as its own process.

    python bench/stack.py --role registry --nats-url URL --model-path tiny.gguf --model-name bench-tiny
    python bench/stack.py --role node     --nats-url URL --data-dir DIR --parallel 64 [--delay-ms 20]
    python bench/stack.py --role gateway  --nats-url URL --port 0 [--queue-size 100 --queue-timeout 60]
    python bench/stack.py --role up       ...   # registry + gateway + node in one process

The components are the real ones (``registry.Registry``, ``gateway.Gateway``,
``nodes.NodeAgent``); the node gets ``runtimes=[MinimalRuntime()]`` so that the GGUF the
registry registers is served by the instant engine of ``bench/minimal_engine.py`` (or, with
``--delay-ms``, by that engine taking a fixed service time per request). Each
process prints one ``READY {json}`` line on stdout once started, then runs until SIGTERM or
SIGINT (or until its parent dies), like ``llm-router``. The event loop is uvloop when it is
installed, as in the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from minimal_engine import MinimalRuntime  # noqa: E402

from llm_router import logs  # noqa: E402
from llm_router.cli import _event_loop_runner  # noqa: E402


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _main(args: argparse.Namespace) -> int:
    from events.messages import RegisterModel
    from gateway import Gateway
    from nodes import NodeAgent
    from registry import Registry

    roles = ["registry", "gateway", "node"] if args.role == "up" else [args.role]
    components: list = []
    gateway = registry = None
    if "registry" in roles:
        # Its models root: the directory of the one file it registers (--model-path).
        roots = [Path(args.model_path).resolve().parent] if args.model_path else []
        registry = Registry(nats_url=args.nats_url, model_roots=roots)
        components.append(registry)
    if "gateway" in roles:
        gateway = Gateway(
            nats_url=args.nats_url,
            host="127.0.0.1",
            port=args.port,
            queue_size=args.queue_size,
            queue_timeout=args.queue_timeout,
            auth=args.auth,  # off unless asked: bench/gateway_cpu.py measures what keys cost
            metrics=not args.no_metrics,  # bench/gateway_cpu.py --metrics-off measures what metrics cost
        )
        components.append(gateway)
    if "node" in roles:
        components.append(
            NodeAgent(
                nats_url=args.nats_url,
                data_dir=Path(args.data_dir),
                runtimes=[MinimalRuntime(None if args.delay_ms is None else args.delay_ms / 1000)],
                parallel=args.parallel,
                node_id=args.node_id,
            )
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    started: list = []
    try:
        for component in components:
            await component.start()
            started.append(component)
        info: dict = {"role": args.role}
        if registry is not None and args.model_path:
            reply = await registry.register(RegisterModel(path=args.model_path, name=args.model_name))
            if not reply.ok:
                print(f"cannot register {args.model_path}: {reply.message}", file=sys.stderr, flush=True)
                return 2
            info["model"] = reply.record.name
        if gateway is not None:
            info["port"] = gateway.port
            if args.auth:  # a key for the load generator (a benchmark's throwaway data dir)
                from gateway.auth import admin_key

                info["api_key"], _ = await admin_key(gateway.keys, Path(args.data_dir or ".") / "bench-admin.key")
        print("READY " + json.dumps(info), flush=True)
        await stop.wait()
        return 0
    finally:
        for component in reversed(started):
            try:
                await asyncio.wait_for(component.stop(), 15)
            except Exception as exc:  # keep stopping the others
                print(f"error while stopping {type(component).__name__}: {exc!r}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", required=True, choices=["registry", "gateway", "node", "up"])
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--port", type=int, default=0, help="gateway HTTP port (0: a free one)")
    parser.add_argument("--queue-size", type=int, default=100, help="gateway: requests that may wait (then 429)")
    parser.add_argument("--auth", action="store_true", help="gateway: API keys on (READY carries a key)")
    parser.add_argument("--no-metrics", action="store_true", help="gateway: no Prometheus metrics (nothing counted)")
    parser.add_argument(
        "--queue-timeout", type=float, default=60.0, help="gateway: seconds a request may wait (then 504)"
    )
    parser.add_argument("--data-dir", default=None, help="node data dir")
    parser.add_argument("--parallel", type=int, default=64, help="node slots for the model")
    parser.add_argument("--node-id", default="bench-node")
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=None,
        help="fixed engine service time per chat/completion request, in ms [$BENCH_ENGINE_DELAY_MS, else 0]",
    )
    parser.add_argument("--model-path", default=None, help="GGUF file the registry registers")
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    if args.role in ("node", "up") and not args.data_dir:
        parser.error("--data-dir is required for the node")
    _die_with_parent()
    logs.configure(args.log_level, "json")
    return _event_loop_runner()(_main(args))


if __name__ == "__main__":
    sys.exit(main())
