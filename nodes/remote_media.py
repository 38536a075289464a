"""Fetching the remote image of a vision chat without letting a request reach internal addresses.

A chat's ``image_url`` may be any http(s) URL, and the node that serves the model fetches it:
left to itself (llama.cpp's chat handler fetches URLs on its own), a request could make a node
read its cloud metadata service, a database's HTTP port or anything else only the node can
reach (SSRF). :class:`ImageFetcher` fetches it instead and hands llama.cpp a ``data:`` URL:

- it resolves the host itself and refuses when any address is loopback, private, link-local
  (the 169.254.169.254 metadata service among them), unspecified, multicast, reserved, shared
  (CGNAT) or otherwise not public, IPv4-mapped, 6to4 and NAT64 IPv6 forms included, and it refuses the
  metadata services' host names outright;
- it connects to the address it checked (the URL's host is replaced by the IP; the Host header,
  the TLS server name and the certificate check keep the original name), so no second DNS
  answer can slip in;
- it follows redirects itself, at most :data:`MAX_REDIRECTS`, checking every hop the same way;
- it stops at ``max_bytes`` (on Content-Length, or as soon as the body passes it) and at its
  timeouts, and accepts only an image (its content type, or its first bytes when the server
  says nothing useful).

Hosts named in ``allow_hosts`` (``host`` or ``host:port``, the node's ``--allow-fetch-host``)
pass even when they resolve to an internal address: an image server on the private network,
or a test's server on 127.0.0.1. Every hop is matched on its own, so an allowed host that
redirects elsewhere is checked again there.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urljoin

import httpx

MAX_REDIRECTS = 5
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_TOTAL_TIMEOUT_S = 30.0
REDIRECTS = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}

# Cloud metadata services by name (they resolve to link-local addresses, refused anyway, but a
# name is refused before any lookup: a resolver may answer with something else).
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.com",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
    }
)
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598, carrier-grade NAT
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: an IPv4 address behind a NAT64 gateway

# The first bytes of the formats an image decoder (llama.cpp's stb_image) reads.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)
_UNINFORMATIVE_TYPES = ("", "application/octet-stream", "binary/octet-stream")


class ImageFetchError(Exception):
    """Why an image was not fetched. The message names the URL or address, never more: it goes
    back to the client as a 400 (``code`` is its OpenAI error code)."""

    def __init__(self, message: str, code: str = "image_url_unavailable") -> None:
        super().__init__(message)
        self.code = code


class FetchRefused(ImageFetchError):
    """The URL leads somewhere this node does not fetch from (an internal address, a bad scheme)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="image_url_refused")


def address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a node must not connect to ``address`` for a client, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            problem = address_problem(embedded)
            return f"{problem} (embedded in {address})" if problem else None
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live there)"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in SHARED_ADDRESS_SPACE:
        return "a shared (carrier-grade NAT) address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a public address"
    return None


