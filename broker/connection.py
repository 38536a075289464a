"""Connecting to NATS: one place for URL, credentials, TLS, reconnect and backoff.

A component with a credential minted by ``broker.credentials`` connects with its identity's
inbox prefix (``broker.permissions``: the answers to its requests land where no other role may
read or write) and knows its role (``ResilientClient.role``), which decides what it provisions.

Every component uses :class:`ResilientClient`, nats-py's client with two changes that keep a
component online whatever it is asked to send:

- a subject the server would refuse (over its control-line limit) is refused here first, with
  :class:`SubjectTooLong`, before anything reaches the wire;
- a server ``-ERR`` that nats-py would answer by closing the client for good (any error but a
  stale connection or a permissions violation, ``Client._process_err``) is treated like a lost
  connection instead: the client reconnects and replays its subscriptions, JetStream consumers
  and KV watchers included, as after a broker restart;
- a permissions violation (a publish or subscription the credential does not allow) is
  reported to the error callback and changes nothing else: the server keeps the connection;
- each received payload is copied once out of the parser's buffer, not twice
  (:class:`_PayloadBuffer`).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from nats.aio.client import Client
from nats.errors import BadSubjectError, Error, FlushTimeoutError
from nats.protocol.parser import Parser

from .credentials import Identity, identity_of

log = structlog.get_logger("broker")

DEFAULT_URL = "nats://127.0.0.1:4222"

# nats-server refuses a control line (``PUB <subject> <reply> <size>``) over 4096 bytes with
# -ERR and closes the connection. Subjects are bounded well inside it, reply inboxes too.
MAX_SUBJECT_BYTES = 2048
MAX_REPLY_BYTES = 1024

_STALE = "stale connection"
_PERMISSIONS = "permissions violation"


class SubjectTooLong(BadSubjectError):
    """A subject longer than :data:`MAX_SUBJECT_BYTES`: refused locally, the client stays up."""

    def __str__(self) -> str:
        return f"nats: subject longer than {MAX_SUBJECT_BYTES} bytes"


_NOT_IN_SUBJECTS = frozenset(" \t\r\n")


def _check(subject: str, limit: int) -> None:
    """What nats-py checks on every publish (no empty subject, no white space: CR/LF would
    inject protocol), plus the length the server enforces, in one pass."""
    if not subject or not _NOT_IN_SUBJECTS.isdisjoint(subject):
        raise BadSubjectError
    if len(subject) > limit // 4 and len(subject.encode()) > limit:
        raise SubjectTooLong


class _PayloadBuffer(bytearray):
    """nats-py's receive buffer, sliced as memoryviews.

    Its parser takes each payload out with ``bytes(self.buf[a:b])``: two copies from a
    bytearray (the slice, then the bytes), one from a memoryview: fed 1 MiB messages in 32 KiB
    reads, the parser takes 45 instead of 67 ms per 50 MiB (a model file read from the object
    store, ``bench/downloads.py``). The parser
    uses a slice only inside ``bytes()``, so no view outlives the statement and the buffer
    can still be extended and trimmed (``tests/test_faults.py`` checks the payloads). Cost: the
    slice is a Python call, about 0.15-0.2 us more per received message of a few hundred bytes."""

    __slots__ = ()

    def __getitem__(self, key):
        if isinstance(key, slice):
            return memoryview(self)[key]
        return super().__getitem__(key)


class _Parser(Parser):
    def reset(self) -> None:  # on every (re)connection
        super().reset()
        self.buf = _PayloadBuffer()


class ResilientClient(Client):
    """nats-py's ``Client`` that never closes itself on a server error (see the module doc)."""

    identity: Identity | None = None  # from the credential, when minted by broker.credentials

    def __init__(self) -> None:
        super().__init__()
        self._ps = _Parser(self)

    @property
    def role(self) -> str | None:
        return self.identity.role if self.identity is not None else None

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: dict | None = None) -> None:
        _check(subject, MAX_SUBJECT_BYTES)
        if reply:
            _check(reply, MAX_REPLY_BYTES)
        await super().publish(subject, payload, reply, headers)

    async def subscribe(self, subject: str, *args, **kwargs):
        _check(subject, MAX_SUBJECT_BYTES)
        return await super().subscribe(subject, *args, **kwargs)

    async def flush(self, timeout: float = 10) -> None:
        """A barrier: once it returns, the server has read everything sent before it.

        nats-py writes its PING straight to the socket, ahead of commands still waiting for its
        flusher task, so its PONG can come back before a SUB sent just before it reached the
        server, and a component could say it is ready while a publish to it would still be lost.
        Here the waiting commands are written first."""
        flusher = self._flusher_task
        if self._pending_data_size and flusher is not None and not flusher.done() and self.is_connected:
            written = asyncio.get_running_loop().create_future()
            await self._flush_queue.put(written)
            try:
                await asyncio.wait_for(written, timeout)
            except TimeoutError:
                raise FlushTimeoutError from None
        await super().flush(timeout)

    async def _process_err(self, err_msg: str) -> None:
        lowered = err_msg.lower()
        err = Error(f"nats: {err_msg.strip(chr(39))}")
        if _PERMISSIONS in lowered:
            # A refused publish or subscription: the server keeps the connection, and so do we.
            # nats-py spots these by "Permissions Violation" only; nats-server 2.15 writes it in
            # lower case, and nats-py would then close the client for good.
            self._err = err
            await self._error_cb(err)
            return
        if _STALE in lowered or not self.is_connected:
            await super()._process_err(err_msg)
            return
        # The server closes this connection after the -ERR: reconnect as after any lost link.
        self._err = err
        await self._error_cb(err)
        await self._process_op_err(err)


