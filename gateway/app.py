"""The gateway component: NATS state, dispatcher, history, and the Starlette app served by uvicorn.

The app is assembled in :func:`build_app`, in one visible place; ``Gateway.start()`` connects
to NATS, starts the mirrors of registry and node state, then starts serving HTTP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from broker import NatsAuth, connect, provision
from broker.audit import AuditLog
from broker.endpoints import Service
from broker.logship import SHIPPER
from broker.mirrors import NodeDirectory, RegisteredModels
from broker.placements import PlacementLog
from events import NameTooLong, codec, subjects

from .admin_routes import AdminRoutes
from .audit import AuditMiddleware
from .audit_routes import AuditRoutes
from .auth import AuthMiddleware, KeyRing
from .cluster_metrics import ClusterCollector, DownloadMeter
from .dispatch import ClientDisconnected, Dispatcher, DispatchError
from .downloads import DownloadRoutes, OnDemand
from .errors import ApiError, api_error
from .history import HistoryWriter
from .history_routes import HistoryRoutes
from .hot_routes import HotRoutes
from .http import json_response
from .key_routes import KeyRoutes
from .log_routes import LogRoutes
from .login_throttle import LoginThrottle
from .masking import MODES as MASKING_MODES
from .media_routes import MediaRoutes
from .metrics import Metrics, metrics_page
from .openai_routes import OpenAIRoutes
from .openapi import openapi_json
from .passwords import Passwords
from .placement import Placer
from .providers import Clouds
from .rate_limits import RateLimiter, RateLimitMiddleware
from .responses_routes import ResponsesRoutes
from .responses_store import ResponseStore
from .sessions import Sessions
from .usage import UsageMeter
from .usage_routes import UsageRoutes
from .user_routes import UserRoutes
from .users import UserDirectory

log = structlog.get_logger("gateway")


def error_response(exc: Exception) -> Response:
    """The one table from an exception to its OpenAI error response, for the Starlette app and
    for :class:`~gateway.hot_routes.HotRoutes` alike."""
    if isinstance(exc, ApiError):
        return exc.response()
    if isinstance(exc, ClientDisconnected | ClientDisconnect):
        return Response(status_code=499)  # nobody reads it: the client left (nginx's code for that)
    if isinstance(exc, DispatchError):
        return api_error(exc).response()
    if isinstance(exc, NameTooLong):  # a name in the path or query no subject or key can hold
        return ApiError(400, f"Invalid name: {exc}.", code="invalid_name").response()
    log.error("unhandled error", exc_info=exc)
    return ApiError(500, f"Internal error: {type(exc).__name__}", type="server_error").response()


async def _handled(request: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = "Not found: " + request.url.path if exc.status_code == 404 else str(exc.detail)
    return ApiError(exc.status_code, message, type="invalid_request_error").response()


def build_app(gateway: Gateway) -> ASGIApp:
    """The Starlette app with every route, behind the hot inference routes, rate limits, the key
    check and the audit log (outermost first: audit, auth, rate limits, hot routes, Starlette)."""
    api, admin, downloads, media = gateway.routes, gateway.admin, gateway.downloads, gateway.media
    routes = [
        # Also served by HotRoutes in front (nearly all the traffic); listed here for the route table.
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.get_model, methods=["GET"]),
        Route("/v1/models/{model:path}", admin.delete_model, methods=["DELETE"]),
        Route("/v0/nodes", admin.list_nodes, methods=["GET"]),
        Route("/v0/nodes/{node_id}/{verb}", admin.node_command, methods=["POST"]),
        Route("/v0/models", admin.list_models, methods=["GET"]),
        Route("/v0/models/hub", admin.hub, methods=["GET"]),
        Route("/v0/models/hf", admin.hf, methods=["GET"]),
        Route("/v0/models/register", admin.register, methods=["POST"]),
        Route("/v0/models/blob/{model:path}", downloads.blob, methods=["GET", "HEAD"]),
        Route("/v0/models/{model:path}/download", downloads.download_now, methods=["POST"]),
        Route("/v0/downloads", downloads.list, methods=["GET"]),
        Route("/v0/downloads/{task_id}", downloads.task, methods=["GET"]),
        Route("/v0/models/{model:path}", admin.get_model, methods=["GET"]),
        Route("/v0/models/{model:path}", admin.delete_model, methods=["DELETE"]),
        Route("/v1/images/generations", media.image_generations, methods=["POST"]),
        Route("/v1/images/edits", media.image_edits, methods=["POST"]),
        Route("/v1/images/variations", media.image_variations, methods=["POST"]),
        Route("/v1/audio/transcriptions", media.transcriptions, methods=["POST"]),
        Route("/v1/audio/translations", media.translations, methods=["POST"]),
        Route("/v1/audio/speech", media.speech, methods=["POST"]),
        Route("/v0/files/{name}", media.file, methods=["GET"]),
        Route("/v0/usage", gateway.usage_routes.usage, methods=["GET"]),
        Route("/v0/clouds", gateway.clouds_status, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
    ]
    keys = gateway.key_routes
    routes += [
        Route("/v0/keys", keys.create, methods=["POST"]),
        Route("/v0/keys", keys.list, methods=["GET"]),
        Route("/v0/keys/{key_id}", keys.revoke, methods=["DELETE"]),
    ]
    users = gateway.user_routes
    routes += [
        Route("/v0/auth/login", users.login, methods=["POST"]),
        Route("/v0/auth/logout", users.logout, methods=["POST"]),
        Route("/v0/auth/me", users.me, methods=["GET"]),
        Route("/v0/auth/password", users.change_password, methods=["POST"]),
        Route("/v0/users", users.list, methods=["GET"]),
        Route("/v0/users", users.create, methods=["POST"]),
        Route("/v0/users/{name}", users.delete, methods=["DELETE"]),
        Route("/v0/users/{name}/password", users.reset_password, methods=["PUT"]),
    ]
    routes.append(Route("/v0/audit", gateway.audit_routes.page, methods=["GET"]))
    history = gateway.history_routes
    routes += [
        Route("/v0/history", history.page, methods=["GET"]),
        Route("/v0/history/export", history.export, methods=["GET"]),
        Route("/v0/history/{record_id}", history.detail, methods=["GET"]),
        Route("/v0/logs", gateway.log_routes.page, methods=["GET"]),
    ]
    responses = gateway.responses
    routes += [
        Route("/v1/responses", responses.create, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses.get, methods=["GET"]),
        Route("/v1/responses/{response_id}", responses.delete, methods=["DELETE"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _handled,
            DispatchError: _handled,
            NameTooLong: _handled,
            HTTPException: _http_error,
            Exception: _handled,
        },
    )
    app.state.auth = gateway.auth  # the OpenAPI document says whether keys are wanted
    app.state.metrics = gateway.metrics  # None with --no-metrics
    gateway.starlette = app
    hot = {
        "/v1/chat/completions": api.chat_completions,
        "/v1/completions": api.completions,
        "/v1/embeddings": api.embeddings,
    }
    served: ASGIApp = HotRoutes(app, hot, error_response)
    if gateway.auth:  # rate limits once the key is known
        served = RateLimitMiddleware(served, limiter=gateway.rate_limiter)
        served = AuthMiddleware(served, gateway.keys, sessions=gateway.sessions)
    # Audit outside auth, so refused admin requests are recorded too.
    return AuditMiddleware(served, log=gateway.audit, ring=gateway.keys if gateway.auth else None)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Gateway:
    def __init__(
        self,
        *,
        nats_url: str | None,
        host: str = "127.0.0.1",
        port: int = 8080,
        request_timeout: float = 600.0,
        queue_size: int = 100,
        queue_timeout: float = 60.0,
        replicas: int | None = None,
        auth: bool = True,
        passwords: Passwords | None = None,
        nats_auth: NatsAuth | None = None,
        clouds: Clouds | None = None,
        history_masking: str = "none",
        metrics: bool = True,
        forwarded_allow_ips: str | None = None,
    ) -> None:
        """``auth=False`` serves without API keys: only for a gateway on a loopback address.
        ``passwords``: argon2 settings for new password hashes (tests make them cheap).
        ``clouds``: the cloud providers; default: from the environment (``OPENAI_API_KEY``...).
        ``history_masking``: what the history keeps of bodies, none, partial or full (gateway.masking).
        ``metrics=False``: no ``/metrics`` (404) and nothing counted (what bench/gateway_cpu.py compares).
        ``forwarded_allow_ips``: reverse proxies (comma-separated addresses or networks) whose
        ``X-Forwarded-For`` names the client: the login throttle then sees each client, not the
        proxy. None: the header is ignored (a client could forge it). ``*`` is refused: it would
        let every client name its own address and step around the throttle."""
        if not auth and not is_loopback(host):
            raise RuntimeError(
                f"refusing to serve without API keys on {host}: --no-auth is for loopback addresses only"
            )
        if forwarded_allow_ips is not None and "*" in (part.strip() for part in forwarded_allow_ips.split(",")):
            raise RuntimeError(
                "--forwarded-allow-ips '*' would let any client choose the address the login throttle counts; "
                "name the reverse proxies' addresses or networks"
            )
        if history_masking not in MASKING_MODES:
            raise RuntimeError(f"--history-masking must be one of {', '.join(MASKING_MODES)}, not {history_masking!r}")
        self.auth = auth
        self.history_masking = history_masking
        self.passwords = passwords
        self.nats_url = nats_url
        self.nats_auth = nats_auth  # NATS credentials and TLS (default: from the environment)
        self.replicas = replicas  # NATS copies of streams and buckets (broker.provision)
        self.host = host
        self.port = port
        self.request_timeout = request_timeout
        self.clouds = clouds if clouds is not None else Clouds.from_env(request_timeout=request_timeout)
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.metrics_on = metrics
        self.forwarded_allow_ips = forwarded_allow_ips or None
        self.metrics: Metrics | None = None
        self._downloads_meter: DownloadMeter | None = None
        self._server: uvicorn.Server | None = None
        self.dispatcher: Dispatcher | None = None
        self._serve_task: asyncio.Task | None = None
        self._socket: socket.socket | None = None
        self.starlette: Starlette | None = None  # every route; self.app is it behind HotRoutes and auth

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, serve_http: bool = True) -> None:
        """``serve_http=False``: no socket, for in-process use of ``self.app`` (httpx.ASGITransport)."""
        self.nc = await connect(
            self.nats_url,
            name="gateway",
            auth=self.nats_auth,
            on_reconnect=self._recover,
            on_disconnect=self._broker_lost,
        )
        SHIPPER.attach(self.nc, "gateway")  # its log records, to the LOGS stream
        self.js = self.nc.jetstream()
        await provision(self.js, self.replicas, role=self.nc.role)
        self.catalog = RegisteredModels()
        await self.catalog.start(self.js)
        self.directory = NodeDirectory()
        await self.directory.start(self.nc, self.js)
        self.dispatcher = Dispatcher(
            self.nc,
            self.directory,
            request_timeout=self.request_timeout,
            queue_size=self.queue_size,
            queue_timeout=self.queue_timeout,
        )
        await self.dispatcher.start()
        self.history = HistoryWriter(self.nc, masking=self.history_masking)
        await self.history.start()
        self.usage = UsageMeter(self.clouds.prices)
        await self.usage.start(self.js)
        self.history.observe(self.usage.count)  # tokens and cost of every answered request
        self.usage_routes = UsageRoutes(self.usage)
        if self.metrics_on:
            await self._start_metrics()
        await self.clouds.start()  # model lists fetched in the background
        self.placements = PlacementLog()
        await self.placements.start(self.js)
        self.admin = AdminRoutes(self.nc, self.catalog, self.directory, self.dispatcher, self.placements)
        self.placer = Placer(self.admin.ask, self.dispatcher.placement_failed)
        self.dispatcher.placer = self.placer
        self.routes = OpenAIRoutes(
            self.catalog, self.directory, self.dispatcher, self.history, OnDemand(self.admin.ask), self.clouds
        )
        self.media = MediaRoutes(self.routes, self.js)
        self.response_store = ResponseStore()
        await self.response_store.start(self.js)
        self.responses = ResponsesRoutes(self.routes, self.response_store)
        self.downloads = DownloadRoutes(self.js, self.catalog, self.admin.ask)
        await self.downloads.start()
        self.keys = KeyRing()
        await self.keys.start(self.js)
        self.key_routes = KeyRoutes(self.keys)
        self.users = UserDirectory()
        await self.users.start(self.js)  # makes the session secret when the cluster has none
        self.sessions = Sessions(self.users)
        await self.sessions.start(self.js)
        self.passwords = self.passwords or await asyncio.to_thread(Passwords)  # hashes its dummy password
        self.user_routes = UserRoutes(self.users, self.sessions, self.passwords, LoginThrottle())
        self.audit = AuditLog(self.nc, "gateway")
        await self.audit.start()
        self.audit_routes = AuditRoutes(self.nc, self.js)
        self.history_routes = HistoryRoutes(self.nc, self.js)
        self.log_routes = LogRoutes(self.nc)
        self.rate_limiter = RateLimiter()
        self.app = build_app(self)
        # `nats micro ls` lists gateways beside nodes and the registry; `nats req gateway.<id>.health ''` asks one.
        self.service = Service(self.nc, "llm-router-gateway", description="LLM Router HTTP gateway")
        await self.service.start()
        await self.service.add("health", subjects.gateway_health(self.service.id), self._health_over_nats)
        if not serve_http:
            await self.nc.flush()
            return

        # Bind first, so that port 0 resolves to a real port before we print the URL.
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._socket = sock
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            # Off unless proxies are named: a middleware per request, and the header is forgeable.
            proxy_headers=self.forwarded_allow_ips is not None,
            forwarded_allow_ips=self.forwarded_allow_ips,
            interface="asgi3",  # the outer layers are plain callables returning awaitables (gateway/hot_routes.py)
        )
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the CLI owns signals
        self._serve_task = asyncio.create_task(self._server.serve(sockets=[sock]), name="uvicorn")
        while not self._server.started:
            if self._serve_task.done():
                self._serve_task.result()
            await asyncio.sleep(0.01)
        await self.nc.flush()  # our subscriptions are on the server before anyone is told we are ready
        log.info("gateway listening", url=self.url)

    async def _start_metrics(self) -> None:
        """The registry of ``/metrics``; requests counted as the history records them (after the
        usage meter, so with their cost)."""
        self._downloads_meter = DownloadMeter()
        await self._downloads_meter.start(self.nc)
        self.metrics = Metrics(
            known_model=lambda name: (
                name in self.catalog.records
                or name in self.directory.announced()
                or self.clouds.catalog.get(name) is not None
            ),
            providers=set(self.clouds.providers),
            collectors=(ClusterCollector(self.directory, self.dispatcher), self._downloads_meter),
        )
        self.history.observe(self.metrics.requests.observe)

    def _broker_lost(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.broker_lost()

    async def _recover(self) -> None:
        """After a reconnection: the server may be a new one (or have lost its store), so
        provision again and re-read the models bucket; heartbeats refill the node directory."""
        if self.dispatcher is not None:
            self.dispatcher.broker_back()
        await provision(self.js, self.replicas, role=self.nc.role)
        await self.catalog.resync(self.js)
        await self.keys.resync(self.js)
        await self.users.resync(self.js)
        await self.sessions.resync(self.js)
        await self.usage.resync(self.js)
        await self.directory.resync(self.js)
        log.info("gateway state recovered", models=len(self.catalog.records))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._serve_task is not None:
            await self._serve_task
        await self.service.stop()
        await self.clouds.stop()
        await self.history.stop()
        await self.audit.stop()
        await self.usage.stop()  # after the last record: its counts are written
        if self._downloads_meter is not None:
            await self._downloads_meter.stop()
        await self.placer.stop()
        await self.dispatcher.stop()
        await self.directory.stop()
        await self.placements.stop()
        await self.catalog.stop()
        await self.keys.stop()
        await self.sessions.stop()
        await self.users.stop()
        await SHIPPER.detach(self.nc)
        await self.nc.drain()

    async def clouds_status(self, request: Request) -> Response:
        """``GET /v0/clouds``: each provider, whether it has a key, and its model list's state."""
        lists = self.clouds.catalog.status()
        data = [
            {"provider": name, "base_url": p.base_url, "configured": p.configured, "models": lists.get(name)}
            for name, p in self.clouds.providers.items()
        ]
        return json_response({"object": "list", "data": data})

    async def healthz(self, request: Request) -> Response:
        body = self.health()
        return json_response(body, 200 if body["status"] == "ok" else 503)

    async def _health_over_nats(self, msg: Any, _: Any = None) -> None:
        """The ``health`` endpoint of the gateway's micro service: /healthz's JSON over NATS."""
        await msg.respond(codec.encode({**self.health(), "url": self.url}))

    def health(self) -> dict[str, Any]:
        connected = self.nc.is_connected
        body = {
            "status": "ok" if connected else "degraded",
            "nats": "connected" if connected else ("reconnecting" if self.nc.is_reconnecting else "disconnected"),
            "nodes": len(self.directory.live()),
            "models": len(self.catalog.records),
            "history": {
                "pending": self.history.pending,
                "retried": self.history.retried,
                "dropped": self.history.dropped,
                "unindexed": self.history.unindexed,
            },
            "audit": {"pending": self.audit.pending, "retried": self.audit.retried, "dropped": self.audit.dropped},
            "logs": SHIPPER.stats,
        }
        return body
