"""CRC-32C arithmetic the ``crc32c`` package lacks: zlib's ``crc32_combine`` for its polynomial."""

from __future__ import annotations

import functools

__all__ = ["crc32c_combine"]

_CRC32C_POLY_REFLECTED = 0x82F63B78


def _gf2_times(matrix: list[int], vector: int) -> int:
    total = 0
    row = 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


@functools.lru_cache(maxsize=1)
def _zero_operators() -> tuple[list[int], ...]:
    """``ops[k]`` advances a CRC register over ``2**k`` zero bytes, for k in 0..63."""
    one_bit = [_CRC32C_POLY_REFLECTED] + [1 << n for n in range(31)]
    operator = one_bit
    for _ in range(3):  # 1 bit -> 8 bits = one byte
        operator = [_gf2_times(operator, row) for row in operator]
    operators = [operator]
    for _ in range(63):
        operator = [_gf2_times(operator, row) for row in operator]
        operators.append(operator)
    return tuple(operators)


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC-32C of ``a + b`` given ``crc32c(a)``, ``crc32c(b)`` and ``len(b)``, without the data.

    Lets the writer record a whole-tensor checksum from per-extent checksums computed at different
    times, and lets the reader verify it without a second pass over the bytes.
    """
    operators = _zero_operators()
    bit = 0
    while length_b:
        if length_b & 1:
            crc_a = _gf2_times(operators[bit], crc_a)
        length_b >>= 1
        bit += 1
    return crc_a ^ crc_b
