"""OpenAI-compatible HTTP gateway over NATS."""

from .app import Gateway, build_app

__all__ = ["Gateway", "build_app"]
