"""One module per engine; ``available_runtimes`` lists the ones this build knows."""

from .base import Engine, EngineError, Runtime, TextOutcome
from .llama_cpp import LlamaCppRuntime


def default_runtimes() -> list[Runtime]:
    return [LlamaCppRuntime()]


__all__ = ["Engine", "EngineError", "LlamaCppRuntime", "Runtime", "TextOutcome", "default_runtimes"]
