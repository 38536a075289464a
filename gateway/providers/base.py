"""What every cloud provider shares: its settings, one pooled HTTP client, error mapping, SSE.

A provider is reached with one pooled client for the gateway's life (outbound/http.py: its
connections are kept alive and reused, since a TLS handshake per request would cost more than
the whole gateway, and it costs a tenth of httpx's CPU per call).
Its key goes only into request headers; any error text a provider sends back is scrubbed of it
before it reaches a client, a log line or the history.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import structlog

from events import codec
from outbound.http import Client, HttpError, HttpxClient, Response, Timeout, client_for
from outbound.redact import redact

from ..errors import ApiError

log = structlog.get_logger("gateway.providers")

CONNECT_TIMEOUT_S = 10.0
MODELS_TIMEOUT_S = 10.0  # one provider's model list (SPEC-82491000)

# OpenAI error types by status, for providers whose error bodies have none.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
}


@dataclass(frozen=True)
class ProviderSettings:
    """A provider as configured: its name (the model prefix), key and API base URL."""

    name: str
    key: str | None
    base_url: str

    def __repr__(self) -> str:  # never print the key
        return f"ProviderSettings(name={self.name!r}, base_url={self.base_url!r}, key={'set' if self.key else 'unset'})"


def with_default_path(url: str, default_path: str) -> str:
    """``url`` without a trailing slash; a bare host (no path) gets the provider's usual API path."""
    url = url.rstrip("/")
    return url + default_path if urlsplit(url).path in ("", "/") else url


@dataclass
class CloudModel:
    """One model of a provider's list, unprefixed."""

    id: str
    created: int = 0
    capabilities: list[str] = field(default_factory=list)


class Provider:
    """Base of every provider: settings, client, key handling and error mapping.

    Subclasses set ``capabilities`` (what the gateway may send) and implement ``models`` and
    the request methods the routes call (gateway/providers/routes.py)."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self, settings: ProviderSettings, *, request_timeout: float = 600.0) -> None:
        self.settings = settings
        self.name = settings.name
        self.base_url = settings.base_url
        self.request_timeout = request_timeout
        self._client: Client | HttpxClient | None = None

    @property
    def configured(self) -> bool:
        return bool(self.settings.key)

    @property
    def client(self) -> Client | HttpxClient:
        """The pooled client, made on first use (inside the gateway's event loop)."""
        if self._client is None:
            self._client = client_for(
                self.client_base(),
                headers=self.auth_headers(),
                timeout=self.request_timeout,
                connect_timeout=CONNECT_TIMEOUT_S,
            )
        return self._client

    def client_base(self) -> str:
        """The URL every request path is relative to."""
        return self.base_url

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.settings.key}"}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------ what subclasses provide

    async def models(self) -> list[CloudModel]:
        raise NotImplementedError

    # ------------------------------------------------------------ errors

    def scrub(self, text: str) -> str:
        """``text`` without this provider's key, or any piece of it (formats/redact.py)."""
        return redact(text, self.settings.key)

    def error_from(self, status: int, content: bytes) -> ApiError:
        """The OpenAI error for a provider's non-2xx answer, with the provider's status."""
        message, kind, param, code = _error_fields(content)
        message = self.scrub(message or f"HTTP {status} from {self.name}")
        return ApiError(
            status,
            f"{self.name}: {message}",
            type=kind or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            param=param,
            code=code or "provider_error",
        )

    def unreachable(self, exc: HttpError) -> ApiError:
        """A transport failure: 504 when it timed out, 502 otherwise (the provider never answered)."""
        if isinstance(exc, Timeout):
            return ApiError(504, f"{self.name} did not answer in time.", code="provider_timeout")
        reason = self.scrub(str(exc) or type(exc).__name__)
        return ApiError(502, f"{self.name} is unreachable: {reason}", type="server_error", code="provider_unavailable")

    async def checked(self, response: Response) -> Response:
        """``response`` when 2xx; else its body is read and raised as the mapped error."""
        if response.is_success:
            return response
        try:
            content = await response.read()
        except HttpError:
            content = b""
        raise self.error_from(response.status, content)

    async def send(self, method: str, path: str, body: bytes | None = None, **options: Any) -> Response:
        """A request; its transport failure as the OpenAI error, and a non-2xx answer mapped too."""
        try:
            response = await self.client.request(method, path, body, **options)
        except HttpError as exc:
            raise self.unreachable(exc) from None
        return await self.checked(response)


def _error_fields(content: bytes) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, type, param, code) from an OpenAI, Anthropic or Google error body."""
    try:
        body = msgspec.json.decode(content)
    except msgspec.DecodeError:
        text = content.decode("utf-8", "replace").strip()
        return (text[:500] or None), None, None, None
    if isinstance(body, list) and body:  # Google's OpenAI-compatible endpoint wraps it in a list
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return error, None, None, None
    if not isinstance(error, dict):
        return None, None, None, None
    message = error.get("message")
    kind = error.get("type")
    if kind is None and isinstance(error.get("status"), str):  # Google: "INVALID_ARGUMENT"
        kind = "invalid_request_error" if error["status"] == "INVALID_ARGUMENT" else None
    code = error.get("code")
    param = error.get("param")
    return (
        str(message) if message is not None else None,
        str(kind) if kind else None,
        str(param) if param else None,
        str(code) if isinstance(code, str) and code else None,
    )


def sse(payload: Any) -> bytes:
    return b"data: " + codec.encode(payload) + b"\n\n"


def now_s() -> int:
    return int(time.time())
