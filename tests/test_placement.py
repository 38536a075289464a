"""Placement: the registry alone decides which nodes load which model.

The decisions (registry/placement.py) from heartbeats made up here, then real processes: a
registration with two replicas ends up loaded on two of three nodes, the decision is an event
``nats sub 'placement.>'`` shows and the admin API reports, and a queue that keeps standing
gets one more replica, up to the registration's maximum.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import msgspec
import nats
import pytest
from conftest import Stack, requires_llama, wait_until

from broker.mirrors import NodeDirectory
from events.messages import (
    DeviceMemory,
    LoadableModel,
    LoadedModel,
    ModelRecord,
    ModelSource,
    NodeHeartbeat,
    Replicas,
    RuntimeStatus,
)
from registry import placement

MiB = 1024**2


def record(name: str = "m", replicas: Replicas | None = None) -> ModelRecord:
    return ModelRecord(
        name=name,
        format="gguf",
        runtime="llama_cpp",
        capabilities=["chat"],
        source=ModelSource(kind="path", path="/m.gguf"),
        size_bytes=10 * MiB,
        replicas=replicas,
    )


def beat(
    node: str,
    *,
    budget: int = 100,
    used: dict[str, tuple[int, int]] | None = None,
    files: dict[str, int] | None = None,
    gpu: bool = False,
) -> NodeHeartbeat:
    """``used``: loaded models (MiB, active requests); ``files``: loadable models (MiB estimate)."""
    device = "gpu0" if gpu else "ram"
    loaded = [
        LoadedModel(
            name=name,
            runtime="llama_cpp",
            capabilities=["chat"],
            artifact_bytes=1,
            memory_bytes={device: mib * MiB},
            active_requests=active,
        )
        for name, (mib, active) in (used or {}).items()
    ]
    return NodeHeartbeat(
        node_id=node,
        hostname=node,
        started_at=0,
        sent_at=0,
        interval_s=2,
        runtimes=[
            RuntimeStatus(
                name="llama_cpp", available=True, device=device, backend="cuda" if gpu else "cpu", capabilities=["chat"]
            )
        ],
        models=loaded,
        loadable=[
            LoadableModel(name=name, runtime="llama_cpp", capabilities=["chat"], estimate_bytes={device: mib * MiB})
            for name, mib in (files or {}).items()
        ],
        memory=[
            DeviceMemory(
                device=device,
                capacity_bytes=budget * 2 * MiB,
                budget_bytes=budget * MiB,
                used_bytes=sum(mib for mib, _ in (used or {}).values()) * MiB,
            )
        ],
    )


def test_every_node_with_the_files_gets_a_model_without_replicas_while_it_fits() -> None:
    beats = [
        beat("a", files={"m": 30, "n": 30, "o": 50}),
        beat("b", files={"m": 30}),
        beat("c"),  # no files: not without a replicas setting
    ]
    plan = placement.replicas([record("m"), record("n"), record("o")], beats, {})
    placed = {e.name: e.nodes for e in plan.events}
    assert placed == {"m": ["a", "b"], "n": ["a"]}  # o no longer fits on a after m and n (30 + 30 + 50 > 100)
    assert all(e.pinned and not e.evict for e in plan.events)


def test_minimum_replicas_count_what_is_loaded_and_what_is_being_loaded() -> None:
    wanted = record("m", Replicas(min=2))
    beats = [beat("a", used={"m": (30, 0)}), beat("b", files={"m": 30}), beat("c", files={"m": 30})]
    (event,) = placement.replicas([wanted], beats, {}).events
    assert len(event.nodes) == 1 and event.nodes[0] in ("b", "c")
    pending = {"m": [placement.Pending(event.nodes[0], {"ram": 30 * MiB}, time.time(), time.monotonic() + 60)]}
    assert placement.replicas([wanted], beats, pending).events == []  # one loaded, one loading: enough


def test_gpu_nodes_come_first_for_a_runtime_that_computes_on_one() -> None:
    beats = [beat("cpu", files={"m": 10}, budget=1000), beat("gpu", files={"m": 10}, gpu=True)]
    (event,) = placement.replicas([record("m", Replicas(min=1))], beats, {}).events
    assert event.nodes == ["gpu"]


def test_on_demand_prefers_free_room_then_unloading_idle_models_never_busy_ones() -> None:
    free = beat("free", files={"m": 40}, used={"x": (50, 0)})
    idle = beat("idle", files={"m": 40}, used={"x": (90, 0)})
    busy = beat("busy", files={"m": 40}, used={"x": (90, 3)})
    assert placement.on_demand(record(), [idle, busy, free], []).nodes == ["free"]
    event = placement.on_demand(record(), [busy, idle], [])
    assert event.nodes == ["idle"] and event.evict and not event.pinned
    assert placement.on_demand(record(), [busy], []).detail.startswith("fits its budget")  # waits for it there
    with pytest.raises(placement.Unplaceable) as huge:
        placement.on_demand(record(), [beat("small", files={"m": 400})], [])
    assert huge.value.status == 507 and "400.0 MiB" in str(huge.value) and "100.0 MiB" in str(huge.value)


def test_more_replicas_for_a_queue_only_up_to_the_maximum() -> None:
    wanted = record("m", Replicas(min=1, max=2))
    beats = [beat("a", used={"m": (30, 1)}), beat("b", files={"m": 30}), beat("c", files={"m": 30})]
    event = placement.scale_up(wanted, beats, [])
    assert event is not None and len(event.nodes) == 1 and event.reason == "queueing"
    pending = [placement.Pending(event.nodes[0], {}, time.time(), time.monotonic() + 60)]
    assert placement.scale_up(wanted, beats, pending) is None  # two: the maximum
    assert placement.scale_up(record("m"), beats, []) is None  # no replicas setting: already everywhere it fits


# ---------------------------------------------------------------- real processes


def view(stack: Stack, path: str) -> dict:
    return httpx.get(stack.url + path).json()


def loaded_on(stack: Stack, model: str) -> list[str]:
    return view(stack, f"/v0/models/{model}")["placement"]["loaded_on"]


async def _placements(url: str, seen: list[dict], stop: threading.Event) -> None:
    nc = await nats.connect(url)
    sub = await nc.subscribe("placement.>")
    try:
        while not stop.is_set():
            try:
                msg = await sub.next_msg(timeout=0.2)
            except nats.errors.TimeoutError:
                continue
            seen.append(json.loads(msg.data) | {"subject": msg.subject})
    finally:
        await nc.close()


@pytest.fixture
def watch_placements(nats_url):
    """What `nats sub 'placement.>'` prints, as it happens."""
    seen: list[dict] = []
    stop = threading.Event()
    thread = threading.Thread(target=asyncio.run, args=(_placements(nats_url, seen, stop),), daemon=True)
    thread.start()
    time.sleep(0.3)
    yield seen
    stop.set()
    thread.join(5)


@requires_llama
@pytest.mark.e2e
def test_two_replicas_end_up_loaded_on_two_of_three_nodes(nats_url, tiny_gguf, tmp_path, watch_placements) -> None:
    stack = Stack(nats_url, tmp_path, node=False)
    try:
        nodes = [stack.start_node(f"rep-{i}").node_id for i in range(3)]
        reply = stack.admin("register", {"path": str(tiny_gguf), "name": "two-replicas", "replicas": 2})
        assert reply["ok"] and reply["record"]["replicas"] == {"min": 2, "max": 2}, reply
        wait_until(lambda: len(loaded_on(stack, "two-replicas")) == 2, message="loaded on two nodes")
        time.sleep(1.5)  # a sweep or two later: still two, the third has the files and waits
        model = view(stack, "/v0/models/two-replicas")["placement"]
        assert len(model["loaded_on"]) == 2 and len(model["loadable_on"]) == 1
        decision = model["last_decision"]
        assert decision["reason"] == "replicas" and set(decision["nodes"]) <= set(nodes) and decision["pinned"]
        events = [e for e in watch_placements if e["name"] == "two-replicas"]
        assert events and events[0]["subject"] == "placement.two-replicas" and events[0]["event"] == "placed"
        assert set().union(*(e["nodes"] for e in events)) == set(model["loaded_on"])
        placed_here = {
            n["id"]: [p["model"] for p in n["placements"]] for n in view(stack, "/v0/nodes")["data"] if n["id"] in nodes
        }
        assert sorted(n for n, models in placed_here.items() if "two-replicas" in models) == sorted(model["loaded_on"])
        # Real nodes acted on their decision at once: none holds one still, none was sent one again.
        assert all(n["placed"] == [] for n in view(stack, "/v0/nodes")["data"] if n["id"] in nodes)
        assert "placement sent again" not in stack.registry.output()
        answer = httpx.post(
            stack.url + "/v1/chat/completions",
            json={"model": "two-replicas", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=30,
        )
        assert answer.status_code == 200 and answer.headers["x-node-id"] in model["loaded_on"]
    finally:
        stack.close()


@pytest.mark.e2e
def test_a_standing_queue_gets_one_more_replica_up_to_the_maximum(nats_url, tiny_gguf, tmp_path) -> None:
    stack = Stack(nats_url, tmp_path, node=False, gateway_args=("--queue-timeout", "30"))
    try:
        stack.delay_node(400)
        stack.delay_node(400)
        stack.delay_node(400)
        reply = stack.admin("register", {"path": str(tiny_gguf), "name": "scaled", "replicas": {"min": 1, "max": 2}})
        assert reply["ok"], reply
        wait_until(lambda: len(loaded_on(stack, "scaled")) == 1, message="one replica")
        body = {"model": "scaled", "messages": [{"role": "user", "content": "hi"}]}
        answers: list[int] = []

        def one() -> None:
            answers.append(httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=one, daemon=True) for _ in range(16)]  # 6.4 s of work on one slot
        for thread in threads:
            thread.start()
        wait_until(lambda: len(loaded_on(stack, "scaled")) == 2, timeout=15, message="a second replica")
        for thread in threads:
            thread.join(60)
        assert answers == [200] * 16
        assert len(loaded_on(stack, "scaled")) == 2  # the maximum, though three nodes could
        decision = view(stack, "/v0/models/scaled")["placement"]["last_decision"]
        assert decision["reason"] == "queueing"
    finally:
        stack.close()


# ---------------------------------------------------------------- upstream nodes' models


def upstream_beat(node: str, model: str) -> NodeHeartbeat:
    """A node proxying an existing server (nodes/upstream.py): its model announced, no files, no memory."""
    return NodeHeartbeat(
        node_id=node,
        hostname=node,
        started_at=0,
        sent_at=time.time(),
        interval_s=2,
        runtimes=[RuntimeStatus(name="upstream", available=True, capabilities=["chat"])],
        models=[LoadedModel(name=model, runtime="upstream", capabilities=["chat"], origin="upstream")],
    )


def test_an_upstream_model_is_announced_served_and_never_placed() -> None:
    directory = NodeDirectory()
    directory._remember(upstream_beat("up", "box/llama"), time.monotonic())
    directory._remember(beat("n1", files={"m": 10}), time.monotonic())
    assert "box/llama" in directory.announced()
    assert [b.node_id for b in directory.serving("box/llama", "chat")] == ["up"]
    assert directory.loadable("box/llama") == []  # nothing to load on demand anywhere
    assert not directory.placeable("box/llama")  # the gateway never asks the registry for it
    assert directory.placeable("m")
    directory.note_unloaded("up", "box/llama")  # the node said model_not_loaded: not loadable either
    assert directory.serving("box/llama") == [] and directory.loadable("box/llama") == []
    # The registry places only registered models; the upstream node is no candidate for them.
    plan = placement.replicas([record("m")], [upstream_beat("up", "box/llama"), beat("n1", files={"m": 10})], {})
    assert [e.nodes for e in plan.events] == [["n1"]]


def test_a_runtime_main_says_computes_on_a_gpu_counts_as_one() -> None:
    gpu_beat = beat("g", files={"m": 10})
    gpu_beat.runtimes[0].device, gpu_beat.runtimes[0].gpu = None, True  # a torch engine before its first load
    assert placement.on_gpu(gpu_beat, "llama_cpp")
    assert not placement.on_gpu(beat("c", files={"m": 10}), "llama_cpp")


# ---------------------------------------------------------------- a node that missed a decision


async def _node_that_misses_its_placement(nats_url: str, model: str) -> list[list[dict]]:
    """A node made of heartbeats that has the model's files: the decisions naming it, in three
    phases: it does not act on its placement (as a node reconnecting when the decision went out
    would), then says it holds it, then no longer does."""
    from events import codec, subjects
    from events.messages import NodeGoodbye

    nc = await nats.connect(nats_url)
    seen: list[dict] = []

    async def on_placement(msg) -> None:
        event = json.loads(msg.data)
        if "ghost-1" in event["nodes"]:
            seen.append(event | {"received": time.monotonic()})

    await nc.subscribe(subjects.placement(model), cb=on_placement)
    ghost = beat("ghost-1", files={model: 10})

    async def beat_for(seconds: float, placed: list[str]) -> list[dict]:
        """The decisions received meanwhile, each with ``late``: whether it came over 1 s into it
        (not a send the previous phase's beats had set under way)."""
        first, start = len(seen), time.monotonic()
        until = start + seconds
        while time.monotonic() < until:
            data = msgspec.structs.replace(ghost, sent_at=time.time(), placed=placed)
            await nc.publish(subjects.node_heartbeat("ghost-1"), codec.encode(data))
            await asyncio.sleep(0.5)
        return [e | {"late": e["received"] > start + 1} for e in seen[first:]]

    try:
        missed = await beat_for(7.5, placed=[])  # the decision, then sent again
        listed = await beat_for(6, placed=[model])  # the node works on it: not sent again
        phases = [missed[:], listed[:]]
        phases.append(await beat_for(8, placed=[]))  # dropped: sent again up to MAX_RESENDS (3) in all
        return phases
    finally:
        await nc.publish(subjects.node_goodbye("ghost-1"), codec.encode(NodeGoodbye(node_id="ghost-1")))
        await nc.close()


@pytest.mark.e2e
def test_a_node_that_missed_its_placement_gets_it_again_until_its_heartbeat_lists_it(
    nats_url, tiny_gguf, tmp_path
) -> None:
    """Decisions travel on a core subscription: a node reconnecting when one goes out misses it.
    The registry sends it again (same decision) while the node's heartbeats do not list it as
    placed there, at most every REPUBLISH_S (3 s) and MAX_RESENDS (3) times, and stops once they
    do; before, a missed minimum replica waited PLACEMENT_TIMEOUT_S (120 s)."""
    stack = Stack(nats_url, tmp_path, node=False)
    try:
        reply = stack.admin("register", {"path": str(tiny_gguf), "name": "missed"})
        assert reply["ok"], reply
        missed, listed, dropped = asyncio.run(_node_that_misses_its_placement(nats_url, "missed"))
        events = missed + listed + dropped
        assert [e["again"] for e in missed] in ([False, True], [False, True, True]), missed
        assert not any(e["late"] for e in listed), listed  # the node listed it: not sent again
        assert [e["again"] for e in events] == [False, True, True, True], events  # then it stops
        assert {e["decision_id"] for e in events} == {missed[0]["decision_id"]}  # the same decision, again
        assert all(e["reason"] == "replicas" and e["nodes"] == ["ghost-1"] for e in events)
        gaps = [b["received"] - a["received"] for a, b in zip(events, events[1:])]
        assert all(gap >= 2.5 for gap in gaps), gaps  # REPUBLISH_S apart, not every sweep
        assert stack.registry.output().count("placement sent again") == 3
        decision = view(stack, "/v0/models/missed")["placement"]["last_decision"]
        assert decision["decision_id"] == missed[0]["decision_id"] and not decision["again"]  # as it was made
    finally:
        stack.close()
