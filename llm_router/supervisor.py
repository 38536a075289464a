"""A child process that is started again when it dies, with backoff: how ``up`` isolates engines.

Engines are native code (llama.cpp, CTranslate2, onnxruntime, torch): a segfault or an OOM kill
takes their whole process. ``up`` therefore runs the node agent as a child (``llm-router node``)
and keeps the gateway and registry in its own process, so a crashed engine costs the requests
running on it, never the HTTP endpoint. The child is tied to us with PR_SET_PDEATHSIG, so even
a killed ``up`` leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("supervisor")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a child that ran this long is restarted with the shortest backoff again


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SupervisedProcess:
    """``start()`` runs ``argv`` and watches it; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        stop_timeout: float = 40.0,
        on_death: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """``on_death(how)`` runs when the child dies unasked, before it is restarted (``up``
        tells the gateways at once that the node is gone, rather than after its heartbeat TTL)."""
        self.on_death = on_death
        self.name = name
        self.argv = argv
        self.stop_timeout = stop_timeout
        self.restarts = 0
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.create_task(self._watch(), name=f"supervise-{self.name}")

    async def _spawn(self) -> None:
        # stdout and stderr are ours: the child's log lines appear in ``up``'s output as they are.
        # Its own session: a Ctrl-C at the terminal reaches `up` only, which stops the child in
        # order (a child that got SIGINT too would look dead and be restarted mid-shutdown).
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent, start_new_session=True
        )
        log.info("process started", process=self.name, pid=self.process.pid)

    async def _watch(self) -> None:
        backoff = BACKOFF_START_S
        while True:
            started = time.monotonic()
            assert self.process is not None
            code = await self.process.wait()
            if self._stopping:
                return
            if time.monotonic() - started >= HEALTHY_AFTER_S:
                backoff = BACKOFF_START_S
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            if self.on_death is not None:
                try:
                    await self.on_death(how)
                except Exception:
                    log.exception("on_death failed", process=self.name)
            log.error(
                "process died; restarting it", process=self.name, pid=self.process.pid, how=how, restart_in_s=backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)
            if self._stopping:
                return
            self.restarts += 1
            await self._spawn()

    async def stop(self) -> None:
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning("process did not stop in time; killing it", process=self.name, pid=process.pid)
                process.kill()
                await process.wait()
        if self._task is not None:
            self._task.cancel()
