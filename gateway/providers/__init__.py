"""Cloud providers behind the gateway's endpoint: ``openai:<model>``, ``anthropic:<model>``,
``google:<model>`` go to that provider instead of a node (SPEC-4b6e9f2a, SPEC-82491000).

:class:`Clouds` knows the three providers, whether each has a key, their model lists
(gateway/providers/catalog.py) and the price table; ``target`` tells a cloud model from a local
one. One module per provider over a shared base: ``openai_compatible`` (OpenAI, and Google
through its OpenAI-compatible endpoint), ``anthropic`` (its native Messages API).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from events import subjects
from events.capabilities import CAPABILITIES

from ..errors import ApiError
from .anthropic import AnthropicProvider
from .base import Provider, ProviderSettings, with_default_path
from .catalog import CloudCatalog
from .openai_compatible import GoogleProvider, OpenAIProvider
from .prices import PriceTable
from .routes import serve

# name -> (class, key variable, base URL variable, default base URL, path a bare host gets)
KNOWN: dict[str, tuple[type[Provider], str, str, str, str]] = {
    "openai": (OpenAIProvider, "OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1", "/v1"),
    "anthropic": (AnthropicProvider, "ANTHROPIC_API_KEY", "ANTHROPIC_API_BASE_URL", "https://api.anthropic.com", ""),
    "google": (
        GoogleProvider,
        "GOOGLE_API_KEY",
        "GOOGLE_API_BASE_URL",
        "https://generativelanguage.googleapis.com/v1beta/openai",
        "/v1beta/openai",
    ),
}
ALIASES = {"ahtnorpic": "anthropic"}  # the original's typo alias, kept for its clients
_PREFIXED = re.compile(r"([a-z][a-z0-9_-]{0,31}):(.+)", re.DOTALL)


def settings_from_env(environ: Mapping[str, str] | None = None) -> list[ProviderSettings]:
    """The three providers as the environment configures them (a provider without key is listed
    too: its models answer 401, which says which variable to set)."""
    environ = os.environ if environ is None else environ
    found = []
    for name, (_, key_var, url_var, default_url, bare_path) in KNOWN.items():
        url = (environ.get(url_var) or "").strip()
        base = with_default_path(url, bare_path) if url else default_url
        found.append(ProviderSettings(name, (environ.get(key_var) or "").strip() or None, base))
    return found


class Clouds:
    def __init__(
        self,
        settings: list[ProviderSettings],
        *,
        prices: PriceTable | None = None,
        request_timeout: float = 600.0,
        catalog_ttl_s: float | None = None,
        catalog_retry_s: float | None = None,
    ) -> None:
        self.providers: dict[str, Provider] = {
            s.name: KNOWN[s.name][0](s, request_timeout=request_timeout) for s in settings
        }
        self.prices = prices or PriceTable.load()
        options = {k: v for k, v in (("ttl_s", catalog_ttl_s), ("retry_s", catalog_retry_s)) if v is not None}
        self.catalog = CloudCatalog([p for p in self.providers.values() if p.configured], **options)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> Clouds:
        return cls(settings_from_env(environ), **options)

    async def start(self) -> None:
        await self.catalog.start()

    async def stop(self) -> None:
        await self.catalog.stop()
        for provider in self.providers.values():
            await provider.aclose()

    def target(self, model: str, is_local: Callable[[str], bool]) -> tuple[Provider, str] | None:
        """(provider, its model name) for a cloud model; None for a local one.

        A known prefix always means its provider (401 without a key). Any other ``word:`` prefix
        is an unknown provider (400), unless the whole name is a local model (``llama3:8b``)."""
        match = _PREFIXED.fullmatch(model)
        if match is None:
            return None
        prefix, name = match.groups()
        provider = self.providers.get(ALIASES.get(prefix, prefix))
        if provider is None:
            if is_local(model):
                return None
            known = ", ".join(f"'{p}:'" for p in self.providers)
            raise ApiError(
                400,
                f"Unknown provider prefix '{prefix}:' in model '{model}' (known: {known}), and no local model has "
                "this name.",
                param="model",
                code="unknown_provider",
            )
        if not provider.configured:
            variable = KNOWN[provider.name][1]
            raise ApiError(
                401,
                f"No API key for {provider.name}: set {variable} on the gateway to use '{provider.name}:' models.",
                type="authentication_error",
                code="provider_key_missing",
            )
        return provider, name

    @staticmethod
    def check(provider: Provider, capability: str, model: str) -> None:
        """400 when the provider cannot serve ``capability`` (a vision chat is a chat to it)."""
        wanted = subjects.CHAT if capability == subjects.VISION else capability
        if wanted not in provider.capabilities:
            label = CAPABILITIES[wanted].label
            raise ApiError(
                400,
                f"Model '{model}' does not support {label}: {provider.name} offers "
                f"{', '.join(sorted(provider.capabilities))} through this gateway.",
                param="model",
                code="unsupported_capability",
            )


__all__ = ["Clouds", "PriceTable", "Provider", "ProviderSettings", "serve", "settings_from_env"]
