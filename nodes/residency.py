"""Which of the models a node has files for are loaded, within its memory budget.

A node keeps files for many models and loads only those the registry places on it (its
decision arrives as a placement event), when they fit. To make room for one placed with
``evict`` (a request is waiting for it), it unloads the least recently used models that have
no request running or waiting, never one that is serving; when the only models that could
make room are busy, it waits for them (bounded). A model loaded for a waiting request but not
used yet is spared for a moment (FRESH_GRACE_S), so two cold starts cannot unload each other's
model before its request reaches it. With ``--keep-alive`` an idle model is unloaded after that long,
unless it was placed for the registration's minimum replicas (``pinned``).

Every load and unload runs under the node's one sync lock, so the accounting a decision reads
is the accounting the load changes. What a model takes is estimated before and measured after
its load (nodes/memory.py); the measurement is what counts once it is loaded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from events.messages import DeviceMemory, LoadableModel, LoadedModel, ModelRecord

from . import cache
from .memory import Memory, NotEnoughMemory, Resident, gib, measured, total
from .runtimes import Runtime
from .serving import ServedModel

log = structlog.get_logger("node")

FRESH_GRACE_S = 2.0
ROOM_WAIT_S = 60.0  # how long a placed load waits for busy models to go idle
ROOM_POLL_S = 0.25


@dataclass
class Want:
    """A placement of a model on this node, not carried out yet."""

    reason: str
    evict: bool
    pinned: bool
    decision_id: str = ""
    since: float = field(default_factory=time.monotonic)


@dataclass
class Loadable:
    """A model whose files are here and whose runtime this node has."""

    record: ModelRecord
    runtime: Runtime
    path: Path
    estimate: dict[str, int]
    capabilities: list[str]
    error: str | None = None  # why its last placement could not be carried out
    failed_at: float | None = None


@dataclass(eq=False)
class Residency:
    """``attach``/``detach``: subscribe a loaded model's subjects, unsubscribe them;
    ``changed``: something a heartbeat reports changed (beat now)."""

    memory: Memory
    lock: asyncio.Lock
    _: KW_ONLY
    parallel: int
    attach: Callable[[ServedModel], Awaitable[None]]
    detach: Callable[[str], Awaitable[None]]
    changed: Callable[[], None]
    keep_alive_s: float | None = None
    gpus: bool = False
    served: dict[str, ServedModel] = field(default_factory=dict, init=False)
    loadable: dict[str, Loadable] = field(default_factory=dict, init=False)
    # loads that raised, or that can never fit
    failed: dict[str, LoadedModel] = field(default_factory=dict, init=False)
    # model: the file whose load raised (path, size, mtime)
    _broken: dict[str, tuple] = field(default_factory=dict, init=False)
    wanted: dict[str, Want] = field(default_factory=dict, init=False)
    # loads in progress: their estimates
    reserved: dict[str, dict[str, int]] = field(default_factory=dict, init=False)
    _tasks: dict[str, asyncio.Task] = field(default_factory=dict, init=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    # ------------------------------------------------------------ what is here

    def note(self, record: ModelRecord, runtime: Runtime, path: Path, estimate: dict[str, int]) -> bool:
        """The model's files are here (caller holds the lock); False when it can never fit."""
        name = record.name
        self.failed.pop(name, None)  # the caller skips a file that already failed to load (broken)
        try:
            self.memory.check(name, estimate)
        except NotEnoughMemory as exc:
            self.loadable.pop(name, None)
            self.failed[name] = LoadedModel(
                name=name,
                runtime=runtime.name,
                capabilities=record.capabilities,
                state="error",
                artifact_path=str(path),
                error=str(exc),
                estimate_bytes=estimate,
            )
            return False
        offered = getattr(runtime, "capabilities", None)  # a runtime that does not say: what the record offers
        capabilities = [c for c in record.capabilities if offered is None or c in offered]
        known = self.loadable.get(name)
        self.loadable[name] = Loadable(record, runtime, path, estimate, capabilities)
        if known is not None and known.path == path:
            self.loadable[name].error, self.loadable[name].failed_at = known.error, known.failed_at
        return True

    def broken(self, name: str, path: Path) -> bool:
        """Whether this very file failed to load (an engine error): not tried again until it changes."""
        return name in self._broken and self._broken[name] == _identity(path)

    def forget(self, name: str) -> None:
        self.loadable.pop(name, None)
        self.wanted.pop(name, None)
        self.failed.pop(name, None)
        self._broken.pop(name, None)

    def want(self, name: str, want: Want) -> None:
        self.wanted[name] = want
        entry = self.loadable.get(name)
        if entry is not None:
            entry.error = entry.failed_at = None
        served = self.served.get(name)
        if served is not None and want.pinned:
            served.pinned = True

    def residents(self) -> list[Resident]:
        now = time.monotonic()
        return [
            Resident(
                name=s.name,
                memory=s.memory,
                idle=s.in_flight == 0 and (s.used or now >= s.fresh_until),
                last_used=s.last_used,
            )
            for s in self.served.values()
            if not s.upstream  # no memory here to free; served while its server lists it
        ]

    def went_idle(self) -> None:
        self._idle.set()

    # ------------------------------------------------------------ loading

    def schedule(self, name: str, spawn: Callable[[Awaitable[None]], Any]) -> None:
        """Carry out the model's placement in a task of its own (one per model at a time)."""
        task = self._tasks.get(name)
        if task is not None and not task.done():
            return
        self._tasks[name] = spawn(self._ensure(name))

    async def _ensure(self, name: str) -> None:
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:
            self._idle.clear()
            want, entry = self.wanted.get(name), self.loadable.get(name)
            if want is None or entry is None:
                return  # withdrawn, or the files went: a download brings it back
            async with self.lock:
                if name in self.served:
                    self.served[name].pinned |= want.pinned
                    self.wanted.pop(name, None)
                    return
                entry = self.loadable.get(name)
                if entry is None:
                    return
                try:
                    room = self.memory.plan(name, entry.estimate, self.residents(), self._reserved(), evict=want.evict)
                except NotEnoughMemory as exc:
                    self._refused(name, str(exc))
                    return
                if not room.wait:
                    for victim in room.victims:
                        await self.unload_locked(victim, reason=f"least recently used idle model; room for {name}")
                    self.wanted.pop(name, None)
                    await self._load_locked(entry, want)
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._refused(name, f"{room.why}: still busy after {ROOM_WAIT_S:g} s")
                return
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=min(ROOM_POLL_S, remaining))
            except TimeoutError:
                pass

    def _reserved(self) -> dict[str, int]:
        return total(list(self.reserved.values()))

    def _refused(self, name: str, why: str) -> None:
        log.warning("model not loaded", model=name, reason=why)
        self.wanted.pop(name, None)
        entry = self.loadable.get(name)
        if entry is not None:
            entry.error, entry.failed_at = why, time.time()
        self.changed()

    async def _load_locked(self, entry: Loadable, want: Want) -> None:
        record, name = entry.record, entry.record.name
        self.reserved[name] = entry.estimate
        self.changed()
        started = time.perf_counter()
        try:
            engine, grown = await asyncio.to_thread(self._load_blocking, entry)
        except Exception as exc:
            budgets, used = self.memory.budgets(), self._used()
            room = "; ".join(
                f"{gib(budgets[d] - used.get(d, 0))} of {d} free of a {gib(budgets[d])} budget"
                for d in entry.estimate
                if d in budgets
            )
            error = f"{exc} (it needs about {', '.join(f'{gib(v)} of {k}' for k, v in entry.estimate.items())}; {room})"
            log.error("model load failed", model=name, error=error)
            self.failed[name] = LoadedModel(
                name=name,
                runtime=entry.runtime.name,
                capabilities=record.capabilities,
                state="error",
                artifact_path=str(entry.path),
                error=error,
            )
            self._broken[name] = _identity(entry.path)
            self.loadable.pop(name, None)
            return
        finally:
            self.reserved.pop(name, None)
            self.changed()
        reported = getattr(engine, "memory_bytes", None) or {}
        memory = {k: v for k, v in (reported or grown).items() if v > 0} or dict(entry.estimate)
        served = ServedModel(
            record,
            entry.runtime.name,
            engine,
            str(entry.path),
            memory=memory,
            estimate=entry.estimate,
            load_s=round(time.perf_counter() - started, 3),
            pinned=want.pinned,
        )
        served.on_idle = self.went_idle
        if want.reason != "replicas":  # a request waits for it: not unloaded before it arrives
            served.fresh_until = time.monotonic() + FRESH_GRACE_S
        self.served[name] = served
        await self.attach(served)
        log.info(
            "model loaded",
            model=name,
            runtime=entry.runtime.name,
            path=str(entry.path),
            seconds=served.load_s,
            memory={k: gib(v) for k, v in memory.items()},
            estimate={k: gib(v) for k, v in entry.estimate.items()},
            reason=want.reason,
        )

    def _load_blocking(self, entry: Loadable) -> tuple[Any, dict[str, int]]:
        with measured(self.gpus) as grown:
            engine = entry.runtime.load(
                cache.for_loading(entry.record, entry.path), str(entry.path), slots=self.parallel
            )
        return engine, grown

    def _used(self) -> dict[str, int]:
        return total([s.memory for s in self.served.values()])

    # ------------------------------------------------------------ unloading

    async def unload_locked(self, name: str, *, reason: str) -> bool:
        """Unload now (caller holds the lock): leaves the served table at once, so no new
        request reaches it; the ones already running finish first."""
        served = self.served.pop(name, None)
        if served is None:
            return False
        await self.detach(name)
        await served.close()
        log.info("model unloaded", model=name, reason=reason)
        self.changed()
        return True

    async def expire_idle(self) -> None:
        """--keep-alive: unload models idle that long, except those placed for minimum replicas."""
        if self.keep_alive_s is None:
            return
        now = time.monotonic()
        expired = [
            s.name
            for s in self.served.values()
            if not s.pinned and not s.upstream and s.in_flight == 0 and now - s.last_used >= self.keep_alive_s
        ]
        if not expired:
            return
        async with self.lock:
            for name in expired:
                served = self.served.get(name)
                if (
                    served is not None
                    and served.in_flight == 0
                    and time.monotonic() - served.last_used >= self.keep_alive_s
                ):
                    await self.unload_locked(name, reason=f"idle for {self.keep_alive_s:g} s (--keep-alive)")

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for served in list(self.served.values()):
            await served.close()
        self.served.clear()

    # ------------------------------------------------------------ heartbeat

    def memory_report(self) -> list[DeviceMemory]:
        return self.memory.report(self._used(), self._reserved())

    def models_report(self) -> list[LoadedModel]:
        return [s.report() for s in self.served.values()] + [
            m for name, m in self.failed.items() if name not in self.served
        ]

    def placed(self) -> list[str]:
        """Models placed here and not loaded yet: wanted (waiting for room or files) or loading."""
        loading = {name for name, task in self._tasks.items() if not task.done()}
        return sorted((set(self.wanted) | loading) - set(self.served))

    def loadable_report(self) -> list[LoadableModel]:
        return [
            LoadableModel(
                name=name,
                runtime=entry.runtime.name,
                capabilities=entry.capabilities,
                estimate_bytes=entry.estimate,
                error=entry.error,
                failed_at=entry.failed_at,
            )
            for name, entry in self.loadable.items()
            if name not in self.served
        ]


def _identity(path: Path) -> tuple:
    """A file as a load saw it: a file replaced since (new size or time) is tried again."""
    try:
        stat = path.stat()
    except OSError:
        return (str(path),)
    return (str(path), stat.st_size, stat.st_mtime_ns)
