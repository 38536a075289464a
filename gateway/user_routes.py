"""``/v0/auth/*`` (sign in and out, one's own account) and ``/v0/users`` (admin: manage users).

Login answers the same 401 for an unknown user and a wrong password, after the same work (a
dummy hash is checked for unknown users: :mod:`gateway.passwords`), and is throttled per
username and per client address (:mod:`gateway.login_throttle`). The routes under ``/v0/auth/``
other than login take a session token (either role); ``/v0/users`` takes the admin scope
(``gateway.auth.required_scope``). Passwords and tokens are never logged; a route acting for a
user who is not the request's principal (a login) names them in ``scope["state"]["audit_actor"]``.
"""

from __future__ import annotations

import time

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response

from events.messages import ChangePassword, CreateUser, Login, Session, SetPassword, User
from events.tokens import username_error

from .auth import PREFIX, key_of
from .errors import ApiError
from .http import json_response, parse_body
from .login_throttle import LoginThrottle
from .passwords import Passwords, password_error
from .sessions import Sessions
from .users import UserChanged, UserDirectory, UserExists

log = structlog.get_logger("gateway.users")


def _address(request: Request) -> str:
    """The client's address: the peer's, or the one a trusted proxy names (``--forwarded-allow-ips``)."""
    client = request.scope.get("client")
    return client[0] if client else "unknown"


def _bearer(request: Request) -> str | None:
    kind, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if kind.lower() == "bearer" and token.strip() else None


def _act_as(request: Request, name: str) -> None:
    """Name the acting user for the audit log when the request's principal is not that user."""
    principal = key_of(request.scope)
    if principal is None or principal.id != f"user:{name}":
        request.scope.setdefault("state", {})["audit_actor"] = f"user:{name}"


def _checked_password(password: str, param: str) -> str:
    error = password_error(password)
    if error:
        raise ApiError(400, f"Invalid password: {error}.", param=param, code="invalid_password")
    return password


