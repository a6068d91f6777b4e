"""Entries frozen into sources: keys, kinds, owned copies, host byte views."""

from __future__ import annotations


import numpy as np
import pytest
from _fakes import FakeVariable

from asyncckpt.format import OBJECT_GRAPH_KEY
from asyncckpt.io.sources import SaveEntry, SourceKind, host_bytes, prepare_sources

# ---------------------------------------------------------------------------------------------
# Sources and host bytes


def test_prepare_sources_freezes_bytes_and_arrays_but_not_holders():
    array = np.arange(4, dtype=np.int16)
    variable = FakeVariable(np.zeros((2, 3), dtype=np.float32))
    data = bytearray(b"abc")
    sources = prepare_sources([SaveEntry("a", array), SaveEntry("v", variable), SaveEntry("b", data)])
    assert [(s.key, s.kind, s.dtype, s.shape, s.nbytes) for s in sources] == [
        ("a", SourceKind.ARRAY, "<i2", (4,), 8),
        ("v", SourceKind.HOLDER, "<f4", (2, 3), 24),
        ("b", SourceKind.BYTES, "bytes", (), 3),
    ]
    array[0] = 99
    data[0] = ord("z")
    assert sources[0].value[0] == 0 and sources[2].value == b"abc"
    assert sources[1].value is variable


@pytest.mark.parametrize(
    ("entries", "error", "pattern"),
    [
        ([SaveEntry("k", np.ones(1)), SaveEntry("k", b"")], ValueError, "duplicate"),
        ([SaveEntry(OBJECT_GRAPH_KEY, b"")], ValueError, "reserved"),
        ([SaveEntry(3, b"")], ValueError, "non-empty strings"),
        ([("k", b"")], TypeError, "SaveEntry"),
        ([SaveEntry("k", "str")], TypeError, "encode"),
        ([SaveEntry("k", np.array(["x"]))], TypeError, "'k'"),
        ([SaveEntry("k", FakeVariable(np.array(["x"])))], TypeError, "'k'"),
    ],
)
def test_prepare_sources_rejects_bad_entries(entries, error, pattern):
    with pytest.raises(error, match=pattern):
        prepare_sources(entries)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(4, 6),
        np.arange(24, dtype=np.float32).reshape(4, 6)[::2, ::-1],
        np.asfortranarray(np.arange(24, dtype=np.int64).reshape(4, 6)),
        np.arange(24, dtype=">u4"),
        np.array(3.5, dtype=">f8"),
        np.array([True, False, True]),
    ],
    ids=["contiguous", "strided", "fortran", "big-endian", "0-d-big-endian", "bool"],
)
def test_host_bytes_matches_c_order_little_endian_bytes_for_any_range(array):
    expected = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    for start, stop in [(0, len(expected)), (1, len(expected) - 1), (3, 7), (5, 5)]:
        stop = min(stop, len(expected))
        assert bytes(host_bytes(array, start, stop)) == expected[start:stop]


def test_host_bytes_is_a_view_for_contiguous_little_endian_arrays():
    array = np.arange(8, dtype="<i4")
    view = host_bytes(array, 0, 32)
    array[0] = 7
    assert bytes(view[:4]) == np.int32(7).tobytes()