def nats_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("LLM_ROUTER_NATS_URL") or DEFAULT_URL


# NatsAuth's fields and the LLM_ROUTER_ environment variables that default them.
AUTH_ENV = {"creds": "NATS_CREDS", "tls_ca": "NATS_TLS_CA", "tls_cert": "NATS_TLS_CERT", "tls_key": "NATS_TLS_KEY"}


@dataclass(frozen=True)
class NatsAuth:
    """How a component proves who it is to NATS: a ``.creds`` file, and TLS files (a CA to
    trust the server by, a client certificate and key where the server asks for one)."""

    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_env(cls) -> NatsAuth:
        """``LLM_ROUTER_NATS_CREDS``, ``..._TLS_CA``, ``..._TLS_CERT``, ``..._TLS_KEY``."""
        values = {field: os.environ.get("LLM_ROUTER_" + name) for field, name in AUTH_ENV.items()}
        return cls(**{field: Path(value).expanduser() for field, value in values.items() if value})

    def identity(self) -> Identity | None:
        return identity_of(self.creds) if self.creds is not None else None

    def tls_context(self) -> ssl.SSLContext | None:
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return context


async def connect(
    url: str | None = None,
    *,
    name: str,
    auth: NatsAuth | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    on_disconnect: Callable[[], None] | None = None,
) -> ResilientClient:
    """Connect with unlimited reconnects and jittered backoff; logs every state change.

    ``on_reconnect`` runs after every reconnection, once the subscriptions are replayed: where a
    component re-creates what the server may have lost (a fresh server has no streams, no
    consumers); it runs in its own task, so the client is serving meanwhile. ``on_disconnect``
    runs when the link drops (a gateway fails its queued requests fast). ``auth``: credentials
    and TLS (default: from the environment, :meth:`NatsAuth.from_env`).
    """
    url = nats_url(url)
    auth = auth if auth is not None else NatsAuth.from_env()
    identity = auth.identity()
    tls = auth.tls_context()
    recoveries: set[asyncio.Task] = set()

    async def error_cb(exc: Exception) -> None:
        log.warning("nats error", component=name, error=str(exc))

    async def disconnected_cb() -> None:
        log.warning("nats disconnected", component=name)
        if on_disconnect is not None:
            on_disconnect()

    async def recover() -> None:
        try:
            await on_reconnect()
        except Exception:
            log.exception("recovery after reconnect failed", component=name)

    async def reconnected_cb() -> None:
        log.info("nats reconnected", component=name)
        if on_reconnect is not None:
            task = asyncio.create_task(recover(), name=f"{name}-recover")
            recoveries.add(task)
            task.add_done_callback(recoveries.discard)

    async def closed_cb() -> None:
        log.info("nats connection closed", component=name)

    client = ResilientClient()
    client.identity = identity
    await client.connect(
        servers=[s.strip() for s in url.split(",")],
        name=name,
        user_credentials=str(auth.creds) if auth.creds is not None else None,
        inbox_prefix=identity.inbox_prefix if identity is not None else "_INBOX",
        tls=tls,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        closed_cb=closed_cb,
        # Requests may carry several MB (answers, embeddings); let the server's limit decide.
        pending_size=64 * 1024 * 1024,
        skip_subject_validation=True,  # ResilientClient.publish/subscribe validate (and bound) instead
    )
    return client
