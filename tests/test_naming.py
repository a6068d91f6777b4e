"""The names of a checkpoint's files: built and parsed back, and told apart from each other."""

from __future__ import annotations

import pytest

from asyncckpt.naming import (
    claim_name,
    data_dir_name,
    index_path,
    index_tmp_name,
    is_plain_name,
    lock_name,
    parse_claim_name,
    parse_data_dir_name,
    parse_index_tmp_name,
    parse_lock_name,
    parse_section_name,
    section_name,
)

NONCE = "0123456789abcdef"


def test_names_round_trip_and_are_told_apart():
    assert index_path("/d/ckpt-3") == "/d/ckpt-3.index"
    assert parse_data_dir_name(data_dir_name("ckpt-3", NONCE)) == ("ckpt-3", NONCE)
    assert parse_lock_name(lock_name("ckpt-3", NONCE)) == ("ckpt-3", NONCE)
    assert parse_index_tmp_name(index_tmp_name("ckpt-3", NONCE)) == ("ckpt-3", NONCE)
    assert parse_data_dir_name(lock_name("ckpt-3", NONCE)) is None
    assert parse_lock_name(data_dir_name("ckpt-3", NONCE)) is None
    assert parse_data_dir_name("ckpt-3.data-00000-of-00001") is None  # TensorFlow's names are not ours
    assert parse_data_dir_name(data_dir_name("a.data-b", NONCE)) == ("a.data-b", NONCE)


@pytest.mark.parametrize("name", ["ok", "pack-00000", "a.b", "ü", "x" * 255])
def test_plain_names(name):
    assert is_plain_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/a", "a\\b", "a\x00", "a\nb", "x" * 256, None, 3])
def test_not_plain_names(name):
    assert not is_plain_name(name)


def test_section_and_claim_names_round_trip():
    name = section_name("ckpt-3", 2, 5, NONCE)
    assert name == "ckpt-3.index.section-00002-of-00005-0123456789abcdef"
    assert parse_section_name(name) == ("ckpt-3", 2, 5, NONCE)
    assert parse_section_name("ckpt-3.index") is None
    assert parse_section_name("ckpt-3.index.section-00002-of-00005") is None
    claim = claim_name("ckpt-3", "a" * 16, "b" * 16)
    assert claim == f"ckpt-3.index.claim-{'a' * 16}-{'b' * 16}"
    assert parse_claim_name(claim) == ("ckpt-3", "a" * 16, "b" * 16)
    assert parse_claim_name(name) is None and parse_section_name(claim) is None
