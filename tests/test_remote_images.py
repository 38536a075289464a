"""A vision chat's http(s) image_url: fetched by the node's guarded fetcher, never from an internal address.

The fetcher runs against real HTTP servers (threaded ``http.server`` on 127.0.0.1); addresses
that nothing listens on (169.254.169.254, 10.0.0.1...) are refused before any connection. The
end-to-end part runs registry, gateway and a node (``--allow-fetch-host`` for one server) as
processes, a tiny vision model (the tiny GGUF and a tiny projector), and the openai SDK.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import Stack, requires_llama, wait_until

from llm_router.cli import _image_fetcher, _node_argv, _node_settings, build_parser
from nodes.remote_media import FetchRefused, ImageFetcher, ImageFetchError
from nodes.runtimes import LlamaCppRuntime

pytest.importorskip("PIL")
from tiny_models import make_png  # noqa: E402

PNG = make_png(40, 40)


class ImageServer:
    """A real HTTP server on 127.0.0.1 with one path per behaviour; remembers the Host headers it saw."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: serve HTTPS with that context (the TLS server names asked for land in ``sni``)."""
        self.hosts: list[str] = []
        self.sni: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the connection closes

            def log_message(self, *args) -> None:
                pass  # quiet: pytest shows failures, not every request

            def do_GET(self) -> None:
                server.hosts.append(self.headers.get("Host", ""))
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                route = getattr(server, "route_" + url.path.strip("/").replace("-", "_"), None)
                if route is None:
                    self.send_error(404)
                    return
                route(self, query)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            tls.sni_callback = lambda sock, name, context: self.sni.append(name)
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def _send(handler, body: bytes, content_type: str | None, *, length: int | None = None) -> None:
        handler.send_response(200)
        if content_type:
            handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)

    def route_png(self, h, q) -> None:
        self._send(h, PNG, "image/png")

    def route_untyped(self, h, q) -> None:
        self._send(h, PNG, None)  # no content type: the first bytes say PNG

    def route_html(self, h, q) -> None:
        self._send(h, b"<html>secret admin page</html>", "text/html")

    def route_octets(self, h, q) -> None:
        self._send(h, b"root:x:0:0:root:/root:/bin/bash\n", "application/octet-stream")

    def route_declared_big(self, h, q) -> None:
        self._send(h, PNG[:16], "image/png", length=int(q["bytes"]))  # says it is big; sends little

    def route_endless(self, h, q) -> None:
        """An image with no Content-Length that never ends: counted as it streams."""
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.end_headers()
        h.wfile.write(PNG[:8])
        try:
            for _ in range(10_000):
                h.wfile.write(b"\0" * 65536)
        except OSError:
            pass  # the fetcher hung up at its limit: what this route is for

    def route_slow(self, h, q) -> None:
        time.sleep(float(q["s"]))
        try:
            self._send(h, PNG, "image/png")
        except OSError:
            pass  # the fetcher timed out and hung up: what this route is for

    def route_drip(self, h, q) -> None:
        """Headers at once, then a byte every 0.1 s: no single read is slow, the whole is."""
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.end_headers()
        try:
            for byte in PNG[:60]:
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the fetcher gave up: what this route is for

    def route_redirect(self, h, q) -> None:
        h.send_response(302)
        h.send_header("Location", q["to"])
        h.send_header("Content-Length", "0")
        h.end_headers()

    def route_loop(self, h, q) -> None:
        h.send_response(307)
        h.send_header("Location", "/loop")
        h.send_header("Content-Length", "0")
        h.end_headers()


@pytest.fixture(scope="module")
def server():
    s = ImageServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def other():
    """A second server, never allowed: where a redirect may try to go."""
    s = ImageServer()
    yield s
    s.close()


@pytest.fixture
def allowed(server) -> ImageFetcher:
    return ImageFetcher.from_settings(allow_hosts=[f"127.0.0.1:{server.port}"], total_timeout_s=5.0)


