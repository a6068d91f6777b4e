"""Properties of the box arithmetic behind sharded values: tiling, needed byte runs, touched extents."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt.shards import Box, intersection, needed_runs, row_blocks, tiling_problem, touched_extents

shapes = st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple)


@st.composite
def grid_split(draw):
    """A shape and the boxes of an uneven grid split of it (every dimension cut anywhere)."""
    shape = draw(shapes)
    cuts = []
    for dim in shape:
        inner = draw(st.lists(st.integers(1, dim - 1), max_size=3, unique=True)) if dim > 1 else []
        cuts.append([0, *sorted(inner), dim])
    boxes = [Box(tuple(c[i] for c, i in zip(cuts, index)), tuple(c[i + 1] - c[i] for c, i in zip(cuts, index)))
             for index in itertools.product(*(range(len(c) - 1) for c in cuts))]
    return shape, boxes


@st.composite
def box_in(draw, shape):
    offset = tuple(draw(st.integers(0, dim - 1)) for dim in shape)
    size = tuple(draw(st.integers(1, dim - start)) for start, dim in zip(offset, shape))
    return Box(offset, size)


def _coverage(shape, boxes) -> np.ndarray:
    counts = np.zeros(shape, dtype=int)
    for box in boxes:
        counts[box.slices()] += 1
    return counts


@settings(max_examples=200, deadline=None)
@given(grid_split())
def test_a_grid_split_tiles_its_shape(split):
    shape, boxes = split
    assert tiling_problem(shape, boxes) is None


@settings(max_examples=200, deadline=None)
@given(grid_split(), st.data())
def test_a_missing_or_repeated_box_is_reported_where_it_is(split, data):
    shape, boxes = split
    index = data.draw(st.integers(0, len(boxes) - 1))
    missing = boxes[index]
    problem = tiling_problem(shape, boxes[:index] + boxes[index + 1:])
    assert problem is not None and problem.startswith("no shard")
    repeated = tiling_problem(shape, boxes + [missing])
    assert repeated is not None and repeated.startswith("shards overlap at")


@settings(max_examples=200, deadline=None)
@given(shapes.flatmap(lambda shape: st.tuples(st.just(shape), st.lists(box_in(shape), min_size=1, max_size=5))))
def test_tiling_problem_agrees_with_counting_every_element(case):
    shape, boxes = case
    counts = _coverage(shape, boxes)
    assert (tiling_problem(shape, boxes) is None) == bool((counts == 1).all())


@settings(max_examples=300, deadline=None)
@given(shapes.flatmap(lambda shape: st.tuples(st.just(shape), box_in(shape))), st.sampled_from([1, 2, 4, 8]))
def test_needed_runs_are_exactly_the_bytes_of_the_box(case, itemsize):
    shape, need = case
    starts, length = needed_runs(shape, itemsize, need)
    assert list(starts) == sorted(starts)
    got = np.zeros(math.prod(shape) * itemsize, dtype=bool)
    for start in starts:
        assert not got[start:start + length].any()  # runs never overlap
        got[start:start + length] = True
    mask = np.zeros(shape, dtype=bool)
    mask[need.slices()] = True
    want = np.repeat(mask.reshape(-1), itemsize)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=300, deadline=None)
@given(shapes.flatmap(lambda shape: st.tuples(st.just(shape), box_in(shape))), st.data())
def test_a_partial_read_touches_exactly_the_extents_holding_needed_bytes(case, data):
    shape, need = case
    itemsize = 4
    total = math.prod(shape) * itemsize
    inner = data.draw(st.lists(st.integers(1, total - 1), max_size=6, unique=True)) if total > 1 else []
    edges = [0, *sorted(inner), total]
    bounds = np.array(list(zip(edges[:-1], edges[1:])), dtype=np.int64)
    starts, length = needed_runs(shape, itemsize, need)
    needed = np.zeros(total, dtype=bool)
    for start in starts:
        needed[start:start + length] = True
    expected = [i for i, (a, b) in enumerate(bounds) if needed[a:b].any()]
    assert list(touched_extents(bounds, starts, length)) == expected


@settings(max_examples=200, deadline=None)
@given(shapes.flatmap(lambda shape: st.tuples(st.just(shape), box_in(shape))), st.integers(1, 64))
def test_row_blocks_cut_a_box_into_consecutive_rows_within_the_window(case, window):
    shape, need = case
    blocks = list(row_blocks(need, shape, 4, window))
    assert sum(block.size for block in blocks) == need.size
    row_bytes = math.prod(shape[1:]) * 4
    for block, following in zip(blocks, blocks[1:]):
        assert following.offset[0] == block.offset[0] + block.shape[0]
    for block in blocks:
        assert block.shape[1:] == need.shape[1:]
        assert block.shape[0] == 1 or block.shape[0] * row_bytes <= window


def test_boxes_meet_where_both_cover():
    assert intersection(Box((0, 0), (4, 4)), Box((2, 3), (5, 5))) == Box((2, 3), (2, 1))
    assert intersection(Box((0,), (2,)), Box((2,), (2,))) is None
    assert tiling_problem((), [Box((), ())]) is None
    assert tiling_problem((3,), [Box((0,), (2,)), Box((1,), (2,))]) == "shards overlap at [1:2] of the shape [3]"
    assert "outside" in tiling_problem((3,), [Box((0,), (4,))])


def test_a_hostile_layout_is_refused_without_quadratic_work():
    """A staircase of columns tiles exactly but needs a huge grid; overlapping full boxes cost no grid work."""
    width = 5000
    staircase = [box for j in range(width) for box in (Box((0, j), (j + 1, 1)), Box((j + 1, j), (width - j - 1, 1)))
                 if box.size]
    problem = tiling_problem((width, width), staircase)  # refused before any pairwise comparison
    assert problem is not None and "too irregularly" in problem
    many = [Box((0, 0), (64, 64))] * 10_000
    assert "more than twice" in tiling_problem((64, 64), many)


def test_empty_boxes_are_no_shards():
    assert tiling_problem((4,), [Box((0,), (4,)), Box((4,), (0,)), Box((4,), (0,))]) is None


@settings(max_examples=300, deadline=None)
@given(shapes.flatmap(lambda shape: st.tuples(st.just(shape), box_in(shape))))
def test_is_one_run_agrees_with_the_runs_themselves(case):
    from asyncckpt.shards import is_one_run

    shape, box = case
    assert is_one_run(shape, box) == (len(needed_runs(shape, 4, box)[0]) == 1)
