"""A pooled HTTP/1.1 client for the calls on the request path: a cloud provider's answer, an
upstream server's answer.

Why not httpx on this path: measured here (bench/clouds.py, 2 cores), one ``AsyncClient.post``
costs 0.45-0.6 ms of CPU (its request and URL models, cookies, httpcore's state machine over
anyio), more than half of the 1 ms a cloud call may add. This client is asyncio transports with
httptools' C parser (a dependency of ``uvicorn[standard]``, which the gateway serves with):
one write per request, the response parsed as its bytes arrive, keep-alive connections reused
newest first, about 40 µs a call. It does what those calls need and no more: one base URL,
``Content-Length`` request bodies, responses with a length, chunked or until close, streaming
with back-pressure, TLS, a connect timeout and a per-request deadline. httpx stays the client
for everything else (model lists, health checks) and for providers reached through a proxy
(``HTTPS_PROXY``...), which this client does not speak: :func:`client_for` picks.

Errors are :class:`ConnectFailed`, :class:`Timeout` and :class:`ProtocolError`; a request on a
reused connection that the server had closed meanwhile is sent again once on a new one.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import httptools
import httpx

MAX_BUFFERED = 1 << 20  # a streamed body's bytes waiting for the reader before reading pauses
MAX_IDLE = 256


class HttpError(Exception):
    """The request got no complete answer."""


class ConnectFailed(HttpError):
    pass


class Timeout(HttpError):
    pass


class ProtocolError(HttpError):
    pass


class Response:
    """A response whose body arrives as it comes: ``read()`` it whole, or ``iter_bytes()`` it;
    ``aclose()`` ends it (a complete one gives its connection back to the pool)."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._closed = False
        self.content = b""  # the body, once read()

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    # fed by the connection
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > MAX_BUFFERED:
            self._connection.pause()
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if error is not None and not self._complete:
            self._error = error
        self._complete = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next(self) -> bytes | None:
        while not self._chunks:
            if self._complete:
                if self._error is not None:
                    raise self._error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        chunks = self._chunks  # all that arrived since the last read, as one piece
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._buffered <= MAX_BUFFERED // 2:
            self._connection.resume()
        return data

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        while (data := await self._next()) is not None:
            yield data

    async def read(self) -> bytes:
        if self._closed:  # read already (a non-streamed request is read before it is returned)
            return self.content
        try:
            parts = [data async for data in self.iter_bytes()]
        finally:
            await self.aclose()
        self.content = parts[0] if len(parts) == 1 else b"".join(parts)
        return self.content

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._connection.done(reusable=self._complete and self._error is None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time, parsed by httptools."""

    def __init__(self, pool: Client) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.headers_ready: asyncio.Future | None = None
        self.lost = False
        self.received = False  # any byte of the current response
        self.keep_alive = True
        self.until_close = False  # the current body has neither a length nor chunks
        self.paused = False
        self.deadline: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(ProtocolError(f"unreadable HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.until_close and exc is None and self.response is not None:
            self.on_message_complete()  # a body without length or chunks ends with the connection
            return
        self.fail(ProtocolError(f"connection closed by the server{f': {exc}' if exc else ''}"))

    # ------------------------------------------------------------ httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        names = {name for name, _ in response.headers}
        chunked = any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in response.headers)
        self.until_close = b"content-length" not in names and not chunked and response.status not in (204, 304)
        if self.until_close:
            self.keep_alive = False
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.response is not None:
            self.response._finish()

    # ------------------------------------------------------------ requests

    def fail(self, error: BaseException) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_exception(error)
        if self.response is not None:
            self.response._finish(error)
        if self.transport is not None and not self.lost:
            self.transport.close()

    def timed_out(self) -> None:
        self.deadline = None
        self.fail(Timeout("no complete answer in time"))

    async def send(self, data: bytes, timeout: float) -> Response:
        loop = asyncio.get_running_loop()
        self.response = Response(self)
        self.received = False
        self.until_close = False
        self.headers_ready = loop.create_future()
        self.deadline = loop.call_later(timeout, self.timed_out)
        self.transport.write(data)
        await self.headers_ready
        return self.response

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()

    def done(self, *, reusable: bool) -> None:
        """The response ended (read whole, or closed by its reader)."""
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.response = None
        self.resume()
        if reusable and self.keep_alive and not self.lost:
            self.parser = httptools.HttpResponseParser(self)
            self.pool._idle.append(self)
            while len(self.pool._idle) > MAX_IDLE:
                self.pool._idle.popleft().close()
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()
        self.lost = True


class _BaseClient:
    """What both clients share: their options and ``get`` on top of each one's ``request``, so
    ``client_for`` can hand out either."""

    def __init__(self, base_url: str, *, timeout: float = 600.0, connect_timeout: float = 10.0) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        timeout: float | None = None,
    ) -> Response | _HttpxResponse:
        """The response; its body read whole unless ``stream`` (then ``iter_bytes`` and ``aclose``)."""
        return await self._send(method, path, body, headers, stream, timeout)

    async def _send(self, method, path, body, headers, stream, timeout) -> Response | _HttpxResponse:
        """``request`` over this client's transport (its arguments as ``request`` types them)."""
        raise NotImplementedError

    async def get(
        self, path: str, *, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Response | _HttpxResponse:
        query = f"?{urlencode(params)}" if params else ""
        return await self.request("GET", path + query, timeout=timeout)


class Client(_BaseClient):
    """Requests to one base URL over pooled keep-alive connections."""

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None, **options: Any) -> None:
        super().__init__(base_url, **options)
        parts = urlsplit(self.base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = parts.path
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        self.authority = host if default_port else f"{host}:{self.port}"
        fixed = {"host": self.authority, "user-agent": "llm-router", "accept-encoding": "identity", **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: deque[_Connection] = deque()
        self._closed = False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise Timeout(f"no connection to {self.authority} within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.authority}: {exc.strerror or exc}") from None
        return connection

    def _head(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None) -> bytes:
        head = f"{method} {self.path}{path} HTTP/1.1\r\n".encode("latin-1") + self._fixed
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        if body is not None:
            head += b"content-length: %d\r\n" % len(body)
        return head + b"\r\n" + (body or b"")

    async def _send(self, method, path, body, headers, stream, timeout) -> Response:
        if self._closed:
            raise ConnectFailed("the client is closed")
        data = self._head(method, path, body, headers)
        for attempt in (0, 1):
            connection = None
            while self._idle:
                candidate = self._idle.pop()
                if not candidate.lost:
                    connection = candidate
                    break
            reused = connection is not None
            if connection is None:
                connection = await self._connect()
            try:
                response = await connection.send(data, timeout or self.timeout)
            except ProtocolError:
                connection.close()
                if reused and not connection.received and attempt == 0:
                    continue  # the server had closed the idle connection: once more on a new one
                raise
            except BaseException:
                connection.close()
                raise
            if not stream:
                await response.read()
            return response
        raise ProtocolError("unreachable")  # the loop returns or raises

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


class HttpxClient(_BaseClient):
    """The same interface over httpx, for a base URL reached through a proxy."""

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None, **options: Any) -> None:
        super().__init__(base_url, **options)
        self.client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout), follow_redirects=False
        )

    async def _send(self, method, path, body, headers, stream, timeout) -> _HttpxResponse:
        options: dict[str, Any] = {"timeout": timeout} if timeout else {}
        request = self.client.build_request(method, self.base + path, content=body, headers=headers, **options)
        try:
            response = await self.client.send(request, stream=True)
            wrapped = _HttpxResponse(response)
            if not stream:
                await wrapped.read()
            return wrapped
        except httpx.TimeoutException as exc:
            raise Timeout(str(exc) or "no answer in time") from None
        except httpx.ConnectError as exc:
            raise ConnectFailed(str(exc)) from None
        except httpx.HTTPError as exc:
            raise ProtocolError(str(exc) or type(exc).__name__) from None

    async def aclose(self) -> None:
        await self.client.aclose()


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = [(k.lower(), v) for k, v in response.headers.raw]
        self.content = b""

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._response.aiter_bytes():
                yield data
        except httpx.TimeoutException as exc:
            raise Timeout(str(exc) or "no answer in time") from None
        except httpx.HTTPError as exc:
            raise ProtocolError(str(exc) or type(exc).__name__) from None

    async def read(self) -> bytes:
        if self._response.is_closed:
            return self.content
        self.content = b"".join([data async for data in self.iter_bytes()])
        await self.aclose()
        return self.content

    async def aclose(self) -> None:
        await self._response.aclose()


def proxied(base_url: str) -> bool:
    """Whether the environment sends requests to ``base_url`` through a proxy."""
    host = urlsplit(base_url).hostname or ""
    proxies = urllib.request.getproxies()
    scheme = urlsplit(base_url).scheme
    return bool(proxies.get(scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host)


def client_for(base_url: str, **options: Any) -> Client | HttpxClient:
    """The fast client, or httpx where a proxy is configured for this URL."""
    return HttpxClient(base_url, **options) if proxied(base_url) else Client(base_url, **options)
