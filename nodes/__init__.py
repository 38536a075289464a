"""Node agent: heartbeats, registry sync, engines. Runtimes live in ``nodes.runtimes``."""

from .agent import NodeAgent

__all__ = ["NodeAgent"]
