"""The inference routes, served in front of the Starlette app instead of through it.

Nearly every request is ``POST /v1/chat/completions``, ``/v1/completions`` or ``/v1/embeddings``.
Through Starlette each one passes ServerErrorMiddleware, ExceptionMiddleware, the router, the
route and two ``request_response`` wrappers: eight coroutine frames, each entered again on every
resume of the handler, about an eighth of the gateway's CPU per request in py-spy profiles
(``bench/gateway_cpu.py --profile``). :class:`HotRoutes` looks these few paths up in a dict,
calls the same endpoint with a Starlette ``Request``, and turns an exception into a response
with the app's own error table (``gateway.app.error_response``), so an answer or an error is
byte for byte what the Starlette route gives. Every other path, and every other method on
these paths (405), goes to the Starlette app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

log = structlog.get_logger("gateway")

Endpoint = Callable[[Request], Awaitable[Response]]


class HotRoutes:
    """``POST`` on ``routes``' paths served directly; everything else passed to ``app``."""

    def __init__(self, app: ASGIApp, routes: dict[str, Endpoint], error_response: Callable[[Exception], Response]):
        self.app = app
        self.routes = routes
        self.error_response = error_response

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine: the Starlette app's paths pass on with no frame of ours. The ASGI
        server must be told the interface (uvicorn ``interface="asgi3"``), since it guesses from
        ``__call__`` being a coroutine function."""
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.routes.get(scope["path"])
            if endpoint is not None:
                return self._serve(endpoint, scope, receive, send)
        return self.app(scope, receive, send)

    async def _serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await endpoint(Request(scope, receive, send))
        except Exception as exc:
            response = self.error_response(exc)
        await response(scope, receive, send)  # a failure mid-stream propagates to uvicorn, as through Starlette
