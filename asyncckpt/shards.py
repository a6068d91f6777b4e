"""Sharded values as pure data: boxes of a global array, their tiling, and the bytes a box needs.

A *sharded value* is a global array of which a process holds only some *shards*: boxes given by
an offset and a shape in the global index space, each a C-order array of its own. A save writes
each shard once; the checkpoint records the global shape and every shard (format version 2,
``docs/format.md`` section 13). A restore asks for any other boxes -- another number of ranks,
another slicing, or the whole array -- and reads only the data extents that hold bytes of them.

Nothing here does I/O. The save side describes what it holds with :class:`ShardedValue`; the
restore side asks for boxes with :class:`ShardedTarget`. :func:`tiling_problem` says whether
shards cover a global shape exactly, :func:`needed_runs` and :func:`touched_extents` which bytes
and extents of a stored shard a box needs.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Box",
    "Shard",
    "ShardedValue",
    "ShardedTarget",
    "SHARD_SEPARATOR",
    "MAX_SHARDS",
    "SHARD_EXTENT_BYTES",
    "declaration_key",
    "shard_key",
    "parse_item_key",
    "is_shard_item",
    "intersection",
    "tiling_problem",
    "needed_runs",
    "is_one_run",
    "touched_extents",
    "row_blocks",
    "spread_writer",
]

#: Separates a checkpoint key from a shard's description in the item keys of one write. A user's
#: key may not contain it (``prepare_sources`` refuses one that does).
SHARD_SEPARATOR = "\x00"
#: The most shards one value may have in a checkpoint.
MAX_SHARDS = 1 << 20
#: A stored shard's chunks are checksummed in extents of at most this many bytes, so a read of
#: part of it reads, and verifies, at most one extent beyond what it needs at each end.
SHARD_EXTENT_BYTES = 1 << 20
#: Above this many grid cells, :func:`tiling_problem` compares shards pairwise instead...
_MAX_GRID_CELLS = 1 << 22
#: ...and only this many (a layout that needs the pairwise check and has more shards is refused:
#: no real slicing is that irregular, and the check would take quadratic time).
_MAX_IRREGULAR_SHARDS = 2048


@dataclass(frozen=True)
class Box:
    """The part ``[offset, offset + shape)`` of a global index space."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def slices(self, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
        """The box as slices, relative to ``origin`` (the global origin by default)."""
        origin = origin or (0,) * len(self.offset)
        return tuple(slice(o - b, o - b + n) for o, b, n in zip(self.offset, origin, self.shape))

    def describe(self) -> str:
        return "[" + ", ".join(f"{o}:{o + n}" for o, n in zip(self.offset, self.shape)) + "]"


@dataclass(frozen=True)
class Shard:
    """One box of a sharded value this process writes: ``value`` holds its elements, C order.

    ``value`` is anything a whole value may be: an array, or an object with the snapshot-source
    protocol (a :class:`~asyncckpt.Variable`, a guarded tensor), so a shard has the same
    snapshot guarantee as a whole value.
    """

    offset: tuple[int, ...]
    value: Any


@dataclass(frozen=True)
class ShardedValue:
    """What a trackable saves for a value it holds only part of.

    ``shards`` are the boxes *this process writes*: a box held by several processes (a replica)
    is given by exactly one of them (:func:`spread_writer` picks which, the same on all), so
    every box is written once. ``dtype`` is the manifest dtype string of the whole value.
    """

    global_shape: tuple[int, ...]
    dtype: str
    shards: tuple[Shard, ...] = ()
    #: Boxes this process holds but another writes (its replicas): never written by this
    #: process, only checksummed when a save checks that replicas agree.
    held: tuple[Shard, ...] = ()


@dataclass
class ShardedTarget:
    """What a restore asks of a sharded (or whole) value: the elements of each box in ``boxes``.

    ``out`` may hold, per box, a writable C-contiguous NumPy array of the box's shape and the
    value's dtype to read into; a read returns one array per box, in order.
    """

    boxes: tuple[Box, ...]
    out: tuple[Any, ...] = field(default=())


def _item_suffix(description: list) -> str:
    return SHARD_SEPARATOR + json.dumps(description, separators=(",", ":"))


def declaration_key(key: str, dtype: str, global_shape: Sequence[int]) -> str:
    """The item key saying that ``key`` is a sharded value of ``dtype`` and ``global_shape``."""
    return key + _item_suffix([dtype, list(global_shape)])


