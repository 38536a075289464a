"""In-memory mirrors of NATS state that several components read: registered models and live nodes.

``RegisteredModels`` mirrors the ``models`` KV bucket through a watcher. ``NodeDirectory`` keeps
the last heartbeat of every node; a node whose heartbeat is older than the TTL is not live,
so a crashed node disappears without any sweeper, and a clean shutdown's goodbye removes it
at once. It indexes which nodes have each model loaded (``serving``) and which have its files
and could load it on demand (``loadable``).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from events import codec, decode_token, storage, subjects
from events.messages import LoadedModel, ModelRecord, NodeGoodbye, NodeHeartbeat

from .buckets import current_entries, is_deleted, values_end

log = structlog.get_logger("mirrors")

LOST_MARGIN_S = 0.2  # see NodeDirectory.lost
_NONE: list = []  # what serving() answers for a model nobody serves (never mutated)


class BucketWatch(ABC):
    """Follows one KV bucket with a watcher; subclasses keep what they need of its entries.

    ``start`` reads a snapshot into fresh tables and swaps them in whole once it is read, then
    applies every change as it comes. Calling it again (``resync``, after a reconnection: the
    server may have restarted or lost its store, and revisions from before mean nothing to a
    fresh one) does the same with a new watcher, the old view answering until then.

    Every entry is decoded here as ``record_type`` (one that does not decode is logged and
    skipped), so a subclass says only what it keeps: ``_put`` a record, ``_drop`` a deletion.
    It names its bucket and record in its class line: ``class KeyRing(BucketWatch,
    bucket=storage.KV_KEYS, record_type=ApiKey, record_kind="API key record")``.

    A view made of dicts needs no more than their attribute names in ``table_attrs``: the base
    makes them, and ``_put`` and ``_drop`` get them as a tuple in that order. A subclass whose
    view is something else overrides ``_new_tables``, ``_swap_in`` and ``_live``."""

    bucket: str
    record_type: type
    record_kind: str  # names the record in the log line of one that does not decode
    table_attrs: tuple[str, ...] = ()

    def __init_subclass__(
        cls, *, bucket: str | None = None, record_type: type | None = None, record_kind: str | None = None, **kwargs
    ) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in (("bucket", bucket), ("record_type", record_type), ("record_kind", record_kind)):
            if value is not None:
                setattr(cls, name, value)

    def __init__(self) -> None:
        self.js: JetStreamContext | None = None
        self.kv = None
        self._watcher = None
        self._task: asyncio.Task | None = None
        for name in self.table_attrs:
            setattr(self, name, {})

    async def start(self, js: JetStreamContext) -> None:
        self.js = js
        self.kv = await js.key_value(self.bucket)
        watcher = await self.kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._follow(watcher, loaded), name=f"watch-{self.bucket}")
        try:
            await asyncio.wait_for(loaded, timeout=10)
        except BaseException:
            task.cancel()
            await watcher.stop()
            raise
        old_watcher, old_task = self._watcher, self._task
        self._watcher, self._task = watcher, task
        if old_task is not None:
            old_task.cancel()
            await old_watcher.stop()

    async def resync(self, js: JetStreamContext) -> None:
        await self.start(js)

    async def _follow(self, watcher, loaded: asyncio.Future) -> None:
        snapshot = self._new_tables()
        async for entry in watcher:
            if entry is not None:
                self._apply(entry, is_deleted(entry), None if loaded.done() else snapshot)
            # The end of the initial values, as the values say (nats.py's None can come first: broker.buckets)
            if not loaded.done():
                try:
                    end = await values_end(self.js, self.bucket, entry)
                except Exception as exc:  # NATS gone mid-snapshot: start() fails now, not at its timeout
                    loaded.set_exception(exc)
                    return
                if end:
                    self._swap_in(snapshot)
                    loaded.set_result(True)

    def _new_tables(self) -> Any:
        """Empty tables for a snapshot being read."""
        return tuple({} for _ in self.table_attrs)

    def _swap_in(self, tables: Any) -> None:
        """Make a fully read snapshot the live view."""
        for name, table in zip(self.table_attrs, tables, strict=True):
            setattr(self, name, table)

    def _live(self) -> Any:
        """The tables of the live view (what ``_swap_in`` made it)."""
        return tuple(getattr(self, name) for name in self.table_attrs)

    def _apply(self, entry: Any, deleted: bool, snapshot: Any) -> None:
        """One entry: into ``snapshot`` while it is being read (not None), else into the live view."""
        live = snapshot is None
        tables = self._live() if live else snapshot
        if deleted:
            self._drop(entry, tables, live)
            return
        try:
            record = codec.decode(entry.value, self.record_type)
        except msgspec.DecodeError:
            log.error(f"undecodable {self.record_kind}", key=entry.key)
            return
        self._put(entry, record, tables, live)

    @abstractmethod
    def _put(self, entry: Any, record: Any, tables: Any, live: bool) -> None:
        """Keep a decoded record in ``tables`` (the live view's when ``live``)."""

    @abstractmethod
    def _drop(self, entry: Any, tables: Any, live: bool) -> None:
        """Forget what a deleted (or purged) entry's key held."""

    async def stop(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()


class RegisteredModels(BucketWatch, bucket=storage.KV_MODELS, record_type=ModelRecord, record_kind="model record"):
    """The ``models`` KV bucket in memory, kept current by a watcher (with each entry's revision)."""

    table_attrs = ("records", "revisions")
    records: dict[str, ModelRecord]
    revisions: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self._deleted: set[str] = set()  # forgotten before the watcher saw the purge

    def _swap_in(self, tables: tuple[dict[str, ModelRecord], dict[str, int]]) -> None:
        super()._swap_in(tables)
        self._deleted.clear()

    def _drop(self, entry: Any, tables: Any, live: bool) -> None:
        name = decode_token(entry.key)
        if not live:
            tables[0].pop(name, None)
            tables[1].pop(name, None)
        self.forget(name)
        self._deleted.discard(name)

    def _put(self, entry: Any, record: ModelRecord, tables: Any, live: bool) -> None:
        if not live:
            tables[0][record.name], tables[1][record.name] = record, entry.revision
        elif record.name not in self._deleted and entry.revision >= self.revisions.get(record.name, 0):
            self.records[record.name] = record
            self.revisions[record.name] = entry.revision

    def get(self, name: str) -> ModelRecord | None:
        return self.records.get(name)

    def remember(self, record: ModelRecord, revision: int) -> None:
        """Apply a write this process just made, before the watcher reports it."""
        if revision >= self.revisions.get(record.name, 0):
            self.records[record.name] = record
            self.revisions[record.name] = revision
            self._deleted.discard(record.name)

    def forget(self, name: str) -> None:
        """Drop a model now (its deletion was confirmed), before the watcher reports it."""
        if self.records.pop(name, None) is not None:
            self._deleted.add(name)
        self.revisions.pop(name, None)


@dataclass
class NodeView:
    beat: NodeHeartbeat
    seen: float  # monotonic time the heartbeat was received
    # The beat before ``beat``: (when received, the request ids it listed, None if not listed).
    earlier: tuple[float, frozenset[str] | None] | None = None


class NodeDirectory:
    def __init__(self, ttl: float = storage.NODE_TTL_S) -> None:
        self.ttl = ttl
        self._listeners: list[Callable[[], None]] = []
        self._nodes: dict[str, NodeView] = {}
        self._index: dict[tuple[str, str | None], list[NodeHeartbeat]] = {}
        self._loadable: dict[tuple[str, str | None], list[NodeHeartbeat]] = {}
        self._slots: dict[tuple[str, str], int] = {}
        self._announced: dict[str, LoadedModel] = {}  # upstream models, by name (one report of each)
        self._upstream_only: set[str] = set()  # announced, and no node has them from the registry
        self._unloaded: set[tuple[str, str]] = set()  # (node, model) a node said it no longer has loaded
        self._index_until = 0.0  # monotonic time the index must be rebuilt by
        self._subs: list = []

    async def start(self, nc: Client, js: JetStreamContext) -> None:
        self._subs.append(await nc.subscribe(subjects.NODE_HEARTBEAT_ALL, cb=self._on_heartbeat))
        self._subs.append(await nc.subscribe(subjects.NODE_GOODBYE_ALL, cb=self._on_goodbye))
        await self.resync(js)

    async def resync(self, js: JetStreamContext) -> None:
        """Read each live node's last beat from the ``nodes`` bucket: at start (no need to wait
        for the next beat) and after a reconnection, where a node's beat-at-once can reach the
        new server before our subscription does; without it, a request held by a node that lost
        its reply is found lost one heartbeat interval later."""
        changed = False
        for entry in await current_entries(js, storage.KV_NODES):
            try:
                beat = codec.decode(entry.value, NodeHeartbeat)
            except msgspec.DecodeError:
                log.warning("undecodable heartbeat in the nodes bucket", key=entry.key)
                continue
            known = self._nodes.get(beat.node_id)
            if known is not None and known.beat.sent_at >= beat.sent_at:
                continue  # received already: read again, one beat would count as two (see lost)
            age = max(0.0, time.time() - beat.sent_at)
            self._remember(beat, time.monotonic() - age)
            changed = True
        if changed:
            self._changed()

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    def _remember(self, beat: NodeHeartbeat, seen: float) -> None:
        self._index_until = 0.0
        if self._unloaded:
            self._unloaded = {key for key in self._unloaded if key[0] != beat.node_id}
        known = self._nodes.get(beat.node_id)
        if known is None:
            self._nodes[beat.node_id] = NodeView(beat, seen)
        elif known.beat.sent_at <= beat.sent_at:
            previous = known.beat.requests
            earlier = (known.seen, frozenset(previous) if previous is not None else None)
            self._nodes[beat.node_id] = NodeView(beat, seen, earlier)

    def lost(self, node_id: str, request_id: str, sent: float) -> bool:
        """Whether the node's last two heartbeats, both received at least LOST_MARGIN_S (0.2 s) after
        ``sent`` (monotonic), list its requests and not this one: it finished it (the reply is
        lost) or never got it. The margin: a node beats at once on some events (a load, a
        drain), and a beat built before the request arrived must not count."""
        view = self._nodes.get(node_id)
        if view is None or view.beat.requests is None or view.earlier is None:
            return False
        seen_before, before = view.earlier
        return (
            seen_before > sent + LOST_MARGIN_S
            and before is not None
            and request_id not in before
            and request_id not in view.beat.requests
        )

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            self._remember(codec.decode(msg.data, NodeHeartbeat), time.monotonic())
        except msgspec.DecodeError:
            log.warning("undecodable heartbeat", subject=msg.subject)
            return
        self._changed()

    async def _on_goodbye(self, msg: Msg) -> None:
        try:
            self._nodes.pop(codec.decode(msg.data, NodeGoodbye).node_id, None)
            self._index_until = 0.0
        except msgspec.DecodeError:
            log.warning("undecodable goodbye", subject=msg.subject)
            return
        self._changed()

    def note_state(self, node_id: str, state: str) -> None:
        """Apply a state a node just told us (drain, resume) before its next heartbeat says it."""
        view = self._nodes.get(node_id)
        if view is not None and state:
            view.beat = msgspec.structs.replace(view.beat, state=state)
            self._index_until = 0.0

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every heartbeat or goodbye (lifecycle, queued requests)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def note_unloaded(self, node_id: str, model: str) -> None:
        """A node answered ``model_not_loaded``: not serving it, until its next heartbeat says."""
        self._unloaded.add((node_id, model))
        self._index_until = 0.0

    def forget(self, node_id: str) -> None:
        """Drop a node that failed to answer (no responders); its next heartbeat restores it."""
        self._nodes.pop(node_id, None)
        self._index_until = 0.0

    def known(self) -> list[tuple[NodeHeartbeat, bool, float]]:
        """Every node heard from and not said goodbye: (last heartbeat, live, seconds since it)."""
        now = time.monotonic()
        return [(view.beat, now - view.seen <= self.ttl, now - view.seen) for view in self._nodes.values()]

    def live(self) -> list[NodeHeartbeat]:
        cutoff = time.monotonic() - self.ttl
        return [view.beat for view in self._nodes.values() if view.seen >= cutoff]

    def last_beat(self, node_id: str) -> tuple[NodeHeartbeat, float] | None:
        """The node's latest heartbeat and when (monotonic) it was received; None: not known."""
        view = self._nodes.get(node_id)
        return (view.beat, view.seen) if view is not None else None

    def is_live(self, node_id: str) -> bool:
        view = self._nodes.get(node_id)
        return view is not None and view.seen >= time.monotonic() - self.ttl

    def serving(self, model: str, capability: str | None = None) -> list[NodeHeartbeat]:
        """Live, non-draining nodes with ``model`` ready (for ``capability`` when given).

        Asked several times per request, answered from an index rebuilt when a node changes
        (heartbeat, goodbye, drain) or when the first heartbeat in it expires."""
        if time.monotonic() >= self._index_until:
            self._rebuild_index()
        return self._index.get((model, capability), _NONE)

    def announced(self) -> dict[str, LoadedModel]:
        """Models live nodes serve without a registry record (an upstream server's, announced in
        their heartbeats), by name: the gateway lists and serves them while a node announces them."""
        if time.monotonic() >= self._index_until:
            self._rebuild_index()
        return self._announced

    def placeable(self, model: str) -> bool:
        """Whether the registry places ``model``: False for one only upstream nodes announce (their
        server's model: no registry record, no files to load elsewhere, nothing to ask for)."""
        if time.monotonic() >= self._index_until:
            self._rebuild_index()
        return model not in self._upstream_only

    def loadable(self, model: str, capability: str | None = None) -> list[NodeHeartbeat]:
        """Live, non-draining nodes that have the files of ``model`` and could load it on demand."""
        if time.monotonic() >= self._index_until:
            self._rebuild_index()
        return self._loadable.get((model, capability), _NONE)

    def slots(self, node_id: str, model: str) -> int:
        """How many requests for ``model`` the node runs at once (from its last heartbeat)."""
        if time.monotonic() >= self._index_until:
            self._rebuild_index()
        return self._slots.get((node_id, model), 1)

    def _rebuild_index(self) -> None:
        now = time.monotonic()
        index: dict[tuple[str, str | None], list[NodeHeartbeat]] = {}
        loadable: dict[tuple[str, str | None], list[NodeHeartbeat]] = {}
        slots: dict[tuple[str, str], int] = {}
        announced: dict[str, LoadedModel] = {}
        until = float("inf")
        for view in self._nodes.values():
            expires = view.seen + self.ttl
            if expires < now:
                continue
            beat = view.beat
            for model in beat.models:
                slots[(beat.node_id, model.name)] = model.parallel or beat.max_parallel or 1
            if beat.state != "online":
                continue
            until = min(until, expires)
            for model in beat.models:
                if not model.servable:
                    continue
                unloaded = (beat.node_id, model.name) in self._unloaded
                if model.origin == "upstream":
                    # Announced by the node itself, never placed by the registry: not loadable on
                    # demand; one the node just said it no longer serves waits for its next beat.
                    announced.setdefault(model.name, model)
                    if unloaded:
                        continue
                table = loadable if unloaded else index
                for key in ((model.name, None), *((model.name, c) for c in model.capabilities)):
                    entries = table.setdefault(key, [])
                    if not entries or entries[-1] is not beat:
                        entries.append(beat)
            for entry in beat.loadable:
                for key in ((entry.name, None), *((entry.name, c) for c in entry.capabilities)):
                    entries = loadable.setdefault(key, [])
                    if not entries or entries[-1] is not beat:
                        entries.append(beat)
        self._index, self._loadable, self._slots, self._announced = index, loadable, slots, announced
        self._upstream_only = {
            name
            for name in announced
            if (name, None) not in loadable
            and not any(m.origin != "upstream" for b in index.get((name, None), ()) for m in b.models if m.name == name)
        }
        self._index_until = until
