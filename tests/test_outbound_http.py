"""The outbound HTTP client (outbound/http.py) against real local servers: raw asyncio ones for
the edge cases of HTTP/1.1 (a keep-alive connection the server closed, a body that ends with the
connection, chunks split across reads), and the fake OpenAI for the httpx path used behind proxies."""

from __future__ import annotations

import asyncio

import pytest
from fake_providers import KEYS, FakeOpenAI

from gateway.providers import ProviderSettings
from gateway.providers.openai_compatible import OpenAIProvider
from gateway.providers.routes import Meta
from outbound.http import Client, ConnectFailed, HttpxClient, ProtocolError, Timeout, client_for, proxied


async def raw_server(handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + (await reader.readexactly(length) if length else b"")


async def test_a_keep_alive_connection_the_server_closed_is_replaced_once() -> None:
    served = []

    async def once_then_close(reader, writer) -> None:  # answers one request per connection, then closes
        request = await read_request(reader)
        served.append(request)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server, url = await raw_server(once_then_close)
    client = Client(url + "/v1", headers={"authorization": "Bearer k"})
    try:
        first = await client.request("POST", "/x", b"{}")
        await asyncio.sleep(0.2)  # the server has closed it: the client notices, or finds out on writing
        second = await client.request("POST", "/x", b"{}")
        assert (first.status, first.content, second.content) == (200, b"ok", b"ok")
        assert all(r.startswith(b"POST /v1/x HTTP/1.1\r\n") and b"authorization: Bearer k" in r for r in served)
    finally:
        await client.aclose()
        server.close()


async def test_chunks_split_across_reads_and_a_body_that_ends_with_the_connection() -> None:
    async def awkward(reader, writer) -> None:  # keep-alive: one request after the other
        while True:
            request = await read_request(reader)
            if b"/chunked" in request:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"lo\r\n6\r\n world\r\n0\r\n\r\n")
                await writer.drain()
            else:  # HTTP/1.0 style: no length, the end of the connection ends the body
                writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
                await writer.drain()
                writer.close()
                return

    server, url = await raw_server(awkward)
    client = Client(url)
    try:
        streamed = await client.request("GET", "/chunked", stream=True)
        pieces = [piece async for piece in streamed.iter_bytes()]
        await streamed.aclose()
        assert b"".join(pieces) == b"hello world" and len(pieces) >= 2  # given on as each part arrived
        assert (await client.request("GET", "/close")).content == b"until the end"
    finally:
        await client.aclose()
        server.close()


async def test_connection_failures_and_deadlines_are_their_own_errors() -> None:
    async def silent(reader, writer) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def truncated(reader, writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await writer.drain()
        writer.close()

    slow, slow_url = await raw_server(silent)
    cut, cut_url = await raw_server(truncated)
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    try:
        with pytest.raises(ConnectFailed):
            await Client(f"http://127.0.0.1:{port}").request("GET", "/")
        with pytest.raises(Timeout):
            await Client(slow_url).request("GET", "/", timeout=0.2)
        with pytest.raises(ProtocolError):
            await Client(cut_url).request("GET", "/")
    finally:
        slow.close()
        cut.close()


def test_a_proxy_in_the_environment_selects_httpx(monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    assert proxied("https://api.openai.com/v1") and isinstance(client_for("https://api.openai.com/v1"), HttpxClient)
    assert not proxied("https://internal.example/v1") and isinstance(client_for("https://internal.example/v1"), Client)


async def test_the_httpx_path_serves_a_provider_the_same() -> None:
    fake = await FakeOpenAI().start()
    provider = OpenAIProvider(ProviderSettings("openai", KEYS["openai"], fake.url + "/v1"))
    provider._client = HttpxClient(fake.url + "/v1", headers=provider.auth_headers())
    meta = Meta("chatcmpl-x", 0, "openai:gpt-4o-mini")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "via httpx"}]}
    try:
        answer = await provider.complete("chat", dict(body), meta)
        assert b"echo: via httpx" in answer.body and answer.usage.completion_tokens == 3
        stream = await provider.stream("chat", dict(body, stream=True), meta, client_wants_usage=True)
        out = b"".join([piece async for piece in stream.chunks])
        await stream.close()
        assert out.endswith(b"data: [DONE]\n\n") and "".join(stream.transcript.text) == "echo: via httpx"
        assert [m.id for m in await provider.models()][:2] == ["gpt-4o-mini", "gpt-4o"]
    finally:
        await provider.aclose()
        await fake.stop()
