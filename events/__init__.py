"""The wire contract: message Structs, subject names, storage names. Imported by every component."""

from . import codec, messages, openai, storage, subjects
from .messages import SCHEMA_VERSION
from .tokens import decode_token, encode_token

__all__ = ["SCHEMA_VERSION", "codec", "decode_token", "encode_token", "messages", "openai", "storage", "subjects"]
