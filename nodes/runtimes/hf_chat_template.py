"""A Hugging Face model folder's chat template, rendered as transformers renders it.

Engines that read safetensors folders (exllamav2) get no chat formatting from their library:
the template comes from ``chat_template.jinja``, ``chat_template.json`` or the ``chat_template``
of ``tokenizer_config.json`` (transformers' order), and is rendered in jinja2's immutable
sandbox with transformers' helpers (``raise_exception``, ``tojson``, ``strftime_now``), so a
template behaves as it does under ``apply_chat_template``. Pure Python: no engine, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .base import EngineError


class TemplateError(ValueError):
    """The template refused the messages (its own raise_exception, or a jinja2 error)."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str | None  # None: the folder has no template (a plain fallback format is used)
    bos_token: str = ""
    eos_token: str = ""
    special: dict[str, str] = field(default_factory=dict)  # other named special tokens (pad, unk)

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate:
        folder = Path(folder)
        config = _read(folder / "tokenizer_config.json") or {}
        source = None
        if (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(separate := _read(folder / "chat_template.json"), dict):
            source = separate.get("chat_template")
        if source is None:
            source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        special = {
            key: text
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (text := _token_text(config.get(key))) is not None
        }
        return cls(
            source if isinstance(source, str) else None,
            bos_token=special.get("bos_token", ""),
            eos_token=special.get("eos_token", ""),
            special=special,
        )

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for ``messages``, ending where the assistant's answer begins."""
        if self.source is None:
            return _plain(messages)
        try:
            template = _environment().from_string(self.source)
            return template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=True,
                **{**self.special, "bos_token": self.bos_token, "eos_token": self.eos_token},
            )
        except TemplateError:
            raise
        except Exception as exc:  # jinja2's errors: syntax, undefined attributes, type errors in the template
            raise TemplateError(f"{type(exc).__name__}: {exc}") from None

    @property
    def stops(self) -> list[str]:
        """Stop strings the format needs beyond the model's end token (the fallback's turn end)."""
        return ["<|im_end|>"] if self.source is None else []

    def prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """:meth:`render`, with a refusal reported to the client as a 400 on ``messages``."""
        try:
            return self.render(messages, tools)
        except TemplateError as exc:
            raise EngineError(f"the model's chat template refused these messages: {exc}", param="messages") from None


def _environment() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _plain(messages: list[dict[str, Any]]) -> str:
    """For a folder without a template: ChatML, the most widely trained chat format."""
    turns = [f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages]
    return "".join(turns) + "<|im_start|>assistant\n"


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EngineError(f"cannot read {path.name} of the model: {exc}", status=500) from None