class UserRoutes:
    def __init__(self, users: UserDirectory, sessions: Sessions, passwords: Passwords, throttle: LoginThrottle) -> None:
        self.users = users
        self.sessions = sessions
        self.passwords = passwords
        self.throttle = throttle

    def view(self, user: User) -> dict:
        """A user as answers show it: never the hash."""
        return {
            "object": "user",
            "name": user.name,
            "role": user.role,
            "created_at": int(user.created_at),
            "password_changed_at": int(user.password_changed_at),
            "sessions": len(self.sessions.table.of_user(user.name)),
        }

    # ------------------------------------------------------------ /v0/auth

    async def login(self, request: Request) -> Response:
        body: Login = parse_body(await request.body(), Login)
        name = body.username if username_error(body.username) is None else None  # None: no user has it
        if name is not None:
            _act_as(request, name)
        attempt, wait = self.throttle.begin(body.username, _address(request))
        if attempt is None:
            log.warning("login throttled", user=name, retry_after=wait)
            raise ApiError(
                429,
                f"Too many failed logins; retry in {wait} s.",
                code="too_many_login_attempts",
                headers={"Retry-After": str(wait)},
            )
        user = self.users.get(name) if name is not None else None
        if not await self.passwords.verify(user.password_hash if user else None, body.password) or user is None:
            log.info("login refused", user=name)
            raise ApiError(
                401, "Invalid username or password.", code="invalid_credentials", headers={"WWW-Authenticate": "Bearer"}
            )
        self.throttle.succeeded(attempt)
        token, session = await self.sessions.open(user)
        log.info("login", user=user.name, session=session.id)
        return json_response(
            {
                "object": "session",
                "token": token,
                "token_type": "bearer",
                "session_id": session.id,
                "expires_at": int(session.expires_at),
                "expires_in": int(session.expires_at - time.time()),
                "user": self.view(user),
            }
        )

    def _session(self, request: Request) -> tuple[Session, User]:
        """The request's open session and its user: 401 without one, 400 for an API key."""
        token = _bearer(request)
        session = self.sessions.session_of(token) if token else None
        user = self.users.get(session.user) if session else None
        if session is None or user is None:
            if token and token.startswith(PREFIX):
                raise ApiError(
                    400, "This route takes a session token (POST /v0/auth/login), not an API key.", code="not_a_session"
                )
            raise ApiError(
                401, "Sign in first: no open session.", code="invalid_session", headers={"WWW-Authenticate": "Bearer"}
            )
        _act_as(request, user.name)
        return session, user

    async def logout(self, request: Request) -> Response:
        session, user = self._session(request)
        await self.sessions.close(session.id)
        log.info("logout", user=user.name, session=session.id)
        return json_response({"object": "session", "id": session.id, "deleted": True})

    async def me(self, request: Request) -> Response:
        session, user = self._session(request)
        return json_response(
            {
                **self.view(user),
                "session": {
                    "id": session.id,
                    "created_at": int(session.created_at),
                    "expires_at": int(session.expires_at),
                },
            }
        )

    async def change_password(self, request: Request) -> Response:
        """One's own password: the old one first (throttled like a login); the user's other sessions end."""
        session, user = self._session(request)
        body: ChangePassword = parse_body(await request.body(), ChangePassword)
        new_password = _checked_password(body.new_password, "new_password")
        attempt, wait = self.throttle.begin(user.name, _address(request))
        if attempt is None:
            raise ApiError(
                429,
                f"Too many wrong passwords; retry in {wait} s.",
                code="too_many_login_attempts",
                headers={"Retry-After": str(wait)},
            )
        if not await self.passwords.verify(user.password_hash, body.old_password):
            log.info("password change refused", user=user.name)
            raise ApiError(403, "The old password is wrong.", param="old_password", code="wrong_password")
        self.throttle.succeeded(attempt)
        changed = await self._set_password(user, new_password)
        ended = await self.sessions.close_all(user.name, keep=session.id)
        log.info("password changed", user=user.name, sessions_ended=ended)
        return json_response({**self.view(changed), "sessions_ended": ended})

    # ------------------------------------------------------------ /v0/users (admin)

    async def list(self, request: Request) -> Response:
        return json_response({"object": "list", "data": [self.view(user) for user in self.users.listing()]})

    async def create(self, request: Request) -> Response:
        body: CreateUser = parse_body(await request.body(), CreateUser)
        error = username_error(body.name)
        if error:
            raise ApiError(400, f"Invalid name: {error}.", param="name", code="invalid_name")
        password = _checked_password(body.password, "password")
        now = time.time()
        user = User(
            name=body.name,
            role=body.role,
            password_hash=await self.passwords.hash(password),
            created_at=now,
            password_changed_at=now,
        )
        try:
            await self.users.add(user)
        except UserExists:
            raise ApiError(409, f"A user {body.name!r} exists already.", param="name", code="user_exists") from None
        log.info("user created", user=user.name, role=user.role)
        return json_response(self.view(user), 201)

    def _named(self, request: Request) -> User:
        name = request.path_params["name"]
        if username_error(name):
            raise ApiError(400, f"Invalid name: {username_error(name)}.", param="name", code="invalid_name")
        user = self.users.get(name)
        if user is None:
            raise ApiError(404, f"No user {name!r}.", param="name", code="user_not_found")
        return user

    async def delete(self, request: Request) -> Response:
        """The user goes, and with it every session they have."""
        user = self._named(request)
        await self.users.remove(user.name)
        ended = await self.sessions.close_all(user.name)
        log.info("user deleted", user=user.name, sessions_ended=ended)
        return json_response({"object": "user", "name": user.name, "deleted": True, "sessions_ended": ended})

    async def reset_password(self, request: Request) -> Response:
        """An admin sets a user's password: every session of that user ends (the caller's too, if theirs)."""
        user = self._named(request)
        body: SetPassword = parse_body(await request.body(), SetPassword)
        changed = await self._set_password(user, _checked_password(body.password, "password"))
        ended = await self.sessions.close_all(user.name)
        log.info("password reset", user=user.name, sessions_ended=ended)
        return json_response({**self.view(changed), "sessions_ended": ended})

    async def _set_password(self, user: User, password: str) -> User:
        changed = msgspec.structs.replace(
            user, password_hash=await self.passwords.hash(password), password_changed_at=time.time()
        )
        try:
            await self.users.replace(changed)
        except UserChanged:
            raise ApiError(
                409, f"User {user.name!r} changed meanwhile; try again.", param="name", code="user_changed"
            ) from None
        return changed
