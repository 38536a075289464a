"""What the SDK-depth tests (chat completions in test_openai_depth.py, responses in
test_responses_api.py) share: two tiny chat GGUFs, tool schemas, the SDK client and the check
of a refusal, kept in one place so both suites exercise the same models the same way.

One model's ChatML template knows nothing of tools (tools go into a system prompt); the other
renders tools and calls itself (Qwen style).
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

# A Qwen-style template: renders tools, earlier calls and tool results itself.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "Call a function as <tool_call>{json}</tool_call>.<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small schemas (short strings, integers, enums): random weights under a grammar close them in time.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer"},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
PING = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "ping": PING}


def serve_chat_models(stack, tmp: Path, plain: str, native: str) -> None:
    """Serve the plain ChatML model as ``plain`` and the tool-rendering one as ``native``."""
    from nodes.demo_model import write_tiny_gguf

    # 2048 tokens: the tiny vocabulary spends about a token per character of a tools prompt.
    stack.serve(write_tiny_gguf(tmp / "plain.gguf", context_length=2048), plain)
    stack.serve(write_tiny_gguf(tmp / "native.gguf", context_length=2048, chat_template=TOOLS_TEMPLATE), native)


def sdk_client(stack) -> openai.OpenAI:
    """The official SDK on the stack's gateway: no retries, so a refusal surfaces at once."""
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def refused(call, param: str, code: str = "unsupported_parameter") -> str:
    """The message of the 400 that ``call`` gets, which names ``param`` and ``code``."""
    with pytest.raises(openai.BadRequestError) as err:
        call()
    assert err.value.status_code == 400
    assert err.value.body["param"] == param, err.value.body
    assert err.value.body["code"] == code, err.value.body
    return err.value.body["message"]
