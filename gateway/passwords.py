"""Password hashing: argon2id, off the event loop, a few at a time.

A hash takes tens of milliseconds and ``memory_cost`` KiB (64 MiB by default) on purpose, so it
runs in a worker thread (the loop keeps serving inference meanwhile) and at most ``concurrent``
at once: a burst of logins waits its turn instead of taking a thread and 64 MiB each.

Checking a password of an unknown user verifies it against a dummy hash made with the same
settings, so that an unknown user and a wrong password take the same time and get the same
answer (nobody learns which usernames exist). A stored hash carries its own settings: hashes
made with other ones (an older default, the CLI's) verify in their own time.
"""

from __future__ import annotations

import asyncio
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_BYTES = 1024  # bounded: argon2 reads every byte, and a body may carry megabytes


def _hashable(password: str) -> bool:
    """At most MAX_PASSWORD_BYTES of UTF-8 (a lone surrogate has no UTF-8 form: not hashable)."""
    try:
        return len(password.encode("utf-8")) <= MAX_PASSWORD_BYTES
    except UnicodeEncodeError:
        return False


def password_error(password: str) -> str | None:
    """Why ``password`` cannot be set, or None when it can (login checks only that it is hashable)."""
    if len(password) < MIN_PASSWORD_CHARS:
        return f"a password has at least {MIN_PASSWORD_CHARS} characters"
    if not _hashable(password):
        return f"a password is valid UTF-8 of at most {MAX_PASSWORD_BYTES} bytes"
    return None


class Passwords:
    """argon2id (argon2-cffi's defaults unless told otherwise: tests pass cheaper settings)."""

    def __init__(
        self,
        *,
        time_cost: int | None = None,
        memory_cost: int | None = None,
        parallelism: int | None = None,
        concurrent: int = 2,
    ) -> None:
        settings = {"time_cost": time_cost, "memory_cost": memory_cost, "parallelism": parallelism}
        self.hasher = PasswordHasher(**{name: value for name, value in settings.items() if value is not None})
        self._dummy = self.hasher.hash(secrets.token_urlsafe(16))  # what an unknown user is checked against
        self._slots = asyncio.Semaphore(concurrent)

    def hash_now(self, password: str) -> str:
        """Blocking: for the CLI, or inside :meth:`hash`."""
        return self.hasher.hash(password)

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self.hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        """Whether ``password`` matches ``stored``; with ``stored`` None (no such user) the dummy
        hash is checked all the same, and the answer is False."""
        if not _hashable(password):
            return False  # never hashed, whoever asks (answered as any wrong password)
        async with self._slots:
            matches = await asyncio.to_thread(self._matches, stored or self._dummy, password)
        return matches and stored is not None

    def _matches(self, stored: str, password: str) -> bool:
        try:
            return self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False
