"""CPU per request of the gateway's ASGI middlewares (audit, auth, rate limits), one core, no network.

    python bench/middleware_cpu.py [--requests 100000] [--rounds 5]

The real middlewares of ``gateway.app.build_app`` wrap an ASGI app that answers at once, and
are called in a loop with the scope of an inference request (``POST /v1/chat/completions``
with a bearer key): what each layer adds to every request, in ns, without HTTP or NATS noise.
Variants run in turn, ``--rounds`` times; the table has each one's best round (the least
disturbed by whatever else the machine runs).
Keys live in a real :class:`gateway.auth.KeyRing`'s table (no NATS needed for lookups); the
audit log is never written to on this path (inference is not an admin action).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from events.messages import Usage  # noqa: E402
from gateway.audit import AuditMiddleware  # noqa: E402
from gateway.auth import AuthMiddleware, KeyRing, new_key  # noqa: E402
from gateway.rate_limits import RateLimiter, RateLimitMiddleware, charge  # noqa: E402

BIG = 10**9  # limits never reached in the run: every request takes the admitted path


async def answer(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def receive() -> dict:
    return {"type": "http.request", "body": b""}


async def send(message) -> None:
    pass


def scope_for(secret: str) -> dict:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {secret}".encode())],
    }


async def per_request_ns(app, secret: str, requests: int, charged: bool = False) -> float:
    usage = Usage(prompt_tokens=10, completion_tokens=20, total_tokens=30)
    for _ in range(1000):  # warm up
        await app(scope_for(secret), receive, send)
    started = time.perf_counter_ns()
    for _ in range(requests):
        scope = scope_for(secret)
        await app(scope, receive, send)
        if charged:
            charge(scope, usage)
    return (time.perf_counter_ns() - started) / requests


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ring = KeyRing()
    plain, plain_key = new_key("plain", ["inference"], [], None)
    limited, limited_key = new_key("limited", ["inference"], [], None, requests_per_minute=BIG, tokens_per_minute=BIG)
    for key in (plain_key, limited_key):
        ring.by_digest[key.digest], ring._ids[key.id] = key, key.digest
    limiter = RateLimiter()
    full = AuditMiddleware(AuthMiddleware(RateLimitMiddleware(answer, limiter), ring), log=None, ring=ring)
    variants = [
        ("no middleware", answer, plain, False),
        ("auth alone (before this change)", AuthMiddleware(answer, ring), plain, False),
        ("audit + auth + rate limits, key without limits", full, plain, False),
        ("audit + auth + rate limits, key with both limits", full, limited, True),
    ]
    best = {name: float("inf") for name, *_ in variants}
    for _ in range(args.rounds):
        for name, app, secret, charged in variants:
            best[name] = min(best[name], await per_request_ns(app, secret, args.requests, charged))
    base = best[variants[1][0]]
    print(f"best of {args.rounds} rounds of {args.requests:,} requests, POST /v1/chat/completions (ns per request):")
    for name, ns in best.items():
        print(f"  {name:50s} {ns:8.0f}   {ns - base:+7.0f} vs auth alone")


if __name__ == "__main__":
    asyncio.run(main())
