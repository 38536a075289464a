"""The registry's last placement decision for each model, as any component can read it.

One ordered consumer on the PLACEMENTS stream, starting with the last message of every
``placement.<model>`` subject and then following new ones: the gateway shows the decisions
(``/v0/models/{m}``, ``/v0/nodes``) without asking the registry, including those made before
it started. Bounded by the models registered: a deleted model's decision is dropped.
"""

from __future__ import annotations

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from events import codec, subjects
from events.messages import PlacementEvent

log = structlog.get_logger("mirrors")

MAX_MODELS = 100_000  # far more than a cluster registers; bounds the table if deletes are missed


class PlacementLog:
    def __init__(self) -> None:
        self.last: dict[str, PlacementEvent] = {}
        self._sub = None

    async def start(self, js: JetStreamContext) -> None:
        self._sub = await js.subscribe(
            subjects.PLACEMENT_ALL,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            cb=self._on_event,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_event(self, msg) -> None:
        try:
            event = codec.decode(msg.data, PlacementEvent)
        except msgspec.DecodeError:
            log.warning("undecodable placement", subject=msg.subject)
            return
        known = self.last.get(event.name)
        if known is None and len(self.last) >= MAX_MODELS:
            return
        if event.again and known is not None and known.decision_id == event.decision_id:
            return  # sent again to the nodes that missed it: the decision as made, all its nodes, stays
        if known is None or known.at <= event.at:
            self.last[event.name] = event

    def get(self, model: str) -> PlacementEvent | None:
        return self.last.get(model)

    def forget(self, model: str) -> None:
        self.last.pop(model, None)

    def naming(self, node_id: str) -> list[PlacementEvent]:
        """The last decisions that placed a model on ``node_id``."""
        return [event for event in self.last.values() if node_id in event.nodes]
