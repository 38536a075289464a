"""Reversible encoding of model names into single NATS subject tokens.

Model names such as ``org/repo:Q4_K_M`` or ``llama-3.2-1b`` contain characters a subject
token may not hold (``.``, spaces, ``*``, ``>``) or that read badly in one (``/``, ``:``).
Letters, digits, ``-`` and ``_`` pass through unchanged so subjects stay readable; every
other byte of the UTF-8 name becomes ``=XX`` (upper-case hex), ``=`` included, which makes
the mapping one-to-one and lets ``decode_token`` invert it exactly. The same token is a
valid KV key, so buckets keyed by model or node name use it too.
"""

from __future__ import annotations

import functools
import re

# A name becomes a subject token, a KV key and an object name: bounded so that the subjects it
# appears in stay far inside nats-server's 4 KB control-line limit (escaping can triple it).
MAX_NAME_BYTES = 256

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_PLAIN = re.compile(r"[A-Za-z0-9_-]+")  # names that are their own token (_SAFE bytes only)
_ESCAPE = re.compile(r"=([0-9A-F]{2})")
_VALID_TOKEN = re.compile(r"^(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+$")


class NameTooLong(ValueError):
    """A name over :data:`MAX_NAME_BYTES` UTF-8 bytes: refused before it reaches NATS."""


def name_error(name: object, what: str = "model name") -> str | None:
    """Why ``name`` cannot be used as a subject token, or None when it can."""
    if not isinstance(name, str) or not name:
        return f"the {what} must be a non-empty string"
    if len(name) > MAX_NAME_BYTES // 4 and len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"the {what} is longer than {MAX_NAME_BYTES} bytes"
    return None


def encode_token(name: str) -> str:
    """Encode a non-empty name of at most MAX_NAME_BYTES into a subject token (``a.b`` -> ``a=2Eb``)."""
    if name.__class__ is str and len(name) <= MAX_NAME_BYTES and _PLAIN.fullmatch(name):
        return name  # nothing to escape (request and record ids, most node ids): no cache entry either
    return _escaped(name)


@functools.lru_cache(maxsize=4096)  # the same few model and node names, on every request
def _escaped(name: str) -> str:
    if not name:
        raise ValueError("a model name must not be empty")
    error = name_error(name, "name")
    if error:
        raise NameTooLong(error)
    out: list[str] = []
    for byte in name.encode("utf-8"):
        out.append(chr(byte) if byte in _SAFE else f"={byte:02X}")
    return "".join(out)


def decode_token(token: str) -> str:
    """Invert :func:`encode_token`; raise ValueError for a token it could not have produced."""
    if not _VALID_TOKEN.match(token):
        raise ValueError(f"not an encoded model token: {token!r}")
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(token):
        raw += token[pos : match.start()].encode("ascii")
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += token[pos:].encode("ascii")
    decoded = raw.decode("utf-8")
    if encode_token(decoded) != token:
        # e.g. "=41" for "A": a safe byte escaped is not canonical, so reject it.
        raise ValueError(f"not a canonical model token: {token!r}")
    return decoded


# Dashboard usernames: a KV key (encoded like any name) and a line in listings, audit and logs,
# so fewer characters than a model name may hold: letters, digits and ``. _ @ -``, at most 64.
MAX_USERNAME_CHARS = 64
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def username_error(name: object) -> str | None:
    """Why ``name`` cannot be a username, or None when it can."""
    if not isinstance(name, str) or not _USERNAME.fullmatch(name):
        return (
            f"a username is 1 to {MAX_USERNAME_CHARS} letters, digits or '.', '_', '@', '-', "
            "starting with a letter or digit"
        )
    return None
