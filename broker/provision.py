"""Create the streams, KV buckets and object stores of ``events.storage``, idempotently.

Safe to run from every component at start-up, concurrently: missing resources are created,
existing streams updated to the declared settings (KV buckets and object stores: their replicas).

Replicas: on a JetStream cluster every stream, bucket and store can be kept on ``replicas``
servers (3 survives the loss of one). An explicit count (``--replicas`` /
``LLM_ROUTER_NATS_REPLICAS``) is applied to what exists too (``update_stream`` moves a stream
to more or fewer peers); without one, new resources get 1 and existing ones keep theirs, so
a component started without the option cannot quietly take a cluster's copies away.

Roles (``broker.permissions``): with a credential minted by ``broker.credentials`` a component
provisions what its role creates (the gateway: everything; the registry: what it writes) and
waits for what it only binds (a node creates nothing, so it may not rewrite a bucket's config).
Without one, it provisions everything, as on an open server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import StreamConfig, StreamInfo
from nats.js.errors import APIError, BadRequestError, NotFoundError

from events import storage

from . import permissions

log = structlog.get_logger("broker.provision")

REPLICAS_ENV = "LLM_ROUTER_NATS_REPLICAS"
# JetStream error codes (nats-server's errors.json).
JS_TEMPORARILY_UNAVAILABLE = 10008  # no meta leader yet (cluster forming, or a leader election)
JS_INSUFFICIENT_RESOURCES = 10023  # fewer JetStream servers than replicas
JS_REPLICAS_NOT_SUPPORTED = 10074  # replicas > 1 on a server that is not clustered
JS_NO_PEERS = 10005  # no suitable peers for placement (replicas > cluster size)
JS_CONFIG_IN_USE = 10058  # stream name already in use with a different configuration


def replica_count(explicit: int | str | None = None) -> int | None:
    """The replica setting: ``explicit``, else ``LLM_ROUTER_NATS_REPLICAS``, else None (keep)."""
    value = explicit if explicit not in (None, "") else os.environ.get(REPLICAS_ENV) or None
    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= 5:  # a start-up error like the others components raise, printed in one line
        raise RuntimeError(f"NATS replicas must be 1 to 5 (JetStream's limit), not {value!r}")
    return count


async def provision(
    js: JetStreamContext, replicas: int | None = None, *, role: str | None = None, timeout: float = 30.0
) -> None:
    """Provision what ``role`` creates (None: everything) and wait for what it binds; retried
    while the cluster has no JetStream leader (a cluster that is still forming, or electing
    after a server died) or a stream to bind is missing, for up to ``timeout`` seconds."""
    count = replica_count(replicas)
    deadline = time.monotonic() + timeout
    creates = permissions.creates(role)
    missing = set(permissions.binds(role))
    while True:
        try:
            await _provision(js, count, creates)
            missing = {stream for stream in missing if not await _exists(js, stream)}
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"NATS has no {', '.join(sorted(missing))} yet, and a {role} may not create them: "
                    "start the gateway (or the registry) first"
                )
            reason = f"waiting for {', '.join(sorted(missing))}"
        except APIError as exc:
            if exc.err_code in (JS_INSUFFICIENT_RESOURCES, JS_REPLICAS_NOT_SUPPORTED, JS_NO_PEERS):
                raise RuntimeError(
                    f"cannot keep NATS data on {count} servers: {exc.description} "
                    "(--replicas N needs a JetStream cluster of at least N servers)"
                ) from exc
            if exc.err_code != JS_TEMPORARILY_UNAVAILABLE or time.monotonic() > deadline:
                raise
            reason = exc.description
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            if time.monotonic() > deadline:
                raise
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("JetStream not ready, provisioning again", reason=reason)
        await asyncio.sleep(0.5)


async def _provision(js: JetStreamContext, replicas: int | None, creates: frozenset[str] | None) -> None:
    for config in storage.STREAMS:
        if creates is None or config.name in creates:
            await _stream(js, config, replicas)
    buckets = [
        (
            permissions.kv_stream(kv.bucket),
            lambda r, kv=kv: js.create_key_value(config=dataclasses.replace(kv, replicas=r)),
        )
        for kv in storage.KEY_VALUES
    ] + [
        (
            permissions.obj_stream(obj.bucket),
            lambda r, obj=obj: js.create_object_store(bucket=obj.bucket, config=dataclasses.replace(obj, replicas=r)),
        )
        for obj in storage.OBJECT_STORES
    ]
    for stream, build in buckets:  # a bucket is a stream its client library creates: ``build(replicas)``
        if creates is None or stream in creates:
            await _built_stream(js, stream, replicas, build)


async def _exists(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except NotFoundError:
        return False
    return True


async def _stream(js: JetStreamContext, config: StreamConfig, replicas: int | None) -> None:
    """One of ``storage.STREAMS``: created, or updated to the declared settings.

    While a stream is being rescaled, its info can still show the old replica count (either way).
    So an explicit count is always written, and without one the stream is updated only when its
    other settings differ: writing back a count just read could undo another component's rescale.
    """
    try:
        current = (await _settled(js, config.name)).config
    except NotFoundError:
        try:
            await js.add_stream(dataclasses.replace(config, num_replicas=replicas or 1))
            return
        except BadRequestError:  # another component created it a moment ago
            current = (await _settled(js, config.name)).config
    wanted = dataclasses.replace(config, num_replicas=replicas or current.num_replicas or 1)
    if replicas is None and _declared(wanted) == _declared(current, like=wanted):
        return
    if wanted.num_replicas != current.num_replicas:
        log.info("changing stream replicas", stream=config.name, replicas=wanted.num_replicas, was=current.num_replicas)
    await js.update_stream(wanted)


async def _settled(js: JetStreamContext, name: str, timeout: float = 10.0) -> StreamInfo:
    """The stream's info once it has a leader. One that another component is creating has none
    yet, and an update sent then goes unanswered, as does the create (nats-server 2.15)."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.stream_info(name)
        if info.cluster is None or info.cluster.leader or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.1)


def _declared(config: StreamConfig, like: StreamConfig | None = None) -> dict[str, object]:
    """The fields ``like`` (default: ``config``) sets away from StreamConfig's defaults, as
    ``config`` has them: what ``events.storage`` declares, not what the server fills in."""
    like = like or config
    names = [
        f.name
        for f in dataclasses.fields(StreamConfig)
        if f.default is not dataclasses.MISSING and getattr(like, f.name) != f.default
    ]
    return {name: getattr(config, name) for name in names}


async def _built_stream(
    js: JetStreamContext, stream: str, replicas: int | None, create: Callable[[int], Awaitable[object]]
) -> None:
    """A KV bucket or object store, whose stream nats-py builds: created with the declared settings;
    once it exists only an explicit replica count is written (always, as in ``_stream``). Creating
    an existing one again would compare configs against a replica count that may be stale."""
    try:
        info = await _settled(js, stream)
    except NotFoundError:
        try:
            await create(replicas or 1)
            return
        except BadRequestError as exc:
            if exc.err_code != JS_CONFIG_IN_USE:
                raise
            info = await _settled(js, stream)  # another component created it a moment ago
    if replicas:
        current = info.config.num_replicas or 1
        if replicas != current:
            log.info("changing stream replicas", stream=stream, replicas=replicas, was=current)
        await js.update_stream(dataclasses.replace(info.config, num_replicas=replicas))
