"""Components started as their own processes, their output captured: one harness for the test
suite (``tests/conftest.py``) and the benchmarks (``bench/``).

:class:`Process` runs one command (``llm-router ...`` or a script such as ``bench/stack.py``),
reads its output on a thread and waits for a line (``wait_for``) or for the ``READY {json}``
line ``bench/stack.py`` prints (``ready``). :class:`Stack` is the processes of one deployment
over one NATS URL, started in order and stopped in reverse; tests and benchmarks add what they
need on top (registrations, HTTP readiness checks) but start and stop components only here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
BENCH_STACK = ROOT / "bench" / "stack.py"  # registry, gateway or node roles; nodes with an instant engine


def cli(*args: str) -> list[str]:
    """The ``llm-router`` command line with this interpreter."""
    return [sys.executable, "-m", "llm_router", *args]


def bench_stack(*args: str) -> list[str]:
    """A ``bench/stack.py`` command line (``--role registry|gateway|node|up ...``)."""
    return [sys.executable, str(BENCH_STACK), *args]


def _name(argv: list[str]) -> str:
    """``registry`` for ``python -m llm_router registry ...``, ``stack.py`` for a script."""
    if argv[1:3] == ["-m", "llm_router"] and len(argv) > 3:
        return argv[3]
    return Path(argv[1] if len(argv) > 1 else argv[0]).name


class Process:
    """One process, its output (stdout and stderr together, or stderr to ``log``) kept in lines.

    Every one started is in ``Process.started``, so a harness can stop whatever a failure left
    running (tests/conftest.py does after each test).
    """

    started: ClassVar[list[Process]] = []

    def __init__(
        self,
        argv: list[str],
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
    ) -> None:
        self.argv = argv
        self.name = name or _name(argv)
        self.lines: list[str] = []
        self.info: dict[str, Any] = {}  # the READY line's JSON, once seen
        self._cond = threading.Condition()
        self._eof = False  # the pump has read all the output (the process may end well before)
        self._log: IO[bytes] | None = log.open("wb") if log is not None else None
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log is not None else subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=str(cwd or ROOT),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        threading.Thread(target=self._pump, daemon=True, name=f"output-{self.name}").start()
        Process.started.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        try:
            for line in self.popen.stdout:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """The first output line matching ``pattern``; AssertionError with the output if none
        comes within ``timeout`` or the process ends first."""
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
                if remaining <= 0 or self._eof and seen == len(self.lines):
                    raise AssertionError(f"{self.name}: no line matching {pattern!r}; output:\n{self.tail()}")
                self._cond.wait(min(remaining, 0.2))

    def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """The JSON of ``bench/stack.py``'s ``READY {...}`` line."""
        self.info = json.loads(self.wait_for(r"^READY (\{.*\})$", timeout).group(1))
        return self.info

    def output(self) -> str:
        """What it printed so far; all of it once it has ended (its last lines may still be in
        the pipe when ``popen.wait()`` returns)."""
        with self._cond:
            if self.popen.poll() is not None:
                self._cond.wait_for(lambda: self._eof, timeout=5)
            return "\n".join(self.lines)

    def tail(self, lines: int = 40) -> str:
        """The last output lines, and the end of the stderr log when there is one."""
        with self._cond:
            text = "\n".join(self.lines[-lines:])
        if self._log is not None:
            self._log.flush()
            text += "\n" + Path(self._log.name).read_text(errors="replace")[-3000:]
        return text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal it and wait; a process that does not stop in time is killed and reported."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not stop within {timeout}s:\n{self.tail()}") from None
        finally:
            if self._log is not None and self.popen.poll() is not None:
                self._log.close()
        return code

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()


READY_LINES = {"registry": r"registry ready", "gateway": r"gateway ready: (http://\S+)/v1", "node": r"node (\S+) ready"}


class Stack:
    """The processes of one deployment over one NATS URL: started in order, stopped in reverse."""

    def __init__(self, nats_url: str, workdir: Path, *, env: dict[str, str] | None = None) -> None:
        self.nats_url = nats_url
        self.workdir = workdir
        self.env = env
        self.processes: list[Process] = []

    def launch(self, argv: list[str], *, name: str | None = None, log: bool = False, **kw: Any) -> Process:
        """Any command, as part of this stack. ``log``: stderr to ``<workdir>/<name>.log``
        instead of mixed into the output lines."""
        path = self.workdir / f"{name}.log" if log and name else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        proc = Process(argv, name=name, env={**(self.env or {}), **kw.pop("env", {})}, log=path, **kw)
        self.processes.append(proc)
        return proc

    # ------------------------------------------------------------ llm-router components

    def start(self, role: str, *args: str, name: str | None = None, wait: bool = True) -> Process:
        """``llm-router registry|gateway|node`` on this NATS (a gateway on a free port, a node
        with its own data dir under the workdir). ``wait=False``: start it and return, to start
        several at once and :meth:`wait_ready` for each."""
        name = name or role
        if role == "gateway":
            args = ("--port", "0", *args)
        elif role == "node":
            args = ("--data-dir", str(self.workdir / name), "--allow-cpu", *args)
        proc = self.launch(cli(role, "--nats-url", self.nats_url, *args), name=name)
        proc.role = role
        if wait:
            self.wait_ready(proc)
        return proc

    @staticmethod
    def wait_ready(proc: Process, timeout: float = 30.0) -> Process:
        """Until it says it is ready: a gateway's URL is then ``proc.url``, a node's id ``proc.node_id``."""
        match = proc.wait_for(READY_LINES[proc.role], timeout)
        if proc.role == "gateway":
            proc.url = match.group(1)
        elif proc.role == "node":
            proc.node_id = match.group(1)
        return proc

    # ------------------------------------------------------------ bench/stack.py roles

    def start_bench(
        self, role: str, *args: str, name: str | None = None, log: bool = True, timeout: float = 60.0
    ) -> Process:
        """A ``bench/stack.py`` role (``registry``, ``gateway``, ``node`` with the instant engine,
        or ``up``) on this NATS, once it printed READY (``proc.info``: its port, node id...).
        ``log``: its stderr to a file (a benchmark's processes log more than anyone reads)."""
        argv = bench_stack("--role", role, "--nats-url", self.nats_url, *args)
        proc = self.launch(argv, name=name or role, log=log)
        proc.ready(timeout)
        return proc

    def start_bench_node(
        self, node_id: str, *args: str, parallel: int = 1, delay_ms: float | None = None, log: bool = True
    ) -> Process:
        """An instant-engine node (``delay_ms``: it holds each slot that long; a cancel ends it)."""
        delay = ("--delay-ms", f"{delay_ms:g}") if delay_ms is not None else ()
        argv = ("--data-dir", str(self.workdir / node_id), "--parallel", str(parallel), "--node-id", node_id)
        proc = self.start_bench("node", *argv, *delay, *args, name=node_id, log=log)
        proc.node_id = node_id
        return proc

    def stop(self) -> None:
        """Every process still running, last started first."""
        errors = []
        for proc in reversed(self.processes):
            if proc.running:
                try:
                    proc.stop()
                except AssertionError as exc:  # killed; keep stopping the others, then say so
                    errors.append(str(exc))
        if errors:
            raise AssertionError("\n".join(errors))
