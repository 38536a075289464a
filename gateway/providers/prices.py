"""What a request costs: USD per million input and output tokens, by provider and model.

The built-in table holds providers' published list prices for common models (as of mid-2025;
prices change, so an operator overrides or extends them with a JSON file, ``--prices``). A
key is ``provider:model``; a model ending in ``*`` matches every model that starts with what
precedes it (dated versions: ``gpt-4o-2024-08-06`` is ``gpt-4o*``), and the longest match wins.
Local models are ``local:<name>``, free unless the file prices them. The file::

    {"openai:gpt-4o*": {"input": 2.5, "output": 10.0}, "local:*": {"input": 0.05, "output": 0.1}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from events.messages import Usage

PerMillion = Annotated[float, Meta(ge=0.0)]


class Price(Struct, forbid_unknown_fields=True):
    input: PerMillion
    output: PerMillion = 0.0


BUILT_IN: dict[str, Price] = {
    "local:*": Price(0.0, 0.0),
    "openai:gpt-4o*": Price(2.5, 10.0),
    "openai:gpt-4o-mini*": Price(0.15, 0.6),
    "openai:gpt-4.1*": Price(2.0, 8.0),
    "openai:gpt-4.1-mini*": Price(0.4, 1.6),
    "openai:gpt-4.1-nano*": Price(0.1, 0.4),
    "openai:o3-mini*": Price(1.1, 4.4),
    "openai:o4-mini*": Price(1.1, 4.4),
    "openai:text-embedding-3-small*": Price(0.02),
    "openai:text-embedding-3-large*": Price(0.13),
    "anthropic:claude-3-haiku*": Price(0.25, 1.25),
    "anthropic:claude-3-5-haiku*": Price(0.8, 4.0),
    "anthropic:claude-3-5-sonnet*": Price(3.0, 15.0),
    "anthropic:claude-3-7-sonnet*": Price(3.0, 15.0),
    "anthropic:claude-sonnet-4*": Price(3.0, 15.0),
    "anthropic:claude-opus-4*": Price(15.0, 75.0),
    "google:gemini-1.5-flash*": Price(0.075, 0.3),
    "google:gemini-1.5-pro*": Price(1.25, 5.0),
    "google:gemini-2.0-flash*": Price(0.1, 0.4),
    "google:gemini-2.5-flash*": Price(0.3, 2.5),
    "google:gemini-2.5-pro*": Price(1.25, 10.0),
}


class PriceTable:
    def __init__(self, entries: dict[str, Price]) -> None:
        self.exact: dict[str, Price] = {}
        self.prefixes: list[tuple[str, Price]] = []  # longest first
        for key, price in entries.items():
            if key.endswith("*"):
                self.prefixes.append((key[:-1], price))
            else:
                self.exact[key] = price
        self.prefixes.sort(key=lambda item: len(item[0]), reverse=True)
        self._cache: dict[str, Price | None] = {}

    @classmethod
    def load(cls, path: Path | str | None = None) -> PriceTable:
        """The built-in prices, overridden and extended by the JSON file at ``path``."""
        entries = dict(BUILT_IN)
        if path is not None:
            try:
                entries.update(msgspec.json.decode(Path(path).read_bytes(), type=dict[str, Price]))
            except (OSError, msgspec.DecodeError) as exc:
                raise RuntimeError(f"price table {path}: {exc}") from None
        for key in entries:
            if ":" not in key:
                raise RuntimeError(f"price table: {key!r} is not 'provider:model'")
        return cls(entries)

    def price(self, provider: str, model: str) -> Price | None:
        """The price of ``model`` (unprefixed) at ``provider``, or None when the table has none."""
        key = f"{provider}:{model}"
        if key in self._cache:
            return self._cache[key]
        found = self.exact.get(key)
        if found is None:
            found = next((price for prefix, price in self.prefixes if key.startswith(prefix)), None)
        if len(self._cache) < 4096:  # bounded: names come from requests
            self._cache[key] = found
        return found

    def cost(self, provider: str, model: str, usage: Usage) -> float | None:
        price = self.price(provider, model)
        if price is None:
            return None
        return (usage.prompt_tokens * price.input + usage.completion_tokens * price.output) / 1_000_000
