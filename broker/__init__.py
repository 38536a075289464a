"""NATS plumbing: connection, provisioning, the embedded server."""

from .connection import NatsAuth, connect, nats_url
from .embedded import EmbeddedNats, find_nats_server
from .provision import provision

__all__ = ["EmbeddedNats", "NatsAuth", "connect", "find_nats_server", "nats_url", "provision"]
