"""Model registry service: registrations in KV ``models``, events on REGISTRY_EVENTS."""

from .service import Registry

__all__ = ["Registry"]
