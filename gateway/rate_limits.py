"""Request and token rate limits per API key (``requests_per_minute``, ``tokens_per_minute``).

Each limit is a token bucket that holds one minute's allowance and refills continuously
(``limit / 60`` a second), so a key may burst up to its limit and then goes at its rate:

- requests: every request the key makes takes one; with none left the answer is a 429;
- tokens: an inference request (``POST /v1/...``) is refused while the key's token budget is
  used up; the answer's usage (prompt + completion tokens) is charged once it is known
  (:func:`charge`, from ``Exchange.record``), so one long answer can take the budget below zero,
  and the key then waits until the debt has refilled.

The 429 is OpenAI's: ``{"error": {"type": "requests"|"tokens", "code": "rate_limit_exceeded"}}``
with ``Retry-After`` (and ``retry-after-ms``, which the openai SDK reads first) and OpenAI's
``x-ratelimit-limit|remaining|reset-requests|tokens`` headers, which every answer to a limited
key carries too.

**Per gateway.** The buckets live in each gateway's memory: checking one is a dict lookup and a
few float operations, with no NATS round trip. With N gateways behind a load balancer a key can
get up to N times its limits (exactly N times with an even spread). A shared count would cost a
KV or request round trip on every request, which is what API keys were designed not to need.
Keys without limits pay one attribute check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from events.messages import ApiKey, Usage

from .auth import key_of
from .errors import ApiError

STATE = "rate_limit"  # scope["state"] entry: (limiter, key) of a request whose key has a token limit


class Budget:
    """The two buckets of one key: what is left of each, as of ``stamp``."""

    __slots__ = ("requests", "tokens", "stamp")

    def __init__(self, key: ApiKey, now: float) -> None:
        self.requests = float(key.requests_per_minute or 0)
        self.tokens = float(key.tokens_per_minute or 0)
        self.stamp = now

    def refill(self, key: ApiKey, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed <= 0:
            return
        self.stamp = now
        limit = key.requests_per_minute
        if limit:
            level = self.requests + elapsed * limit / 60
            self.requests = level if level < limit else float(limit)
        limit = key.tokens_per_minute
        if limit:
            level = self.tokens + elapsed * limit / 60
            self.tokens = level if level < limit else float(limit)


def _reset(missing: float, limit: int) -> float:
    """Seconds until ``missing`` units refill at ``limit`` a minute."""
    return max(0.0, missing) * 60 / limit


def _duration(seconds: float) -> bytes:
    """OpenAI's reset format: ``120ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return b"%dms" % math.ceil(seconds * 1000)
    if seconds < 60:
        return b"%.1fs" % seconds
    return b"%dm%ds" % (seconds // 60, seconds % 60)


# OpenAI's header names, per kind of limit: limit, remaining, reset.
_REQUESTS, _TOKENS = (
    (b"x-ratelimit-limit-" + kind, b"x-ratelimit-remaining-" + kind, b"x-ratelimit-reset-" + kind)
    for kind in (b"requests", b"tokens")
)


class RateLimiter:
    """The budgets of the keys that have limits, on this gateway (one small entry per key used)."""

    def __init__(self) -> None:
        self.budgets: dict[str, Budget] = {}

    def _budget(self, key: ApiKey, now: float) -> Budget:
        budget = self.budgets.get(key.id)
        if budget is None:
            budget = self.budgets[key.id] = Budget(key, now)
        else:
            budget.refill(key, now)
        return budget

    def admit(self, key: ApiKey, inference: bool) -> tuple[ApiError | None, list[tuple[bytes, bytes]]]:
        """Take one request from the key's budget: ``(None, headers)``, or the 429 and nothing taken."""
        budget = self._budget(key, time.monotonic())
        rpm, tpm = key.requests_per_minute, key.tokens_per_minute
        if rpm and budget.requests < 1:
            wait = _reset(1 - budget.requests, rpm)
            used = rpm - math.floor(budget.requests)
            message = f"on requests per min (RPM): Limit {rpm}, Used {used}, Requested 1"
            return self._refusal(key, "requests", message, wait, budget), []
        if tpm and inference and budget.tokens <= 0:
            wait = max(_reset(-budget.tokens, tpm), 0.001)
            used = tpm - math.floor(budget.tokens)
            message = f"on tokens per min (TPM): Limit {tpm}, Used {used}"
            return self._refusal(key, "tokens", message, wait, budget), []
        if rpm:
            budget.requests -= 1
        return None, self._headers(key, budget)

    def charge(self, key: ApiKey, tokens: int) -> None:
        if key.tokens_per_minute and tokens > 0:
            self._budget(key, time.monotonic()).tokens -= tokens

    def _refusal(self, key: ApiKey, kind: str, what: str, wait: float, budget: Budget) -> ApiError:
        headers = {name.decode(): value.decode() for name, value in self._headers(key, budget)}
        headers.update({"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(math.ceil(wait * 1000))})
        return ApiError(
            429,
            f"Rate limit reached for API key {key.id} {what}. Please try again in {_duration(wait).decode()}.",
            type=kind,
            code="rate_limit_exceeded",
            headers=headers,
        )

    @staticmethod
    def _headers(key: ApiKey, budget: Budget) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit headers: the limit, what is left, and how long until it is full again."""
        headers: list[tuple[bytes, bytes]] = []
        for names, limit, left in (
            (_REQUESTS, key.requests_per_minute, budget.requests),
            (_TOKENS, key.tokens_per_minute, budget.tokens),
        ):
            if limit:
                reset = (limit - left) * 60 / limit
                headers += (
                    (names[0], b"%d" % limit),
                    (names[1], b"%d" % left if left > 0 else b"0"),
                    (names[2], b"%dms" % math.ceil(reset * 1000) if reset < 1 else _duration(reset)),
                )
        return headers


def charge(scope: Scope, usage: Usage) -> None:
    """Charge an answer's tokens to the key that asked, if it has a token limit (else one dict lookup)."""
    state = scope.get("state")
    entry = state.get(STATE) if state else None
    if entry is not None:
        limiter, key = entry
        limiter.charge(key, usage.total_tokens or usage.prompt_tokens + usage.completion_tokens)


class RateLimitMiddleware:
    """After auth: a 429 for a key over its limits, the x-ratelimit headers on the others' answers."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine for keys without limits: their requests pass on with no frame of ours."""
        key = key_of(scope)
        if key is None or (key.requests_per_minute is None and key.tokens_per_minute is None):
            return self.app(scope, receive, send)
        return self._limited(scope, receive, send, key)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, key: ApiKey) -> None:
        inference = scope["method"] == "POST" and scope["path"].startswith("/v1/")
        refusal, headers = self.limiter.admit(key, inference)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        if key.tokens_per_minute:
            scope["state"][STATE] = (self.limiter, key)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, with_headers)
