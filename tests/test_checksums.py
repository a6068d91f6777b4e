"""CRC-32C combination: the checksum of a concatenation from the checksums of its parts."""

from __future__ import annotations

import os

import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt.checksums import crc32c_combine


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32c_combine_equals_crc_of_concatenation(a, b):
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


def test_crc32c_combine_of_large_lengths():
    block = os.urandom(1 << 16)
    whole = block * 64
    assert crc32c_combine(crc32c.crc32c(block), crc32c.crc32c(block * 63), len(block) * 63) == crc32c.crc32c(whole)