def sniff_image(head: bytes) -> str | None:
    """The image type its first bytes say, or None."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass(frozen=True)
class _Hop:
    """One checked request target: the URL to send (host replaced by the checked IP) and its name."""

    url: httpx.URL
    host_header: str
    server_name: str


@dataclass(frozen=True)
class ImageFetcher:
    """The node's policy for remote images, and the fetch itself (blocking: engines run in a worker thread)."""

    enabled: bool = True
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    max_bytes: int = DEFAULT_MAX_BYTES
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    total_timeout_s: float = DEFAULT_TOTAL_TIMEOUT_S
    verify: ssl.SSLContext | bool = True  # TLS trust: httpx's default (certifi), or an internal CA's context

    @classmethod
    def from_settings(cls, *, enabled: bool = True, allow_hosts: Iterable[str] = (), **limits: float) -> ImageFetcher:
        hosts = frozenset(h.strip().lower().rstrip(".") for h in allow_hosts if h and h.strip())
        return cls(enabled=enabled, allow_hosts=hosts, **limits)

    def data_url(self, url: str) -> str:
        """The image at ``url`` as a ``data:`` URL, which llama.cpp decodes without fetching."""
        content, kind = self.fetch(url)
        return f"data:{kind};base64,{base64.b64encode(content).decode()}"

    def fetch(self, url: str) -> tuple[bytes, str]:
        """The image's bytes and content type; raises ImageFetchError (FetchRefused for an address)."""
        if not self.enabled:
            raise FetchRefused(
                f"remote images are disabled on this node (--no-remote-images): send {_short(url)} as a data: URL"
            )
        deadline = time.monotonic() + self.total_timeout_s
        with httpx.Client(trust_env=False, follow_redirects=False, verify=self.verify) as client:
            current = url
            for _ in range(MAX_REDIRECTS + 1):
                hop = self._checked(current)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ImageFetchError(f"fetching {_short(url)} took over {self.total_timeout_s:g} s")
                timeout = httpx.Timeout(remaining, connect=min(self.connect_timeout_s, remaining))
                request = client.build_request(
                    "GET",
                    hop.url,
                    headers={"Host": hop.host_header, "Accept": "image/*"},
                    extensions={"sni_hostname": hop.server_name},
                    timeout=timeout,
                )
                try:
                    response = client.send(request, stream=True)
                except httpx.TimeoutException:
                    raise ImageFetchError(f"fetching {_short(current)} timed out") from None
                except httpx.HTTPError as exc:
                    raise ImageFetchError(f"fetching {_short(current)} failed: {exc}") from None
                try:
                    location = response.headers.get("location")
                    if response.status_code in REDIRECTS and location:
                        current = urljoin(current, location)
                        continue
                    return self._image(response, current, deadline)
                finally:
                    response.close()
        raise FetchRefused(f"{_short(url)} redirects more than {MAX_REDIRECTS} times")

    # ------------------------------------------------------------ checks

    def _checked(self, url: str) -> _Hop:
        """The hop to ``url``, or FetchRefused: scheme, host name, and every address it resolves to."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise FetchRefused(f"image_url {_short(url)} is not a valid URL: {exc}") from None
        if parsed.scheme not in DEFAULT_PORTS:
            raise FetchRefused(f"image_url {_short(url)}: only http and https URLs are fetched")
        host = parsed.raw_host.decode("ascii").lower().rstrip(".")  # IDNA-encoded by httpx
        if not host:
            raise FetchRefused(f"image_url {_short(url)} has no host")
        port = parsed.port or DEFAULT_PORTS[parsed.scheme]
        named = f"[{host}]" if ":" in host else host  # an IPv6 literal, as a URL writes it
        allowed = bool({host, named, f"{named}:{port}"} & self.allow_hosts)
        if host in METADATA_HOSTS and not allowed:
            raise FetchRefused(f"image_url host {host} is a cloud metadata service; this node does not fetch from it")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ImageFetchError(f"image_url host {host} does not resolve: {exc}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not addresses:
            raise ImageFetchError(f"image_url host {host} does not resolve")
        if not allowed:
            for text in addresses:
                problem = address_problem(ipaddress.ip_address(text.split("%", 1)[0]))
                if problem:
                    via = "" if text == host else f" (which {host} resolves to)"
                    raise FetchRefused(
                        f"image_url address {text}{via} is {problem}; this node fetches images only from public "
                        "addresses (an operator can allow a host with --allow-fetch-host)"
                    )
        pinned = addresses[0].split("%", 1)[0]
        netloc = named if parsed.port is None else f"{named}:{parsed.port}"
        return _Hop(url=parsed.copy_with(host=pinned), host_header=netloc, server_name=host)

    def _image(self, response: httpx.Response, url: str, deadline: float) -> tuple[bytes, str]:
        if response.status_code != 200:
            raise ImageFetchError(f"fetching {_short(url)} answered HTTP {response.status_code}")
        declared = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if not declared.startswith("image/") and declared not in _UNINFORMATIVE_TYPES:
            raise ImageFetchError(
                f"{_short(url)} is not an image (content type {declared})", code="image_url_not_image"
            )
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise ImageFetchError(
                f"the image at {_short(url)} is {int(length)} bytes, over this node's limit of {self.max_bytes}",
                code="image_url_too_large",
            )
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > self.max_bytes:
                    raise ImageFetchError(
                        f"the image at {_short(url)} is over this node's limit of {self.max_bytes} bytes",
                        code="image_url_too_large",
                    )
                if time.monotonic() > deadline:
                    raise ImageFetchError(f"fetching {_short(url)} took over {self.total_timeout_s:g} s")
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise ImageFetchError(f"fetching {_short(url)} timed out") from None
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"fetching {_short(url)} failed: {exc}") from None
        content = b"".join(chunks)
        kind = declared if declared.startswith("image/") else sniff_image(content[:16])
        if kind is None:
            raise ImageFetchError(
                f"{_short(url)} is not an image (content type {declared or 'missing'}, unrecognised bytes)",
                code="image_url_not_image",
            )
        return content, kind


def _short(url: str, limit: int = 200) -> str:
    """A URL for an error message: bounded, since a client chose it."""
    return url if len(url) <= limit else url[:limit] + "..."
