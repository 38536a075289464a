"""Dashboard sessions: a signed token (JWT, HS256) per login, revocable on every gateway.

Login (:mod:`gateway.user_routes`) opens a session: a record in the ``sessions`` KV bucket
(id, user, expiry; the bucket's TTL is the session's seven days) and a token signed with the
secret all gateways share (:class:`gateway.users.UserDirectory`) whose ``jti`` is the session id.
Every gateway mirrors the bucket, so logging out (deleting the record) is refused everywhere as
soon as the watcher delivers the deletion, like a revoked API key.

Checking a token on the request path costs no KV round trip: one SHA-256 of the token to find
it in a small cache of tokens already verified (a JWT decode and HMAC takes ~20-40 µs; the cache
keeps the claims until the token expires), then two dict lookups: the session (still open?) and
the user's principal (still there? which role?). So a logout, a deleted user or a changed role
counts at once, whatever the cache holds.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import jwt
import structlog

from broker.mirrors import BucketWatch
from events import codec, storage
from events.messages import ApiKey, Session, User

from .errors import ApiError
from .users import UserDirectory

log = structlog.get_logger("gateway.sessions")

ISSUER = "llm-router"
ALGORITHM = "HS256"
CACHE_SIZE = 10_000  # verified tokens kept; a full cache drops its oldest entry
PRUNE_EVERY_S = 3600.0


class SessionTable(BucketWatch, bucket=storage.KV_SESSIONS, record_type=Session, record_kind="session record"):
    """The ``sessions`` bucket in memory, by id and by user.

    The bucket's TTL removes a session after seven days without telling watchers (no delete
    marker), so expired sessions are also pruned here, at most once an hour, on the next login."""

    table_attrs = ("by_id", "by_user")
    by_id: dict[str, Session]
    by_user: dict[str, set[str]]

    def __init__(self) -> None:
        super().__init__()
        self._pruned = time.monotonic()

    def _put(self, entry: Any, session: Session, tables: Any, live: bool) -> None:
        by_id, by_user = tables
        by_id[session.id] = session
        by_user.setdefault(session.user, set()).add(session.id)

    def _drop(self, entry: Any, tables: Any, live: bool) -> None:
        self._forget(*tables, entry.key)

    @staticmethod
    def _forget(by_id: dict[str, Session], by_user: dict[str, set[str]], session_id: str) -> None:
        session = by_id.pop(session_id, None)
        if session is not None:
            ids = by_user.get(session.user)
            if ids is not None:
                ids.discard(session_id)
                if not ids:
                    del by_user[session.user]

    def get(self, session_id: str) -> Session | None:
        return self.by_id.get(session_id)

    def of_user(self, name: str) -> list[str]:
        return list(self.by_user.get(name, ()))

    async def add(self, session: Session) -> None:
        await self.kv.put(session.id, codec.encode(session))
        self.by_id[session.id] = session
        self.by_user.setdefault(session.user, set()).add(session.id)
        if time.monotonic() - self._pruned > PRUNE_EVERY_S:
            self.prune(time.time())

    async def remove(self, session_id: str) -> None:
        await self.kv.delete(session_id)
        self._forget(self.by_id, self.by_user, session_id)

    def prune(self, now: float) -> None:
        for session_id in [s.id for s in self.by_id.values() if s.expires_at <= now]:
            self._forget(self.by_id, self.by_user, session_id)
        self._pruned = time.monotonic()


class Sessions:
    """Opens, checks and closes sessions; owns the sessions mirror."""

    def __init__(self, users: UserDirectory, lifetime_s: float = storage.SESSION_TTL_S) -> None:
        self.users = users
        self.table = SessionTable()
        self.lifetime_s = lifetime_s
        # sha256(token) -> (session id, user, expiry): tokens whose signature and claims were checked.
        self._verified: dict[bytes, tuple[str, str, float]] = {}
        users.on_secret_change(self._verified.clear)

    async def start(self, js: Any) -> None:
        await self.table.start(js)

    async def resync(self, js: Any) -> None:
        await self.table.resync(js)

    async def stop(self) -> None:
        await self.table.stop()

    # ------------------------------------------------------------ the request path

    def check(self, token: str) -> ApiKey | None:
        """The principal of the signed-in user whose open session ``token`` is; None otherwise."""
        session = self.session_of(token)
        return self.users.principal(session.user) if session is not None else None

    def session_of(self, token: str) -> Session | None:
        """The open session ``token`` was issued for, its user still there; None otherwise."""
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        claims = self._verified.get(key)
        now = time.time()
        if claims is None:
            claims = self._verify(token)
            if claims is None:
                return None
            if len(self._verified) >= CACHE_SIZE:
                self._verified.pop(next(iter(self._verified)))
            self._verified[key] = claims
        session_id, user, expires_at = claims
        if expires_at <= now:
            self._verified.pop(key, None)
            return None
        session = self.table.get(session_id)
        record = self.users.get(user)
        if session is None or session.user != user or record is None or session.created_at < record.created_at:
            return None  # closed, or the user is gone (a user made again later does not inherit it)
        return session

    def _verify(self, token: str) -> tuple[str, str, float] | None:
        secret = self.users.secret
        if secret is None:
            return None
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "jti", "sub", "iss"]},
            )
        except jwt.InvalidTokenError:
            return None
        session_id, user = claims["jti"], claims["sub"]
        if not isinstance(session_id, str) or not isinstance(user, str):
            return None
        return session_id, user, float(claims["exp"])

    # ------------------------------------------------------------ opening and closing

    async def open(self, user: User) -> tuple[str, Session]:
        """A new session for ``user``, and its token (which exists only in this answer)."""
        secret = self.users.secret
        if secret is None:
            raise ApiError(503, "Sessions are unavailable: no signing secret yet. Retry shortly.", code="no_secret")
        now = time.time()
        session = Session(
            id=secrets.token_urlsafe(18), user=user.name, created_at=now, expires_at=float(int(now + self.lifetime_s))
        )
        claims = {"iss": ISSUER, "sub": user.name, "jti": session.id, "iat": int(now), "exp": int(session.expires_at)}
        token = jwt.encode(claims, secret, algorithm=ALGORITHM)
        await self.table.add(session)
        return token, session

    async def close(self, session_id: str) -> bool:
        if self.table.get(session_id) is None:
            return False
        await self.table.remove(session_id)
        return True

    async def close_all(self, user: str, keep: str | None = None) -> int:
        """End every session of ``user`` but ``keep``; how many ended."""
        ended = 0
        for session_id in self.table.of_user(user):
            if session_id != keep:
                await self.table.remove(session_id)
                ended += 1
        return ended
