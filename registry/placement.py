"""Which nodes load which model: the registry's decisions, from what the nodes' heartbeats say.

Nodes report their runtimes (and the device each computes on), each device's budget and use,
the models they have loaded (with what they take) and those whose files they have (with their
estimate). From that, three decisions:

- :func:`replicas` (every sweep): a registration's minimum replicas, placed where the model fits
  in the memory the node has free now, never by unloading anything. Without ``replicas`` a
  model is placed on every node that has its files, while it fits. A node that is already
  loading it (a decision not yet carried out) is counted, so nothing is placed twice.
- :func:`on_demand` (a gateway's request waits and no node has the model loaded): one node
  that has its files, preferring one where it fits now, then one where unloading idle models
  makes room; that node may unload its least recently used idle models (``evict``).
- :func:`scale_up` (a gateway's queue for the model keeps standing): one more node, up to the
  registration's maximum.

Candidates are ranked: files already there, a GPU for a runtime that computes on one, most
memory free after loading, fewest requests running. A node whose heartbeat reports an error
for the model (its file failed to load, it can never fit there, a download failed) is skipped.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from events.messages import ModelRecord, NodeHeartbeat, PlacementEvent, Replicas

MEMORY_FACTOR = 1.5  # a node without the files: the registration's need, or its size with this margin


@dataclass
class Pending:
    """A decision sent to a node and not carried out yet."""

    node_id: str
    need: dict[str, int]
    at: float  # wall-clock time of the decision (nodes report failures with wall-clock times)
    deadline: float  # monotonic
    decision: PlacementEvent | None = None  # what was sent, to send it again to a node that missed it
    sent: float = 0.0  # monotonic time it last went to the node
    resent: int = 0  # times sent again (the node missed it)


@dataclass
class Candidate:
    beat: NodeHeartbeat
    need: dict[str, int]
    has_files: bool
    free_after: int  # bytes left free on the tightest device after loading (negative: short)
    fits_free: bool
    fits_evicting: bool  # fits once its idle models are unloaded
    fits_budget: bool
    gpu: bool

    def rank(self) -> tuple:
        return (not self.has_files, not self.gpu, -self.free_after, self.beat.active_requests)


@dataclass
class Plan:
    """What one sweep decided, and the memory it promised on each node (for the next decision)."""

    events: list[PlacementEvent] = field(default_factory=list)
    promised: dict[str, dict[str, int]] = field(default_factory=dict)


def policy(record: ModelRecord) -> Replicas | None:
    return record.replicas


def runs(beat: NodeHeartbeat, runtime: str) -> bool:
    return any(status.name == runtime and status.available for status in beat.runtimes)


def on_gpu(beat: NodeHeartbeat, runtime: str) -> bool:
    return any(
        status.name == runtime and (status.device not in (None, "ram") or status.gpu) for status in beat.runtimes
    )


def has_error(beat: NodeHeartbeat, model: str) -> bool:
    return any(m.name == model and m.state == "error" for m in beat.models)


def need_on(beat: NodeHeartbeat, record: ModelRecord) -> dict[str, int]:
    """What the model takes on the node: its measured use, the node's estimate, else the registration's."""
    for model in beat.models:
        if model.name == record.name and model.memory_bytes:
            return dict(model.memory_bytes)
    for entry in beat.loadable:
        if entry.name == record.name and entry.estimate_bytes:
            return dict(entry.estimate_bytes)
    device = next((s.device for s in beat.runtimes if s.name == runtime_on(beat, record) and s.device), "ram")
    return {device: record.required_memory_bytes or math.ceil(record.size_bytes * MEMORY_FACTOR)}


def _free(beat: NodeHeartbeat, promised: dict[str, int]) -> dict[str, int]:
    return {d.device: d.budget_bytes - d.used_bytes - d.reserved_bytes - promised.get(d.device, 0) for d in beat.memory}


def _idle(beat: NodeHeartbeat) -> dict[str, int]:
    """Memory of the node's models with no request running: what unloading them would free."""
    freed: dict[str, int] = {}
    for model in beat.models:
        if model.state == "ready" and model.active_requests == 0:
            for device, size in model.memory_bytes.items():
                freed[device] = freed.get(device, 0) + size
    return freed


def runtime_on(beat: NodeHeartbeat, record: ModelRecord) -> str:
    """The runtime the node runs the model with: the one its report names, else the registration's."""
    entry = next((m for m in (*beat.loadable, *beat.models) if m.name == record.name), None)
    return entry.runtime if entry is not None else record.runtime


def candidate(beat: NodeHeartbeat, record: ModelRecord, promised: dict[str, int]) -> Candidate:
    need = need_on(beat, record)
    gpu = on_gpu(beat, runtime_on(beat, record))
    budgets = {d.device: d.budget_bytes for d in beat.memory}
    if not beat.memory:  # a node that reports no memory (older than accounting): assume it fits
        return Candidate(beat, need, beat.can_load(record.name), 0, True, True, True, gpu)
    free, idle = _free(beat, promised), _idle(beat)
    left = [free.get(device, -size) - size for device, size in need.items()]
    return Candidate(
        beat,
        need,
        has_files=beat.can_load(record.name),
        free_after=min(left) if left else 0,
        fits_free=all(v >= 0 for v in left),
        fits_evicting=all(free.get(d, -s) + idle.get(d, 0) >= s for d, s in need.items()),
        fits_budget=all(budgets.get(d, -1) >= s for d, s in need.items()),
        gpu=gpu,
    )


