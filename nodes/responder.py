"""Publishes one request's replies on its reply inbox, each stamped with the request and node ids.

Runners build replies without ids; the responder bound to the request fills them in, so a reply
can never name the wrong request, and publishing happens in one place.
"""

from __future__ import annotations

from nats.aio.client import Client

from events import codec
from events.messages import Failure, Reply


class Responder:
    __slots__ = ("nc", "subject", "request_id", "node_id")

    def __init__(self, nc: Client, subject: str, request_id: str, node_id: str) -> None:
        self.nc = nc
        self.subject = subject
        self.request_id = request_id
        self.node_id = node_id

    async def send(self, reply: Reply) -> None:
        reply.request_id = self.request_id
        reply.node_id = self.node_id
        await self.nc.publish(self.subject, codec.encode(reply))

    async def fail(
        self,
        status: int,
        message: str,
        *,
        type: str = "server_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        await self.send(Failure(status=status, message=message, type=type, code=code, param=param))