def refusal(fetcher: ImageFetcher, url: str) -> str:
    with pytest.raises(FetchRefused) as err:
        fetcher.fetch(url)
    assert err.value.code == "image_url_refused"
    return str(err.value)


# ------------------------------------------------------------ addresses


def test_loopback_is_refused_without_an_allowance(server) -> None:
    before = len(server.hosts)
    message = refusal(ImageFetcher(), server.base + "/png")
    assert "127.0.0.1" in message and "loopback" in message and "--allow-fetch-host" in message
    assert len(server.hosts) == before  # never connected


def test_localhost_is_refused_by_what_it_resolves_to(server) -> None:
    message = refusal(ImageFetcher(), f"http://localhost:{server.port}/png")
    assert "localhost" in message and "loopback" in message


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata service"),
        ("http://METADATA.google.internal./x", "metadata service"),
        ("http://10.0.0.1/x.png", "private"),
        ("http://172.16.5.4/x.png", "private"),
        ("http://192.168.1.1/x.png", "private"),
        ("http://100.64.0.1/x.png", "carrier-grade NAT"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://224.0.0.1/x.png", "multicast"),
        ("http://240.0.0.1/x.png", "reserved"),
        ("http://2130706433/x.png", "loopback"),  # 127.0.0.1 written as one number
        ("http://[::1]/x.png", "loopback"),
        ("http://[::ffff:169.254.169.254]/x.png", "link-local"),  # IPv4-mapped
        ("http://[fe80::1]/x.png", "link-local"),
        ("http://[fd00::1]/x.png", "private"),
        ("https://[::]/x.png", "unspecified"),
    ],
)
def test_internal_addresses_are_refused_before_connecting(url, why) -> None:
    started = time.monotonic()
    assert why in refusal(ImageFetcher(), url)
    assert time.monotonic() - started < 1.0  # nothing listens there: no connection was tried


def test_only_http_and_https(server) -> None:
    assert "only http and https" in refusal(ImageFetcher(), "file:///etc/passwd")
    assert "only http and https" in refusal(ImageFetcher(), "ftp://example.com/x.png")


def test_every_resolved_address_must_be_public(monkeypatch) -> None:
    """A name with one public and one internal address is refused (the resolver answers here)."""
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):
        if host == "mixed.example":
            return real("8.8.8.8", port, *args, **kwargs) + real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    message = refusal(ImageFetcher(), "http://mixed.example/x.png")
    assert "127.0.0.1 (which mixed.example resolves to)" in message