def _eligible(beats: list[NodeHeartbeat], record: ModelRecord, taken: set[str]) -> list[NodeHeartbeat]:
    return [
        beat
        for beat in beats
        if beat.state == "online"
        and beat.node_id not in taken
        and (beat.can_load(record.name) or runs(beat, record.runtime))  # its own runtime may have another name
        and not beat.serves(record.name)
        and not has_error(beat, record.name)
    ]


def _event(record: ModelRecord, chosen: list[Candidate], reason: str, *, evict: bool, pinned: bool, detail: str):
    need: dict[str, int] = {}
    for c in chosen:
        for device, size in c.need.items():
            need[device] = max(need.get(device, 0), size)
    return PlacementEvent(
        name=record.name,
        nodes=[c.beat.node_id for c in chosen],
        reason=reason,
        evict=evict,
        pinned=pinned,
        estimate_bytes=need,
        detail=detail,
        decision_id=uuid.uuid4().hex[:12],
    )


def replicas(records: list[ModelRecord], beats: list[NodeHeartbeat], pending: dict[str, list[Pending]]) -> Plan:
    """Minimum replicas where they fit in free memory; ``pending``: decisions per model in flight,
    whose memory counts as taken (a node's heartbeat shows it only once its load starts)."""
    plan = Plan()
    for entries in pending.values():
        for entry in entries:
            promised = plan.promised.setdefault(entry.node_id, {})
            for device, size in entry.need.items():
                promised[device] = promised.get(device, 0) + size
    for record in records:
        if record.state == "pending_conversion":
            continue
        wanted = policy(record)
        loaded = {b.node_id for b in beats if b.serves(record.name)}
        placing = {p.node_id for p in pending.get(record.name, [])}
        if wanted is not None and len(loaded | placing) >= wanted.min:
            continue
        options = []
        for beat in _eligible(beats, record, loaded | placing):
            option = candidate(beat, record, plan.promised.get(beat.node_id, {}))
            if option.fits_free and (option.has_files or wanted is not None):
                options.append(option)
        options.sort(key=Candidate.rank)
        count = len(options) if wanted is None else wanted.min - len(loaded | placing)
        chosen = options[:count]
        if not chosen:
            continue
        for c in chosen:
            promised = plan.promised.setdefault(c.beat.node_id, {})
            for device, size in c.need.items():
                promised[device] = promised.get(device, 0) + size
        detail = (
            "every node with its files, where it fits"
            if wanted is None
            else f"minimum {wanted.min} replica(s): {len(loaded)} loaded, {len(placing)} loading"
        )
        plan.events.append(_event(record, chosen, "replicas", evict=False, pinned=True, detail=detail))
    return plan


class Unplaceable(Exception):
    """No node can load the model now; the message says why, with the numbers."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


def on_demand(record: ModelRecord, beats: list[NodeHeartbeat], pending: list[Pending]) -> PlacementEvent:
    """One node to load a model a request waits for; it may unload idle models (raises Unplaceable)."""
    placing = {p.node_id for p in pending}
    options = [candidate(b, record, {}) for b in _eligible(beats, record, placing) if b.can_load(record.name)]
    if not options:
        raise Unplaceable(f"no live node has the files of model {record.name!r} and its {record.runtime} runtime")
    for test, how in (
        (lambda c: c.fits_free, "fits in free memory"),
        (lambda c: c.fits_evicting, "fits once idle models are unloaded"),
        (lambda c: c.fits_budget, "fits its budget once busy models finish"),
    ):
        fitting = sorted((c for c in options if test(c)), key=Candidate.rank)
        if fitting:
            return _event(record, fitting[:1], "on_demand", evict=True, pinned=False, detail=how)
    best = max(options, key=lambda c: c.free_after)
    needs = ", ".join(f"{_human(v)} of {k}" for k, v in best.need.items())
    budgets = "; ".join(
        f"node {c.beat.node_id}: " + ", ".join(f"{d.device} budget {_human(d.budget_bytes)}" for d in c.beat.memory)
        for c in options
    )
    raise Unplaceable(f"model {record.name!r} needs about {needs}, more than any node's budget ({budgets})", 507)


def confirm(record: ModelRecord, beats: list[NodeHeartbeat]) -> PlacementEvent | None:
    """Have the model loaded on the node of ``beats`` that reports it loaded (a gateway saw it
    unloaded since): the node loads it again, making room, or does nothing if it still has it."""
    if not beats:
        return None
    option = candidate(beats[0], record, {})
    return _event(record, [option], "on_demand", evict=True, pinned=False, detail="a gateway found it unloaded")


def scale_up(record: ModelRecord, beats: list[NodeHeartbeat], pending: list[Pending]) -> PlacementEvent | None:
    """One more replica for a model whose requests keep queueing, up to its maximum; None: not now."""
    wanted = policy(record)
    if wanted is None:
        return None  # already on every node with its files where it fits
    loaded = {b.node_id for b in beats if b.serves(record.name)}
    placing = {p.node_id for p in pending}
    if len(loaded | placing) >= wanted.most:
        return None
    options = [candidate(b, record, {}) for b in _eligible(beats, record, loaded | placing)]
    free = sorted((c for c in options if c.fits_free), key=Candidate.rank)
    if free:
        return _event(record, free[:1], "queueing", evict=False, pinned=False, detail="requests keep queueing")
    evicting = sorted((c for c in options if c.has_files and c.fits_evicting), key=Candidate.rank)
    if evicting:
        return _event(
            record,
            evicting[:1],
            "queueing",
            evict=True,
            pinned=False,
            detail="requests keep queueing; unloads idle models",
        )
    return None


def _human(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB" if n < 1024**3 else f"{n / 1024**3:.2f} GiB"
