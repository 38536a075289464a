"""Dashboard users: the ``users`` KV bucket in memory on every gateway, and what a role may do.

A user has a name, a role (``admin``: the admin scope; ``viewer``: the read scope) and an
argon2id hash of its password (:mod:`gateway.passwords`). The same bucket keeps the secret that
signs session tokens, under :data:`events.storage.SESSION_SECRET_KEY`, a key no username encodes
to; the first gateway to start makes it (``create``: one wins a race), every gateway reads it
from the watcher. Not the ``sessions`` bucket: its entries expire after seven days. Nodes are
given no access to either bucket.

Signed-in users act through the same scope checks as API keys: each user has a principal, an
:class:`ApiKey` with ``id="user:<name>"`` and its role's scope, built once per record so the
request path does no work for it (``gateway.auth.key_of`` returns it; history names it).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from broker.mirrors import BucketWatch
from events import codec, decode_token, storage
from events.messages import ApiKey, Scope, SessionSecret, User

log = structlog.get_logger("gateway.users")

ROLE_SCOPES: dict[str, Scope] = {"admin": "admin", "viewer": "read"}


class UserExists(Exception):
    """A user of that name is already in the bucket."""


class UserChanged(Exception):
    """The record changed (or went) since it was read: someone else wrote it meanwhile."""


def principal(user: User) -> ApiKey:
    """What the scope checks, model limits and history see of a signed-in user."""
    return ApiKey(
        id=f"user:{user.name}", name=user.name, digest="", scopes=[ROLE_SCOPES[user.role]], created_at=user.created_at
    )


@dataclass
class _Tables:
    users: dict[str, User] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)
    principals: dict[str, ApiKey] = field(default_factory=dict)
    secret: bytes | None = None


class UserDirectory(BucketWatch, bucket=storage.KV_USERS, record_type=User, record_kind="user record"):
    """Users by name, their principals, and the session secret; kept current by a watcher."""

    def __init__(self) -> None:
        super().__init__()
        self._tables = _Tables()
        self._secret_listeners: list[Callable[[], None]] = []

    async def start(self, js: Any) -> None:
        """The snapshot, then the session secret (made here when the bucket has none yet)."""
        await super().start(js)
        if self._tables.secret is None:
            await self._make_secret()

    # ------------------------------------------------------------ the mirror

    def _new_tables(self) -> _Tables:
        return _Tables()

    def _swap_in(self, tables: _Tables) -> None:
        old_secret, self._tables = self._tables.secret, tables
        if tables.secret != old_secret:
            self._secret_changed()

    def _live(self) -> _Tables:
        return self._tables

    def _apply(self, entry: Any, deleted: bool, snapshot: Any) -> None:
        """The secret's key is no user's; any other key must encode a username."""
        if entry.key == storage.SESSION_SECRET_KEY:
            tables = snapshot if snapshot is not None else self._tables
            self._apply_secret(tables, None if deleted else entry.value, live=snapshot is None)
            return
        try:
            decode_token(entry.key)
        except ValueError:
            log.error("a users bucket key that is no username", key=entry.key)
            return
        super()._apply(entry, deleted, snapshot)

    def _put(self, entry: Any, user: User, tables: _Tables, live: bool) -> None:
        if entry.revision >= tables.revisions.get(decode_token(entry.key), 0):
            self._remember(tables, user, entry.revision)

    def _drop(self, entry: Any, tables: _Tables, live: bool) -> None:
        self._forget(tables, decode_token(entry.key))

    def _apply_secret(self, tables: _Tables, value: bytes | None, live: bool) -> None:
        secret = None
        if value is not None:
            try:
                secret = bytes.fromhex(codec.decode(value, SessionSecret).secret)
            except (msgspec.DecodeError, ValueError):
                log.error("undecodable session secret: sessions refused until it is replaced")
        changed = secret != tables.secret
        tables.secret = secret
        if live and changed:
            self._secret_changed()

    @staticmethod
    def _remember(tables: _Tables, user: User, revision: int) -> None:
        tables.users[user.name] = user
        tables.revisions[user.name] = revision
        tables.principals[user.name] = principal(user)

    @staticmethod
    def _forget(tables: _Tables, name: str) -> None:
        tables.users.pop(name, None)
        tables.principals.pop(name, None)
        tables.revisions.pop(name, None)

    def _secret_changed(self) -> None:
        for listener in self._secret_listeners:
            listener()

    def on_secret_change(self, listener: Callable[[], None]) -> None:
        """Called when the signing secret changes (tokens checked under the old one are no longer good)."""
        self._secret_listeners.append(listener)

    # ------------------------------------------------------------ reads (no KV round trip)

    @property
    def secret(self) -> bytes | None:
        return self._tables.secret

    def get(self, name: str) -> User | None:
        return self._tables.users.get(name)

    def principal(self, name: str) -> ApiKey | None:
        return self._tables.principals.get(name)

    def listing(self) -> list[User]:
        return sorted(self._tables.users.values(), key=lambda user: user.created_at)

    def admins(self) -> int:
        return sum(user.role == "admin" for user in self._tables.users.values())

    # ------------------------------------------------------------ writes (applied here before the watcher says so)

    async def add(self, user: User) -> None:
        try:
            revision = await self.kv.create(storage.user_key(user.name), codec.encode(user))
        except KeyWrongLastSequenceError:
            raise UserExists(user.name) from None
        self._remember(self._tables, user, revision)

    async def replace(self, user: User) -> None:
        """Write ``user`` over the record this gateway has: UserChanged when it is no longer that one."""
        known = self._tables.revisions.get(user.name)
        if known is None:
            raise UserChanged(user.name)
        try:
            revision = await self.kv.update(storage.user_key(user.name), codec.encode(user), last=known)
        except KeyWrongLastSequenceError:
            raise UserChanged(user.name) from None
        self._remember(self._tables, user, revision)

    async def remove(self, name: str) -> bool:
        if name not in self._tables.users:
            return False
        await self.kv.delete(storage.user_key(name))
        self._forget(self._tables, name)
        return True

    async def _make_secret(self) -> None:
        record = SessionSecret(secret=secrets.token_hex(64), created_at=time.time())
        try:
            await self.kv.create(storage.SESSION_SECRET_KEY, codec.encode(record))
            value = codec.encode(record)
            log.info("session secret created")
        except KeyWrongLastSequenceError:  # another gateway made it first: theirs it is
            try:
                value = (await self.kv.get(storage.SESSION_SECRET_KEY)).value
            except KeyNotFoundError:
                value = None
        self._apply_secret(self._tables, value, live=True)