def test_the_connection_goes_to_the_address_checked_with_the_name_kept(server, monkeypatch) -> None:
    """DNS rebinding: a name answers once with the checked address, then with another. The fetch
    resolves it once, connects to that address, and sends the name as Host."""
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1", "127.0.0.2"])  # nothing listens on 127.0.0.2
    asked: list[str] = []

    def resolver(host, port, *args, **kwargs):
        if host == "rebind.example":
            asked.append(host)
            return real(next(answers), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    fetcher = ImageFetcher.from_settings(allow_hosts=["rebind.example"])
    content, kind = fetcher.fetch(f"http://rebind.example:{server.port}/png")
    assert (content, kind) == (PNG, "image/png")
    assert asked == ["rebind.example"] and server.hosts[-1] == f"rebind.example:{server.port}"


def test_https_to_the_pinned_address_keeps_the_name_for_sni_and_the_certificate(tmp_path, monkeypatch) -> None:
    """The certificate names only images.test: the fetch connects to the checked IP yet asks for,
    and verifies, that name (a certificate for another name is refused)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=images.test"]
        + ["-addext", "subjectAltName=DNS:images.test", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert, key)
    tls_server = ImageServer(tls=served)
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):  # images.test and other.test are this machine
        return real("127.0.0.1" if host in ("images.test", "other.test") else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        fetcher = ImageFetcher.from_settings(allow_hosts=["images.test", "other.test"], verify=trust)
        assert fetcher.fetch(f"https://images.test:{tls_server.port}/png") == (PNG, "image/png")
        assert tls_server.sni[-1] == "images.test" and tls_server.hosts[-1] == f"images.test:{tls_server.port}"
        with pytest.raises(ImageFetchError) as err:
            fetcher.fetch(f"https://other.test:{tls_server.port}/png")  # same server, a name the cert lacks
        assert "certificate" in str(err.value).lower()
        with pytest.raises(ImageFetchError):  # without the CA: not trusted
            ImageFetcher.from_settings(allow_hosts=["images.test"]).fetch(f"https://images.test:{tls_server.port}/png")
    finally:
        tls_server.close()


# ------------------------------------------------------------ allowed hosts and redirects


def test_an_allowed_host_is_served_as_a_data_url(server, allowed) -> None:
    url = allowed.data_url(server.base + "/png")
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == PNG
    assert server.hosts[-1] == f"127.0.0.1:{server.port}"
    by_name = ImageFetcher.from_settings(allow_hosts=["LOCALHOST"])  # a name, any port, any case
    assert by_name.fetch(f"http://localhost:{server.port}/png") == (PNG, "image/png")


def test_redirects_are_checked_at_every_hop(server, other, allowed) -> None:
    assert allowed.fetch(f"{server.base}/redirect?to=/png") == (PNG, "image/png")  # same allowed host: followed
    for target, why in (
        (f"{other.base}/png", "loopback"),  # another port of 127.0.0.1: not the allowed host:port
        (f"http://localhost:{server.port}/png", "loopback"),  # the same server, by a name that is not allowed
        ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "link-local"),
        ("http://[::ffff:127.0.0.1]/png", "loopback"),
        ("file:///etc/passwd", "only http and https"),
    ):
        before = len(server.hosts)
        assert why in refusal(allowed, f"{server.base}/redirect?to={target}"), target
        assert len(server.hosts) == before + 1 and not other.hosts, target  # the redirect only
    assert "redirects more than 5 times" in refusal(allowed, server.base + "/loop")


# ------------------------------------------------------------ limits and content


def test_size_limit_on_content_length_and_while_streaming(server) -> None:
    small = ImageFetcher.from_settings(allow_hosts=[f"127.0.0.1:{server.port}"], max_bytes=len(PNG))
    assert small.fetch(server.base + "/png") == (PNG, "image/png")  # exactly at the limit
    with pytest.raises(ImageFetchError) as err:
        small.fetch(f"{server.base}/declared-big?bytes={len(PNG) + 1}")
    assert err.value.code == "image_url_too_large" and f"{len(PNG) + 1} bytes" in str(err.value)
    limited = ImageFetcher.from_settings(allow_hosts=[f"127.0.0.1:{server.port}"], max_bytes=1_000_000)
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as err:
        limited.fetch(server.base + "/endless")
    assert err.value.code == "image_url_too_large" and "1000000" in str(err.value)
    assert time.monotonic() - started < 5  # stopped at the limit, not at the end of 650 MB


def test_timeouts_connect_read_and_total(server) -> None:
    host = [f"127.0.0.1:{server.port}"]
    fetcher = ImageFetcher.from_settings(allow_hosts=host, total_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as err:
        fetcher.fetch(server.base + "/slow?s=3")
    assert "timed out" in str(err.value) and time.monotonic() - started < 2
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as err:
        fetcher.fetch(server.base + "/drip")  # each byte within the read timeout; the whole is not
    assert "took over 0.5 s" in str(err.value) and time.monotonic() - started < 2


def test_only_images(server, allowed) -> None:
    with pytest.raises(ImageFetchError) as err:
        allowed.fetch(server.base + "/html")
    assert err.value.code == "image_url_not_image" and "text/html" in str(err.value)
    with pytest.raises(ImageFetchError) as err:
        allowed.fetch(server.base + "/octets")  # no image type and no image bytes
    assert err.value.code == "image_url_not_image"
    assert allowed.fetch(server.base + "/untyped") == (PNG, "image/png")  # sniffed
    with pytest.raises(ImageFetchError) as err:
        allowed.fetch(server.base + "/missing.png")
    assert "HTTP 404" in str(err.value)


def test_remote_images_can_be_switched_off(server) -> None:
    off = ImageFetcher.from_settings(enabled=False, allow_hosts=[f"127.0.0.1:{server.port}"])
    assert "--no-remote-images" in refusal(off, server.base + "/png")


# ------------------------------------------------------------ options


def test_options_reach_the_runtime_also_through_up(monkeypatch) -> None:
    args = build_parser().parse_args(
        ["up", "--allow-fetch-host", "images.lan:8000", "--allow-fetch-host", "cdn.lan", "--no-remote-images"]
    )
    argv = _node_argv(args, "nats://127.0.0.1:4222", Path("/tmp/x"))
    node = build_parser().parse_args(argv[3:])  # after `python -m llm_router`
    assert node.command == "node" and node.allow_fetch_host == ["images.lan:8000", "cdn.lan"]
    fetcher = _image_fetcher(node)
    assert fetcher == ImageFetcher(enabled=False, allow_hosts=frozenset({"images.lan:8000", "cdn.lan"}))
    llama = next(r for r in _node_settings(node)["runtimes"] if isinstance(r, LlamaCppRuntime))
    assert llama.images == fetcher
    monkeypatch.setenv("LLM_ROUTER_ALLOW_FETCH_HOSTS", "a.lan,b.lan:81")
    from_env = build_parser().parse_args(["node"])
    assert _image_fetcher(from_env).allow_hosts == {"a.lan", "b.lan:81"} and _image_fetcher(from_env).enabled


# ------------------------------------------------------------ end to end

VISION = "fetch-vision"


@pytest.fixture(scope="module")
def stack(nats_url, server, tiny_gguf, tmp_path_factory):
    pytest.importorskip("gguf")
    from tiny_models import build_tiny_mmproj

    stack = Stack(nats_url, tmp_path_factory.mktemp("fetch"), node=False)
    stack.node = stack.start_node("node", "--allow-fetch-host", f"127.0.0.1:{server.port}")
    folder = tmp_path_factory.mktemp("fetch-vision")
    (folder / "tiny-vision.gguf").write_bytes(tiny_gguf.read_bytes())
    build_tiny_mmproj(folder / "mmproj-tiny.gguf")
    assert stack.register(folder / "tiny-vision.gguf", VISION)["ok"]
    wait_until(lambda: VISION in stack.models(), timeout=60, message="the vision model served")
    yield stack
    stack.close()


def vision_messages(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


@requires_llama
def test_a_vision_chat_through_the_gateway_refuses_internal_urls_and_fetches_allowed_ones(stack, server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for url, shown in (
        (f"http://localhost:{server.port}/png", "localhost"),  # the image server, but not by its allowed name
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    ):
        before = len(server.hosts)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=VISION, messages=vision_messages(url), max_tokens=2)
        body = err.value.body
        assert body["code"] == "image_url_refused" and body["param"] == "messages", body
        assert body["type"] == "invalid_request_error" and shown in body["message"], body
        assert len(server.hosts) == before
    out = client.chat.completions.create(model=VISION, messages=vision_messages(server.base + "/png"), max_tokens=2)
    assert out.usage.prompt_tokens > 16  # the projector's 16 image tokens and the text: the image was seen
    assert server.hosts[-1] == f"127.0.0.1:{server.port}"
    inline = "data:image/png;base64," + base64.b64encode(PNG).decode()  # data: URLs need no fetch
    same = client.chat.completions.create(model=VISION, messages=vision_messages(inline), max_tokens=2)
    assert same.usage.prompt_tokens == out.usage.prompt_tokens
