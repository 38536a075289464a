"""The wire contract: message Structs, subject names, storage names. Imported by every component."""

from . import codec, messages, openai, storage, subjects
from .messages import SCHEMA_VERSION
from .tokens import MAX_NAME_BYTES, NameTooLong, decode_token, encode_token, name_error

__all__ = [
    "MAX_NAME_BYTES",
    "NameTooLong",
    "SCHEMA_VERSION",
    "codec",
    "decode_token",
    "encode_token",
    "name_error",
    "messages",
    "openai",
    "storage",
    "subjects",
]
