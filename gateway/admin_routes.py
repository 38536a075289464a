"""The ``/v0/models`` admin API and ``DELETE /v1/models/{model}``.

Reads of registered models come from the gateway's own mirror; everything the registry owns
(registration, deletion, the curated hub, the Hugging Face catalog) is a NATS request to it,
the same request an operator can send with ``nats req admin.model.<verb> '{...}'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from starlette.requests import Request
from starlette.responses import Response

from broker.mirrors import NodeDirectory, RegisteredModels
from broker.placements import PlacementLog
from events import codec, subjects
from events.messages import (
    AdminReply,
    DeleteModel,
    HfQuery,
    HfReply,
    HubQuery,
    HubReply,
    ModelRecord,
    NodeCommand,
    NodeCommandReply,
    RegisterModel,
)
from events.openai import validation_param

from .audit import nats_headers, note
from .dispatch import Dispatcher
from .errors import ApiError, model_not_found
from .http import json_response, parse_body

ADMIN_TIMEOUT_S = 30.0


@dataclass(eq=False)
class AdminRoutes:
    """``placements``: the registry's last decisions, shown with models and nodes."""

    nc: Client
    catalog: RegisteredModels
    directory: NodeDirectory
    dispatcher: Dispatcher
    placements: PlacementLog = field(default_factory=PlacementLog)

    async def ask(self, subject: str, request: Any, reply_type: type) -> Any:
        """A request to the registry; its refusal becomes the ApiError the client gets."""
        try:
            msg = await self.nc.request(subject, codec.encode(request), timeout=ADMIN_TIMEOUT_S, headers=nats_headers())
        except NoRespondersError:
            raise ApiError(
                503, "The model registry is not running; start it and retry.", headers={"Retry-After": "5"}
            ) from None
        except NatsTimeout:
            raise ApiError(504, f"The model registry did not answer within {ADMIN_TIMEOUT_S:g} s.") from None
        try:
            reply = codec.decode(msg.data, reply_type)
        except msgspec.DecodeError as exc:
            raise ApiError(502, f"Unreadable answer from the model registry: {exc}") from None
        if not reply.ok:
            headers = {"Retry-After": "30"} if reply.status == 503 else None
            raise ApiError(reply.status, reply.message, code=_CODES.get(reply.status), headers=headers)
        return reply

    def model_view(self, record: ModelRecord) -> dict:
        """A registration with what the live nodes say about it."""
        nodes = self.directory.serving(record.name)
        loadable = self.directory.loadable(record.name)
        view = msgspec.to_builtins(record)
        decision = self.placements.get(record.name)
        view.update(
            {
                "id": record.name,
                "object": "model",
                "ready": bool(nodes) or bool(loadable),
                "nodes": [b.node_id for b in nodes],
                # Where it is loaded, where it could be loaded on demand, and the registry's last decision.
                "placement": {
                    "loaded_on": [b.node_id for b in nodes],
                    "loadable_on": [b.node_id for b in loadable],
                    "last_decision": msgspec.to_builtins(decision) if decision is not None else None,
                },
            }
        )
        return view

    # ------------------------------------------------------------ handlers

    async def list_models(self, request: Request) -> Response:
        records = [self.catalog.records[name] for name in sorted(self.catalog.records)]
        return json_response({"object": "list", "data": [self.model_view(r) for r in records]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        record = self.catalog.get(name)
        if record is None:
            raise model_not_found(name)
        return json_response(self.model_view(record))

    async def hub(self, request: Request) -> Response:
        reply: HubReply = await self.ask(
            subjects.ADMIN_MODEL_HUB, HubQuery(search=request.query_params.get("search", "")), HubReply
        )
        return json_response({"object": "list", "data": reply.models})

    async def hf(self, request: Request) -> Response:
        params = request.query_params
        try:
            query = msgspec.convert(
                {k: params[k] for k in ("search", "page", "per_page") if k in params}, HfQuery, strict=False
            )
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"Invalid query: {exc}", param=validation_param(exc)) from None
        reply: HfReply = await self.ask(subjects.ADMIN_MODEL_HF, query, HfReply)
        return json_response(reply.page)

    async def register(self, request: Request) -> Response:
        body: RegisterModel = parse_body(await request.body(), RegisterModel)
        note(request.scope, target=body.name or body.catalog_id or body.repo or _no_query(body.url) or body.path)
        reply: AdminReply = await self.ask(subjects.ADMIN_MODEL_REGISTER, body, AdminReply)
        note(request.scope, target=reply.record.name)
        return json_response(self.model_view(reply.record), status=reply.status)

    async def delete_model(self, request: Request) -> Response:
        """OpenAI's delete shape; the model leaves this gateway's lists before the answer."""
        name = request.path_params["model"]
        try:
            await self.ask(subjects.ADMIN_MODEL_DELETE, DeleteModel(name=name), AdminReply)
        except ApiError as exc:
            if exc.status == 404:
                raise model_not_found(name) from None
            raise
        self.catalog.forget(name)
        self.placements.forget(name)
        return json_response({"id": name, "object": "model", "deleted": True})

    # ------------------------------------------------------------ nodes

    async def list_nodes(self, request: Request) -> Response:
        nodes = []
        for beat, live, age in sorted(self.directory.known(), key=lambda item: item[0].node_id):
            view = msgspec.to_builtins(beat)
            view.update(
                {
                    "id": beat.node_id,
                    "state": beat.state if live else "offline",
                    "last_seen_s": round(age, 1),
                    "gateway_inflight": self.dispatcher.node_inflight(beat.node_id),
                    # The registry's last decisions that placed a model here.
                    "placements": [
                        {
                            "model": e.name,
                            "reason": e.reason,
                            "at": e.at,
                            "decision_id": e.decision_id,
                            "evict": e.evict,
                        }
                        for e in self.placements.naming(beat.node_id)
                    ],
                }
            )
            nodes.append(view)
        return json_response(
            {
                "object": "list",
                "data": nodes,
                "queue": {"waiting": self.dispatcher.waiting, "size": self.dispatcher.queue_size},
            }
        )

    async def node_command(self, request: Request) -> Response:
        """``POST /v0/nodes/{id}/drain`` or ``/resume``: the node's own answer."""
        node_id, verb = request.path_params["node_id"], request.path_params["verb"]
        if verb not in (subjects.NODE_DRAIN, subjects.NODE_RESUME):
            raise ApiError(404, f"Unknown node command {verb!r}; use drain or resume.")
        try:
            msg = await self.nc.request(subjects.admin_node(node_id, verb), codec.encode(NodeCommand()), timeout=10)
        except NoRespondersError:
            raise ApiError(404, f"No running node {node_id!r}.", code="node_not_found") from None
        except NatsTimeout:
            raise ApiError(504, f"Node {node_id!r} did not answer within 10 s.") from None
        reply = codec.decode(msg.data, NodeCommandReply)
        self.directory.note_state(node_id, reply.state)  # no new work from this gateway, starting now
        return json_response(reply)


def _no_query(url: str | None) -> str | None:
    """A URL as an audit record may name it: no credentials, query or fragment (they can hold tokens)."""
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


_CODES = {
    404: "model_not_found",
    409: "model_already_registered",
    422: "unsupported_model",
    503: "registry_unavailable",
}
