"""The model-name <-> subject-token encoding is reversible and always yields a legal token."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events import decode_token, encode_token, subjects

# A NATS subject token: no whitespace, no '.', '*' or '>'. A KV key: [-/_=.a-zA-Z0-9]+.
SUBJECT_TOKEN = re.compile(r"^[^\s.*>]+$")
KV_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")

names = st.text(min_size=1, max_size=80)


@given(names)
def test_round_trip(name: str) -> None:
    assert decode_token(encode_token(name)) == name


@given(names)
def test_token_is_a_legal_subject_token_and_kv_key(name: str) -> None:
    token = encode_token(name)
    assert SUBJECT_TOKEN.match(token)
    assert KV_KEY.match(token)


@given(names, names)
def test_distinct_names_give_distinct_tokens(a: str, b: str) -> None:
    if a != b:
        assert encode_token(a) != encode_token(b)


@given(names)
def test_subject_has_exactly_one_token_for_the_model(name: str) -> None:
    subject = subjects.infer(subjects.CHAT, name)
    assert subject.split(".")[:2] == ["infer", "chat"]
    assert len(subject.split(".")) == 3


def test_readable_for_common_names() -> None:
    assert encode_token("llama-3_2") == "llama-3_2"
    assert encode_token("org/repo:Q4_K_M") == "org=2Frepo=3AQ4_K_M"
    assert encode_token("qwen2.5 7b") == "qwen2=2E5=207b"


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "=4", "=zz", "=41", "a*", ">"])
def test_decode_rejects_what_encode_cannot_produce(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_token(bad)


def test_empty_name_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_token("")