def shard_key(key: str, dtype: str, global_shape: Sequence[int], offset: Sequence[int]) -> str:
    """The item key of the shard of ``key`` at ``offset``."""
    return key + _item_suffix([dtype, list(global_shape), list(offset)])


def parse_item_key(item: str) -> tuple[str, str, tuple[int, ...], tuple[int, ...] | None] | None:
    """``(key, dtype, global_shape, offset or None)`` of a sharded item key; ``None`` for a plain key.

    Item keys come back from other ranks' sections, so they are checked like any untrusted field.
    """
    key, separator, description = item.partition(SHARD_SEPARATOR)
    if not separator:
        return None
    try:
        parts = json.loads(description)
    except ValueError:
        raise ValueError(f"malformed shard description in item key {item!r}") from None
    if (not isinstance(parts, list) or len(parts) not in (2, 3) or not isinstance(parts[0], str)
            or not all(_is_index_list(part) for part in parts[1:])):
        raise ValueError(f"malformed shard description in item key {item!r}")
    offset = tuple(parts[2]) if len(parts) == 3 else None
    return key, parts[0], tuple(parts[1]), offset


def is_shard_item(item: str) -> bool:
    """Whether ``item`` is the key of one shard (not a plain key, not a declaration)."""
    return SHARD_SEPARATOR in item and item.partition(SHARD_SEPARATOR)[2].count("[") == 3


def _is_index_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(dim) is int and dim >= 0 for dim in value)


def intersection(a: Box, b: Box) -> Box | None:
    """The box both ``a`` and ``b`` cover, or ``None`` when they share no element."""
    offset, shape = [], []
    for a0, an, b0, bn in zip(a.offset, a.shape, b.offset, b.shape):
        start, stop = max(a0, b0), min(a0 + an, b0 + bn)
        if stop <= start:
            return None
        offset.append(start)
        shape.append(stop - start)
    return Box(tuple(offset), tuple(shape))


def tiling_problem(global_shape: Sequence[int], boxes: Sequence[Box]) -> str | None:
    """What keeps ``boxes`` from tiling ``global_shape`` exactly (a gap, an overlap, a box outside).

    ``None`` when every element is in exactly one box. Boxes of no element are allowed and cover
    nothing. The check lays a grid through every box edge and counts, per grid cell, the boxes
    covering it: linear in boxes and cells, and exact for uneven splits too.
    """
    global_shape = tuple(global_shape)
    ndim = len(global_shape)
    for box in boxes:
        if len(box.offset) != ndim or len(box.shape) != ndim:
            return f"the shard {box.describe()} has {len(box.shape)} dimensions, the value {ndim}"
        if any(o + n > dim for o, n, dim in zip(box.offset, box.shape, global_shape)):
            return f"the shard {box.describe()} lies outside the shape {list(global_shape)}"
    if len(boxes) > MAX_SHARDS:
        return f"{len(boxes)} shards is more than the {MAX_SHARDS} a value may have"
    full = [box for box in boxes if box.size]
    total = math.prod(global_shape)
    if total == 0:
        return None
    if not full:
        return f"no shard holds any of the {list(global_shape)} elements"
    covered = sum(box.size for box in full)
    cuts = [sorted({0, dim, *(b.offset[d] for b in full), *(b.offset[d] + b.shape[d] for b in full)})
            for d, dim in enumerate(global_shape)]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells > _MAX_GRID_CELLS:
        if covered != total:
            return f"the shards cover {covered} elements, the shape {list(global_shape)} has {total}"
        if len(full) > _MAX_IRREGULAR_SHARDS:
            return (f"{len(full)} shards laid out too irregularly to check ({cells} grid cells, at most "
                    f"{_MAX_GRID_CELLS} allowed)")
        return _pairwise_problem(global_shape, full)
    counts = np.zeros([len(c) - 1 for c in cuts], dtype=np.int32)
    budget = 2 * cells  # cell updates: a tiling makes exactly ``cells`` of them; past twice that, boxes overlap
    for box in full:
        region = tuple(slice(bisect.bisect_left(c, o), bisect.bisect_left(c, o + n))
                       for c, o, n in zip(cuts, box.offset, box.shape))
        budget -= math.prod(part.stop - part.start for part in region)
        if budget < 0:  # stopped before counting cost shards x cells
            return f"shards overlap: together they cover the shape {list(global_shape)} more than twice"
        counts[region] += 1
    for cell, what in ((np.argwhere(counts > 1), "shards overlap at"), (np.argwhere(counts == 0), "no shard covers")):
        if len(cell):
            index = cell[0]
            box = Box(tuple(cuts[d][i] for d, i in enumerate(index)),
                      tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(index)))
            return f"{what} {box.describe()} of the shape {list(global_shape)}"
    return None


