"""``llm-router keys create|ls|rm``: API keys, written straight into the ``keys`` bucket over NATS.

Whoever can reach NATS as an operator can already change everything, so this is how the first
key of a cluster is made (a gateway started on its own has none), and how keys are managed
without one. The secret is printed once; the bucket keeps its SHA-256 digest. Creations and
revocations go to the audit log as done by ``nats`` (whoever holds operator access to NATS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError

from broker.audit import audit_record, publish_now
from broker.buckets import current_entries
from events import codec, storage
from events.messages import ApiKey
from gateway.auth import new_key
from gateway.key_routes import view

from .nats_options import add_nats_auth_options
from .operator_kv import operator_bucket

EXPIRIES = ("3", "7", "21", "70", "90", "never")


def add_key_commands(commands: Any, add: Callable[..., None]) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys (over NATS, as an operator)")
    add(keys, "--nats-url", "NATS_URL", "nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    add_nats_auth_options(keys, add)  # `up`'s server: --nats-creds <data-dir>/nats-auth/operator.creds
    verbs = keys.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="a new key; its secret is printed once")
    create.add_argument("name")
    create.add_argument(
        "--scope",
        action="append",
        choices=["inference", "read", "admin"],
        required=True,
        help="inference (/v1), read (/v0 reads), admin (everything); repeatable",
    )
    create.add_argument("--model", action="append", default=[], help="only these models (repeatable; default all)")
    create.add_argument("--expires-days", choices=EXPIRIES, default="90", help="3, 7, 21, 70, 90 or never [90]")
    create.add_argument("--rpm", type=_per_minute, default=None, help="requests per minute (per gateway) [unlimited]")
    create.add_argument(
        "--tpm", type=_per_minute, default=None, help="prompt + completion tokens per minute (per gateway) [unlimited]"
    )
    verbs.add_parser("ls", help="every key: id, name, scopes, models, expiry (never the secrets)")
    rm = verbs.add_parser("rm", help="revoke a key: refused on every gateway within a second")
    rm.add_argument("key_id")


def run_key_command(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    async with operator_bucket(args, "llm-router-keys", storage.KV_KEYS) as (js, kv):
        if args.verb == "create":
            days = None if args.expires_days == "never" else int(args.expires_days)
            secret, key = new_key(
                args.name, args.scope, args.model, days, requests_per_minute=args.rpm, tokens_per_minute=args.tpm
            )
            await kv.put(key.id, codec.encode(key))
            await publish_now(js, audit_record("cli", "nats", "key.create", 201, target=key.id, detail=_facts(key)))
            print(json.dumps({**view(key), "key": secret}, indent=2))
            print("The key is shown only now; keep it.", file=sys.stderr)
            return 0
        if args.verb == "ls":
            records = []
            for entry in await current_entries(js, storage.KV_KEYS):
                try:
                    records.append(codec.decode(entry.value, ApiKey))
                except msgspec.DecodeError:  # not a key record: say so, list the others
                    print(f"llm-router: undecodable key record {entry.key!r}", file=sys.stderr)
            for key in sorted(records, key=lambda k: k.created_at):
                expiry = (
                    "never (!)" if key.expires_at is None else time.strftime("%Y-%m-%d", time.gmtime(key.expires_at))
                )
                models = ",".join(key.models) or "all models"
                limits = "".join(
                    f"  {value}/min {what}"
                    for what, value in (("requests", key.requests_per_minute), ("tokens", key.tokens_per_minute))
                    if value
                )
                print(f"{key.id}  {key.name!r}  {','.join(key.scopes)}  {models}  expires {expiry}{limits}")
            return 0
        if not await _exists(kv, args.key_id):
            await publish_now(js, audit_record("cli", "nats", "key.revoke", 404, target=args.key_id))
            print(f"llm-router: no API key {args.key_id!r}", file=sys.stderr)
            return 1
        await kv.delete(args.key_id)
        await publish_now(js, audit_record("cli", "nats", "key.revoke", 200, target=args.key_id))
        print(f"revoked {args.key_id}")
        return 0


async def _exists(kv: Any, key_id: str) -> bool:
    """Whether the bucket holds ``key_id`` (one get, not a read of every key)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key_id):  # ids are key_<hex>; nothing else is a KV key of ours
        return False
    try:
        entry = await kv.get(key_id)
    except KeyNotFoundError:
        return False
    return bool(entry.value)


def _per_minute(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1_000_000_000:
        raise argparse.ArgumentTypeError("a limit per minute is 1 to 1000000000")
    return value


def _facts(key: ApiKey) -> dict:
    """What the audit record says of a new key: never its secret or digest."""
    return {"name": key.name, "scopes": list(key.scopes)}
