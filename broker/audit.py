"""Writing the audit log: the AUDIT stream, one record per administrative action.

Every component that carries out admin actions (the gateway for HTTP clients, the registry
for requests over NATS, the ``llm-router keys`` CLI) appends through an :class:`AuditLog`, off
the path of the action itself (the same writer as history: a bounded backlog, acknowledgements,
retries, ``Nats-Msg-Id``). What goes in is names and statuses only: never a secret or a body.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from nats.js import JetStreamContext

from events import codec, subjects
from events.messages import AuditRecord

from .appender import StreamAppender

MAX_ACTOR_CHARS = 64  # an actor is a subject token: key ids, "user:<name>", or what a header claims
MAX_TARGET_CHARS = 256


def bounded(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, and valid UTF-8 (a header's undecodable bytes are
    surrogates here, which neither a subject nor JSON could carry)."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def audit_record(component: str, actor: str | None, action: str, status: int, **fields: Any) -> AuditRecord:
    """A record with its id and time; ``actor`` and ``target`` cut to their bounds."""
    target = fields.pop("target", None)
    return AuditRecord(
        id=uuid.uuid4().hex,
        at=time.time(),
        component=component,
        actor=bounded(actor or "anonymous", MAX_ACTOR_CHARS),
        action=action,
        status=status,
        target=bounded(str(target), MAX_TARGET_CHARS) if target is not None else None,
        **fields,
    )


def audit_subject(record: AuditRecord) -> str:
    return subjects.audit(record.component, record.action, record.actor)


class AuditLog(StreamAppender):
    """The audit records of one component, written in the background."""

    stream = "AUDIT"

    def __init__(self, nc: Any, component: str, **options: Any) -> None:
        super().__init__(nc, **options)
        self.component = component

    def subject(self, record: AuditRecord) -> str:
        return audit_subject(record)

    def record(self, actor: str | None, action: str, status: int, **fields: Any) -> AuditRecord:
        """Append one record (never blocks, never raises for NATS trouble)."""
        record = audit_record(self.component, actor, action, status, **fields)
        self.append(record)
        return record


async def publish_now(js: JetStreamContext, record: AuditRecord) -> None:
    """Write one record and wait for JetStream's acknowledgement: for a one-shot command."""
    await js.publish(audit_subject(record), codec.encode(record), headers={"Nats-Msg-Id": record.id})
