"""A JetStream cluster of nats-server processes on this machine, for tests, bench and trying it out.

Production clusters run on separate machines from a config like the one in docs/cluster.md;
this launcher writes the same configs (``server_name``, ``cluster { name, listen, routes }``,
``jetstream { store_dir }``) with free local ports, starts the servers and waits until the
JetStream meta leader is elected, because streams cannot be created before that.

``python -m broker.cluster DIR`` runs one in the foreground and prints its URLs.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import structlog

from .embedded import ClusterMember, EmbeddedNats

log = structlog.get_logger("broker.cluster")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now (held open together so that none repeats)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _get_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class NatsCluster:
    """``size`` clustered nats-servers; ports are fixed at construction, so a restarted member
    comes back on the same URL and data dir and rejoins."""

    def __init__(self, data_dir: Path, size: int = 3, *, host: str = "127.0.0.1", name: str = "llm-router") -> None:
        self.data_dir = Path(data_dir)
        ports = free_ports(2 * size, host)
        client_ports, route_ports = ports[:size], ports[size:]
        self.servers: list[EmbeddedNats] = []
        for i in range(size):
            routes = [f"nats-route://{host}:{p}" for j, p in enumerate(route_ports) if j != i]
            member = ClusterMember(
                server_name=f"n{i + 1}", cluster_port=route_ports[i], routes=routes, cluster_name=name
            )
            self.servers.append(
                EmbeddedNats(self.data_dir / member.server_name, host=host, port=client_ports[i], cluster=member)
            )

    @property
    def urls(self) -> list[str]:
        return [f"nats://{s.host}:{s.port}" for s in self.servers]

    @property
    def url(self) -> str:
        """All members, comma-separated: what ``--nats-url`` takes."""
        return ",".join(self.urls)

    def names(self) -> list[str]:
        return [s.cluster.server_name for s in self.servers]  # type: ignore[union-attr]

    def index(self, server_name: str) -> int:
        return self.names().index(server_name)

    def start_sync(self, timeout: float = 30.0) -> str:
        try:
            for server in self.servers:
                server.start_sync()
            self.wait_ready(timeout)
        except BaseException:
            self.stop_sync()
            raise
        return self.url

    def wait_ready(self, timeout: float = 30.0, members: list[int] | None = None) -> None:
        """Until every running member (or those in ``members``) knows the JetStream meta leader
        and reports healthy; before that, creating a stream fails or times out."""
        indexes = members if members is not None else [i for i, s in enumerate(self.servers) if s.running]
        deadline = time.monotonic() + timeout
        waiting: dict[int, str] = {}
        while time.monotonic() < deadline:
            waiting = {}
            for i in indexes:
                reason = self._not_ready(self.servers[i])
                if reason:
                    waiting[i] = reason
            if not waiting:
                log.info("nats cluster ready", url=self.url, meta_leader=self.meta_leader())
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"nats cluster not ready within {timeout}s: "
            + "; ".join(f"{self.servers[i].cluster.server_name}: {why}" for i, why in waiting.items())
        )  # type: ignore[union-attr]

    @staticmethod
    def _not_ready(server: EmbeddedNats) -> str | None:
        if not server.monitor_url:
            return "no monitoring endpoint yet"
        try:
            jsz = _get_json(server.monitor_url + "/jsz")
        except (OSError, urllib.error.URLError, json.JSONDecodeError) as exc:
            return f"/jsz: {exc}"
        if not (jsz.get("meta_cluster") or {}).get("leader"):
            return "no JetStream meta leader yet"
        try:
            _get_json(server.monitor_url + "/healthz")
        except urllib.error.HTTPError as exc:  # 503 with the reason in the body
            return f"/healthz: {exc.read().decode(errors='replace')[:200]}"
        except (OSError, urllib.error.URLError) as exc:
            return f"/healthz: {exc}"
        return None

    def meta_leader(self) -> str | None:
        for server in self.servers:
            if server.running and server.monitor_url:
                try:
                    return (_get_json(server.monitor_url + "/jsz").get("meta_cluster") or {}).get("leader")
                except (OSError, json.JSONDecodeError):
                    continue
        return None

    def connections(self, index: int) -> list[str]:
        """Names of the clients connected to one member (``gateway``, ``node-…``), from /connz."""
        server = self.servers[index]
        if not server.running or not server.monitor_url:
            return []
        connz = _get_json(server.monitor_url + "/connz?limit=1024")
        return [c.get("name", "") for c in connz.get("connections") or []]

    def kill(self, index: int) -> None:
        """kill -9 one member."""
        log.warning("killing nats server", server=self.servers[index].cluster.server_name)  # type: ignore[union-attr]
        self.servers[index].kill_sync()

    def restart(self, index: int, timeout: float = 30.0) -> None:
        self.servers[index].start_sync()
        self.wait_ready(timeout, members=[index])

    def stop_sync(self) -> None:
        for server in self.servers:
            server.stop_sync()


def main(argv: list[str] | None = None) -> int:
    """Run a local cluster until Ctrl-C: ``python -m broker.cluster DIR [SIZE]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m broker.cluster DATA_DIR [SIZE]", file=sys.stderr)
        return 2
    cluster = NatsCluster(Path(argv[0]), int(argv[1]) if len(argv) > 1 else 3)
    url = cluster.start_sync()
    for server in cluster.servers:
        print(
            f"{server.cluster.server_name}: nats://{server.host}:{server.port}  monitor {server.monitor_url}  "  # type: ignore[union-attr]
            f"config {server.data_dir / 'nats-server.conf'}",
            flush=True,
        )
    print(f"NATS cluster ready: --nats-url {url}", flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        cluster.stop_sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
