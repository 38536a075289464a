"""OpenAI-shaped errors: every HTTP error body is ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from starlette.responses import Response

from events import codec

from . import dispatch as d  # dispatch knows nothing of HTTP: api_error below is the one bridge

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(codec.encode(self.body()), self.status, self.headers, media_type="application/json")


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404, f"The model '{model}' does not exist or is not registered.", param="model", code="model_not_found"
    )


def api_error(exc: Exception) -> ApiError:
    """The OpenAI error for a dispatch failure (gateway.dispatch raises no HTTP errors itself)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, d.NoNode):
        return ApiError(
            503,
            f"No live node is serving the model '{exc.model}' right now. Retry shortly.",
            code="model_unavailable",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, d.NotPlaced):
        code = "insufficient_memory" if exc.status == 507 else "model_not_loaded"
        return ApiError(exc.status, str(exc), code=code, headers={"Retry-After": "10"} if exc.status == 503 else None)
    if isinstance(exc, d.QueueFull):
        return ApiError(
            429,
            f"The request queue is full ({exc.size} waiting); retry later.",
            code="queue_full",
            headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
        )
    if isinstance(exc, d.QueueTimeout):
        return ApiError(
            504, f"Waited {exc.waited_s:g} s in the queue for a free node; retry later.", code="queue_timeout"
        )
    if isinstance(exc, d.NodeUnavailable):
        return ApiError(503, str(exc), code="node_unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, d.NodeTimeout):
        return ApiError(504, "The node did not answer in time.", code="timeout")
    if isinstance(exc, d.BrokerUnavailable):
        return ApiError(
            503,
            "The message broker (NATS) is unreachable; the gateway is reconnecting. Retry shortly.",
            code="broker_unavailable",
            headers={"Retry-After": "2"},
        )
    if isinstance(exc, d.ClientDisconnected):
        return ApiError(499, "The client disconnected.", type="client_disconnected", code="client_disconnected")
    return ApiError(500, f"Dispatch failed: {exc}")
