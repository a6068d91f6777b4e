"""The pure write and read plans, with plain asserts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt.format import Extent, TensorRecord
from asyncckpt.io.plan import Piece, PlanItem, ReadTarget, plan_read, plan_write


def _plan(sizes, small=10, pack=32, chunk=25):
    return plan_write([PlanItem(f"k{i}", n) for i, n in enumerate(sizes)], small_array_bytes=small,
                      pack_bytes=pack, chunk_bytes=chunk)


def test_small_values_are_packed_in_entry_order():
    plan = _plan([4, 9, 9, 9, 2])
    assert [(f.name, f.size) for f in plan.files] == [("pack-00000", 31), ("pack-00001", 2)]
    assert plan.files[0].pieces == (Piece(0, 0, 0, 4), Piece(1, 0, 4, 9), Piece(2, 0, 13, 9), Piece(3, 0, 22, 9))
    assert plan.extents[4] == ((1, 0),)


def test_large_values_are_chunked_and_files_follow_entry_order():
    plan = _plan([3, 60, 5])
    assert [(f.name, f.size) for f in plan.files] == [
        ("pack-00000", 8), ("chunk-00000", 25), ("chunk-00001", 25), ("chunk-00002", 10),
    ]
    assert plan.extents[1] == ((1, 0), (2, 0), (3, 0))
    assert [f.pieces[0].item_offset for f in plan.files[1:]] == [0, 25, 50]
    assert plan.extents[0] == ((0, 0),) and plan.extents[2] == ((0, 1),)
    assert plan.files_of_item(1) == (1, 2, 3)
    assert plan.total_bytes == 68


def test_empty_values_take_no_file_and_a_value_of_exactly_small_is_chunked():
    plan = _plan([0, 10, 0])
    assert [(f.name, f.size) for f in plan.files] == [("chunk-00000", 10)]
    assert plan.extents == ((), ((0, 0),), ())


def test_no_items():
    plan = _plan([])
    assert plan.files == () and plan.extents == ()


def test_invalid_layout_arguments():
    with pytest.raises(ValueError, match="positive"):
        _plan([1], chunk=0)
    with pytest.raises(ValueError, match="negative"):
        _plan([-1])


_layouts = given(
    sizes=st.lists(st.integers(min_value=0, max_value=200), max_size=30),
    small=st.integers(1, 64),
    pack=st.integers(1, 128),
    chunk=st.integers(1, 100),
)


@settings(max_examples=100, deadline=None)  # 300 in the slow twin below
@_layouts
def test_every_byte_is_placed_exactly_once(sizes, small, pack, chunk):
    plan = _plan(sizes, small, pack, chunk)
    for item, size in enumerate(sizes):
        offset = 0
        for file_index, piece_index in plan.extents[item]:
            piece = plan.files[file_index].pieces[piece_index]
            assert piece.item == item and piece.item_offset == offset
            offset += piece.length
        assert offset == size
    for file in plan.files:
        assert sum(piece.length for piece in file.pieces) == file.size
        assert [p.file_offset for p in file.pieces] == [sum(q.length for q in file.pieces[:i]) for i in range(len(file.pieces))]
        if file.name.startswith("chunk"):
            assert file.size <= chunk and len(file.pieces) == 1
        else:
            assert file.size <= max(pack, small - 1)
    assert len({f.name for f in plan.files}) == len(plan.files)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@_layouts
def test_every_byte_is_placed_exactly_once_in_many_layouts(sizes, small, pack, chunk):
    test_every_byte_is_placed_exactly_once.hypothesis.inner_test(sizes, small, pack, chunk)


def _record(*extents):
    return TensorRecord("|u1", (sum(e.length for e in extents),), sum(e.length for e in extents), 0, tuple(extents))


def test_read_plan_coalesces_nearby_extents_of_one_file():
    records = {
        "a": _record(Extent("pack-00000", 0, 4, 1)),
        "b": _record(Extent("pack-00000", 6, 4, 2)),
        "c": _record(Extent("pack-00000", 100, 4, 3)),
        "d": _record(Extent("chunk-00000", 0, 50, 4), Extent("chunk-00001", 0, 7, 5)),
    }
    ranges = plan_read(records, coalesce_gap_bytes=2, max_range_bytes=1000)
    assert [(r.file, r.start, r.stop) for r in ranges] == [
        ("chunk-00000", 0, 50), ("chunk-00001", 0, 7), ("pack-00000", 0, 10), ("pack-00000", 100, 104),
    ]
    assert ranges[1].targets == (ReadTarget("d", 1, 50, 0, 7, 5),)
    assert ranges[2].targets == (ReadTarget("a", 0, 0, 0, 4, 1), ReadTarget("b", 0, 0, 6, 4, 2))


def test_read_plan_respects_the_range_limit():
    records = {k: _record(Extent("pack-00000", i * 10, 10, 0)) for i, k in enumerate("abcd")}
    ranges = plan_read(records, coalesce_gap_bytes=100, max_range_bytes=20)
    assert [(r.start, r.stop) for r in ranges] == [(0, 20), (20, 40)]
    one_each = plan_read(records, coalesce_gap_bytes=0, max_range_bytes=5)
    assert [(r.start, r.stop) for r in one_each] == [(0, 10), (10, 20), (20, 30), (30, 40)]


def test_read_plan_handles_overlapping_extents():
    records = {"a": _record(Extent("f", 0, 10, 0)), "b": _record(Extent("f", 2, 3, 0))}
    (only,) = plan_read(records, coalesce_gap_bytes=0, max_range_bytes=100)
    assert (only.start, only.stop) == (0, 10)
    assert {(t.key, t.range_offset, t.length) for t in only.targets} == {("a", 0, 10), ("b", 2, 3)}
