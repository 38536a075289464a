"""Reading server-sent events (``text/event-stream``), as OpenAI-compatible servers stream answers.

Shared by the gateway's cloud providers and the node's upstream engine: both relay each event as
soon as its blank line arrives, never waiting for more of the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

Event = tuple[str, bytes]  # (event name, data)


async def sse_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[Event]]:
    """The events completed by each piece of an SSE byte stream, as soon as it arrives: one list
    per network read, so a relay can pass several events on with one write.

    Multi-line data is joined with newlines; comments and ``id``/``retry`` fields are skipped;
    an event without a name is a ``message`` (the SSE default)."""
    pending = b""
    event, data = "", []
    async for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()  # an incomplete last line waits for the next chunk
        batch: list[Event] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    batch.append((event or "message", b"\n".join(data)))
                event, data = "", []
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", "replace")
        if batch:
            yield batch
    if pending.startswith(b"data:"):
        data.append(pending[6:] if pending[5:6] == b" " else pending[5:])
    if data:
        yield [(event or "message", b"\n".join(data))]


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[Event]:
    """Each event of an SSE byte stream as soon as its blank line comes."""
    async for batch in sse_batches(chunks):
        for item in batch:
            yield item