def _pairwise_problem(global_shape: tuple[int, ...], boxes: Sequence[Box]) -> str | None:
    """:func:`tiling_problem` for very irregular boxes: overlaps by sweep, gaps by volume."""
    ordered = sorted(boxes, key=lambda box: box.offset)
    for index, box in enumerate(ordered):
        end = box.offset[0] + box.shape[0]
        for other in ordered[index + 1:]:
            if other.offset[0] >= end:
                break
            common = intersection(box, other)
            if common is not None:
                return f"shards overlap at {common.describe()} of the shape {list(global_shape)}"
    covered = sum(box.size for box in boxes)
    if covered != math.prod(global_shape):
        return f"the shards cover {covered} of the {math.prod(global_shape)} elements of {list(global_shape)}"
    return None


def _strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return strides[::-1]


def needed_runs(shard_shape: Sequence[int], itemsize: int, need: Box) -> tuple[np.ndarray, int]:
    """The byte runs of a stored shard holding the elements of ``need`` (relative to the shard).

    Returns ``(starts, length)``: ascending start offsets in the shard's C-order bytes, each
    run ``length`` bytes long. Dimensions after the last partly needed one are taken whole, so
    each run is as long as the layout allows.
    """
    ndim = len(shard_shape)
    if ndim == 0:
        return np.zeros(1, dtype=np.int64), itemsize
    strides = _strides(shard_shape)
    last = ndim - 1
    while last > 0 and need.offset[last] == 0 and need.shape[last] == shard_shape[last]:
        last -= 1
    length = need.shape[last] * strides[last] * itemsize
    starts = np.array([need.offset[last] * strides[last] * itemsize], dtype=np.int64)
    for dim in range(last - 1, -1, -1):
        steps = np.arange(need.offset[dim], need.offset[dim] + need.shape[dim], dtype=np.int64)
        starts = np.add.outer(steps * (strides[dim] * itemsize), starts).reshape(-1)
    return starts, length


def is_one_run(shape: Sequence[int], box: Box) -> bool:
    """Whether ``box``'s elements are one contiguous run of an array of ``shape`` (C order).

    That is: the box is one element wide in every dimension before some dimension, and whole in
    every dimension after it.
    """
    dim = 0
    while dim < len(shape) and box.shape[dim] == 1:
        dim += 1
    return all(box.offset[d] == 0 and box.shape[d] == shape[d] for d in range(dim + 1, len(shape)))


def touched_extents(bounds: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Indices of the extents (``bounds[i] = [start, stop)`` in shard bytes) holding any needed byte."""
    if not len(starts) or not len(bounds) or length <= 0:
        return np.zeros(0, dtype=np.int64)
    ends = starts + length
    first = np.searchsorted(ends, bounds[:, 0], side="right")  # the first run ending after the extent starts
    safe = np.minimum(first, len(starts) - 1)
    return np.nonzero((first < len(starts)) & (starts[safe] < bounds[:, 1]))[0]


def row_blocks(need: Box, shard_shape: Sequence[int], itemsize: int, window: int) -> Iterator[Box]:
    """``need`` cut along its first dimension into boxes whose shard rows span at most ``window`` bytes.

    A block of rows is one contiguous span of the shard's bytes, so it is read into one buffer
    and copied out with array slicing. One row larger than ``window`` is a block of its own.
    """
    if not need.shape or need.size == 0:
        yield need
        return
    row = math.prod(shard_shape[1:]) * itemsize
    per_block = max(1, window // max(row, 1))
    first, count = need.offset[0], need.shape[0]
    for start in range(first, first + count, per_block):
        rows = min(per_block, first + count - start)
        yield Box((start, *need.offset[1:]), (rows, *need.shape[1:]))


def spread_writer(key: str, box: Box, replicas: int) -> int:
    """Which of ``replicas`` holders of ``box`` writes it: the same on every holder, spread over keys."""
    if replicas <= 1:
        return 0
    text = json.dumps([key, list(box.offset)]).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") % replicas
