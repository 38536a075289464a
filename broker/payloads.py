"""Claim checks: binary payloads that travel beside NATS messages, not inside them.

A request or reply carries an :class:`events.messages.Attachment`: the bytes themselves when
they are small, else the name of an object in the ``payloads`` object store (a bucket with a
TTL, see ``events.storage``). The gateway and the nodes both use these helpers, so the rule
"inline up to a budget, object store beyond" lives in one place.

Reading goes through ``broker.blobs.read_blob`` into a buffer: nats-py's ``ObjectStore.get``
without ``writeinto`` is quadratic in the object's size.
"""

from __future__ import annotations

import io
import mimetypes
import uuid
from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from events.messages import Attachment
from events.storage import OBJ_PAYLOADS

from .blobs import blob_info, read_blob

# Inline bytes per message, in total: base64 makes them 4/3 larger, and the default NATS
# max_payload is 1 MiB, which must also hold the rest of the message.
INLINE_BUDGET = 384 * 1024


class PayloadMissing(LookupError):
    """The object behind an attachment is gone (consumed already, or expired)."""


def _object_name(filename: str, content_type: str) -> str:
    """A unique name keeping a file extension, so ``/v0/files/<name>`` can set the content type."""
    suffix = ""
    if "." in filename:
        suffix = "." + filename.rsplit(".", 1)[1][:8].lower()
    elif content_type:
        suffix = mimetypes.guess_extension(content_type.split(";")[0].strip()) or ""
    return uuid.uuid4().hex + "".join(c for c in suffix if c.isalnum() or c == ".")


async def store(js: JetStreamContext, data: bytes, *, content_type: str, filename: str = "") -> Attachment:
    """Put ``data`` in the payloads store, whatever its size (e.g. for a ``url`` answer)."""
    name = _object_name(filename, content_type)
    bucket = await js.object_store(OBJ_PAYLOADS)
    await bucket.put(name, data)
    return Attachment(size=len(data), content_type=content_type, filename=filename, object=name)


async def pack(
    js: JetStreamContext, items: Iterable[tuple[bytes, str, str]], *, budget: int = INLINE_BUDGET
) -> list[Attachment]:
    """Attachments for ``(data, content_type, filename)`` items: inline while the budget lasts."""
    out = []
    left = budget
    for data, content_type, filename in items:
        if len(data) <= left:
            left -= len(data)
            out.append(Attachment(size=len(data), content_type=content_type, filename=filename, data=data))
        else:
            out.append(await store(js, data, content_type=content_type, filename=filename))
    return out


async def attach(
    js: JetStreamContext, data: bytes, *, content_type: str, filename: str = "", budget: int = INLINE_BUDGET
) -> Attachment:
    (attachment,) = await pack(js, [(data, content_type, filename)], budget=budget)
    return attachment


async def load(js: JetStreamContext, attachment: Attachment, *, consume: bool = False) -> bytes:
    """The attachment's bytes; ``consume`` deletes its object afterwards (the reader is the last one)."""
    if attachment.object is None:
        return attachment.data or b""
    data = await read_object(js, attachment.object)
    if consume:
        await discard(js, [attachment])
    return data


async def read_object(js: JetStreamContext, name: str) -> bytes:
    info = await blob_info(js, name, bucket=OBJ_PAYLOADS)
    if info is None:
        raise PayloadMissing(f"payload {name} is gone (already consumed, or older than its TTL)")
    buffer = io.BytesIO()
    await read_blob(js, info, buffer, bucket=OBJ_PAYLOADS)
    return buffer.getvalue()


async def discard(js: JetStreamContext, attachments: Iterable[Attachment | None]) -> None:
    """Delete the objects behind ``attachments`` (inline ones need nothing); a missing one is fine."""
    names = [a.object for a in attachments if a is not None and a.object is not None]
    if not names:
        return
    bucket = await js.object_store(OBJ_PAYLOADS)
    for name in names:
        try:
            await bucket.delete(name)
        except NotFoundError:
            continue  # already deleted by another reader, or expired


async def exists(js: JetStreamContext, name: str) -> bool:
    return await blob_info(js, name, bucket=OBJ_PAYLOADS) is not None
