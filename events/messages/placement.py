"""Placement: which nodes load which model, decided by the registry alone.

A decision is a :class:`PlacementEvent` on ``placement.<model>``, which only the registry may
publish and every node follows (``nats sub 'placement.>'`` shows them; the PLACEMENTS stream
keeps the last ones of each model, for the gateway's ``/v0/models/{m}`` and ``/v0/nodes``). A
gateway whose request waits for a model that no node has loaded, or whose queue for a model
keeps standing, asks for one with :class:`PlaceModel` (``admin.model.place``).
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct, field

from .base import SCHEMA_VERSION, Answer, now

PlacementReason = Literal["replicas", "on_demand", "queueing"]


class PlacementEvent(Struct, kw_only=True):
    """Load model ``name`` on ``nodes`` (those that have not loaded it yet). Shaped like a
    ModelEvent (``event``, ``name``, ``at``)."""

    event: Literal["placed"] = "placed"
    name: str
    nodes: list[str]
    reason: PlacementReason
    # May the node unload its least recently used idle models to make room? False: load only
    # if it fits in what the budget has free now.
    evict: bool = False
    # Loaded for the registration's minimum replicas: --keep-alive does not unload it.
    pinned: bool = False
    # What the registry expected it to need there, per device, and why it chose these nodes.
    estimate_bytes: dict[str, int] = field(default_factory=dict)
    detail: str = ""
    decision_id: str = ""
    at: float = field(default_factory=now)
    # The decision sent once more, to those of its nodes that missed it (``nodes`` is then only
    # them): views of the last decision keep it as it was made.
    again: bool = False
    schema: int = SCHEMA_VERSION


class PlaceModel(Struct, kw_only=True):
    """A gateway's request (``admin.model.place``): requests wait for ``model``."""

    model: str
    capability: str | None = None
    reason: Literal["on_demand", "queueing"] = "on_demand"
    waiting: int = 0  # requests queued for it at that gateway


class PlaceReply(Answer, kw_only=True):
    """``nodes``: where the model is loaded or being loaded now (empty: nowhere it could go)."""

    nodes: list[str] = field(default_factory=list)
    event: PlacementEvent | None = None  # the decision made for this request, if one was
