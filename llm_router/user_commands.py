"""``llm-router users add|ls|rm|passwd``: dashboard users, written straight into the ``users`` bucket over NATS.

Like ``llm-router keys``: whoever reaches NATS as an operator can change everything anyway, so
this is how the first user of a cluster is made, and how a forgotten admin password is reset.
Passwords are read from a prompt (twice) or, with ``--password-stdin``, from the first line of
standard input; never from the command line, where ``ps`` and shell history would show them.
The bucket keeps an argon2id hash. Removing a user, or setting a password, ends their sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
from argon2 import PasswordHasher
from nats.js.errors import KeyWrongLastSequenceError

from broker.buckets import current_entries
from events import codec, storage
from events.messages import Session, User
from events.tokens import username_error
from gateway.passwords import password_error

from .nats_options import add_nats_auth_options
from .operator_kv import operator_bucket


class CommandError(Exception):
    """What the operator did wrong, printed as one line (exit status 1)."""


def add_user_commands(commands: Any, add: Callable[..., None]) -> None:
    users = commands.add_parser("users", help="add, list and remove dashboard users (over NATS, as an operator)")
    add(users, "--nats-url", "NATS_URL", "nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    add_nats_auth_options(users, add)  # `up`'s server: --nats-creds <data-dir>/nats-auth/operator.creds
    verbs = users.add_subparsers(dest="verb", required=True)
    stdin_help = "read the password from the first line of standard input instead of a prompt"
    add_ = verbs.add_parser("add", help="a new user; the password is asked for (never an argument)")
    add_.add_argument("name")
    add_.add_argument("--role", choices=["admin", "viewer"], required=True, help="admin: everything; viewer: reads")
    add_.add_argument("--password-stdin", action="store_true", help=stdin_help)
    verbs.add_parser("ls", help="every user: name, role, dates (never a password hash)")
    rm = verbs.add_parser("rm", help="remove a user; their sessions end on every gateway within a second")
    rm.add_argument("name")
    passwd = verbs.add_parser("passwd", help="set a user's password; their sessions end")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help=stdin_help)


def run_user_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run_users(args))
    except CommandError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 1


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the passwords differ")
    error = password_error(password)
    if error:
        raise CommandError(error)
    return password


async def run_users(args: argparse.Namespace) -> int:
    """The command, over NATS (the password is read before connecting: a prompt may take a while)."""
    if args.verb != "ls" and username_error(args.name):
        raise CommandError(username_error(args.name))
    password = read_password(args.password_stdin) if args.verb in ("add", "passwd") else None
    async with operator_bucket(args, "llm-router-users", storage.KV_USERS) as (js, users):
        if args.verb == "ls":
            for user in sorted(await _users(js), key=lambda u: u.created_at):
                print(
                    f"{user.name}  {user.role}  created {_day(user.created_at)}  password {_day(user.password_changed_at)}"
                )
            return 0
        key = storage.user_key(args.name)
        if args.verb == "add":
            now = time.time()
            hashed = await asyncio.to_thread(PasswordHasher().hash, password)  # argon2-cffi's defaults, as gateways
            user = User(name=args.name, role=args.role, password_hash=hashed, created_at=now, password_changed_at=now)
            try:
                await users.create(key, codec.encode(user))
            except KeyWrongLastSequenceError:
                raise CommandError(f"a user {args.name!r} exists already") from None
            print(f"added {args.name} ({args.role})")
            return 0
        current = {user.name: user for user in await _users(js)}.get(args.name)
        if current is None:
            raise CommandError(f"no user {args.name!r}")
        if args.verb == "rm":
            await users.delete(key)
            print(f"removed {args.name}; sessions ended: {await _end_sessions(js, args.name)}")
            return 0
        hashed = await asyncio.to_thread(PasswordHasher().hash, password)
        changed = msgspec.structs.replace(current, password_hash=hashed, password_changed_at=time.time())
        await users.put(key, codec.encode(changed))
        print(f"password set for {args.name}; sessions ended: {await _end_sessions(js, args.name)}")
        return 0


def _day(when: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(when))


async def _users(js: Any) -> list[User]:
    return [
        codec.decode(entry.value, User)
        for entry in await current_entries(js, storage.KV_USERS)
        if entry.key != storage.SESSION_SECRET_KEY
    ]


async def _end_sessions(js: Any, name: str) -> int:
    sessions = await js.key_value(storage.KV_SESSIONS)
    ended = 0
    for entry in await current_entries(js, storage.KV_SESSIONS):
        if codec.decode(entry.value, Session).user == name:
            await sessions.delete(entry.key)
            ended += 1
    return ended
