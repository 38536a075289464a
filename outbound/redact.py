"""Keeping a secret (a provider's or an upstream server's API key) out of text we pass on.

Error messages from providers sometimes quote the key they were sent, whole or in part
("Incorrect API key provided: sk-abc12…"); every such text goes through :func:`redact` before
it reaches a client, a log line or the history.
"""

from __future__ import annotations

MIN_PIECE = 6  # shorter runs of a key are not secret enough to matter (and match ordinary words)


def redact(text: str, secret: str | None) -> str:
    """``text`` with the secret, and every run of at least six of its characters, as ``***``."""
    if not secret or not text:
        return text
    for size in range(len(secret), MIN_PIECE - 1, -1):
        for start in range(len(secret) - size + 1):
            piece = secret[start : start + size]
            if piece in text:
                text = text.replace(piece, "***")
    return text
