"""Reading boxes of a value: any slicing out of whole or sharded records, touching only needed extents.

A restore into another number of ranks (or into one process) asks each stored value for boxes
that match none of its shards. For every box and every stored shard it meets, the rows of the
shard holding the box's elements are cut into blocks of at most a window of bytes; each block
reads, into one buffer, exactly the extents that hold a needed byte (``shards.touched_extents``),
each verified whole against its CRC-32C as every read is, and the box's elements are then copied
out with array slicing. A box that is exactly one stored shard is read straight into its
destination. Memory stays within a window per read in flight, whatever the sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncckpt.checksums import crc32c_combine
from asyncckpt.dtypes import describe_dtype
from asyncckpt.format import BYTES_DTYPE, ShardedRecord, TensorRecord
from asyncckpt.shards import Box, ShardedTarget, intersection, is_one_run, needed_runs, row_blocks, touched_extents

__all__ = ["BoxReads", "stored_shards", "whole_box"]

#: The most bytes of buffers one batch of box reads holds at once.
BATCH_BYTES = 64 << 20
#: The most bytes of shard rows one block reads into one buffer.
BLOCK_BYTES = 16 << 20


def stored_shards(record: TensorRecord | ShardedRecord) -> tuple[tuple[tuple[int, ...], TensorRecord], ...]:
    """``(offset, record)`` of every stored shard; a whole value is one shard at the origin."""
    if type(record) is ShardedRecord:
        return record.shards
    return (((0,) * len(record.shape), record),)


@dataclass
class _Copy:
    """After a batch is read: ``destination[target] = view of buffer as the block's rows [source]``."""

    buffer: np.ndarray
    start: int  # byte of the buffer where the block's first row begins
    rows_shape: tuple[int, ...]
    source: tuple[slice, ...]
    destination: np.ndarray
    target: tuple[slice, ...]

    def apply(self) -> None:
        nbytes = int(np.prod(self.rows_shape, dtype=np.int64)) * self.destination.dtype.itemsize
        rows = self.buffer[self.start:self.start + nbytes].view(self.destination.dtype).reshape(self.rows_shape)
        self.destination[self.target] = rows[self.source]


@dataclass
class _FlatCopy:
    """After a batch is read: ``length`` bytes of ``buffer`` at ``start`` into flat bytes ``target`` at ``at``."""

    buffer: np.ndarray
    start: int
    target: np.ndarray
    at: int
    length: int

    def apply(self) -> None:
        self.target[self.at:self.at + self.length] = self.buffer[self.start:self.start + self.length]


class _Batch:
    """Pseudo-records to read together, their destinations, and the copies to make afterwards."""

    def __init__(self) -> None:
        self.records: dict[str, TensorRecord] = {}
        self.out: dict[str, np.ndarray] = {}
        self.copies: list[_Copy] = []
        self.bytes = 0


class BoxReads:
    """The box half of CheckpointReader: ``_read_boxes`` serves :class:`ShardedTarget` requests."""

    async def _read_boxes(self, requests: dict[str, ShardedTarget]) -> dict[str, list[np.ndarray]]:
        """The elements of every requested box, as one array per box (the given ``out`` ones)."""
        results: dict[str, list[np.ndarray]] = {}
        batch = _Batch()
        for key, target in requests.items():
            record = self._record(key)
            arrays = results[key] = self._box_destinations(key, record, target)
            dtype = record.spec.dtype
            for box, array in zip(target.boxes, arrays):
                for offset, shard in stored_shards(record):
                    if box == Box(offset, shard.shape):  # the same slicing: read it straight in
                        name = f"{key} (shard at {list(offset)}, read {len(batch.records)})"
                        batch.records[name], batch.out[name] = shard, array
                        batch.bytes += shard.nbytes
                    else:
                        common = intersection(box, Box(offset, shard.shape))
                        if common is None:
                            continue
                        self._plan_box(key, batch, shard, offset, common, box, array, dtype)
                    if batch.bytes >= BATCH_BYTES:
                        await self._finish(batch)
                        batch = _Batch()
        await self._finish(batch)
        return results

    def _box_destinations(self, key: str, record: Any, target: ShardedTarget) -> list[np.ndarray]:
        if record.dtype == BYTES_DTYPE:
            raise ValueError(f"key {key!r} holds a byte string; it cannot be read by boxes")
        dtype, ndim = record.spec.dtype, len(record.shape)
        given = tuple(target.out) or (None,) * len(target.boxes)
        if len(given) != len(target.boxes):
            raise ValueError(f"{len(given)} destinations for {len(target.boxes)} boxes of key {key!r}")
        arrays = []
        for box, array in zip(target.boxes, given):
            if len(box.offset) != ndim or len(box.shape) != ndim or any(
                    o < 0 or n < 0 or o + n > dim for o, n, dim in zip(box.offset, box.shape, record.shape)):
                raise ValueError(f"the box {box.describe()} is not inside key {key!r} "
                                 f"({record.dtype}{list(record.shape)})")
            if array is None:
                array = np.empty(box.shape, dtype=dtype)
            elif (not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != box.shape
                  or not array.flags.c_contiguous or not array.flags.writeable):
                described = (f"a {describe_dtype(array.dtype)}{list(array.shape)} array"
                             if isinstance(array, np.ndarray) else f"a {type(array).__name__}")
                raise ValueError(f"cannot read the box {box.describe()} of key {key!r} ({record.dtype}) into "
                                 f"{described}: a destination must be a writable C-contiguous NumPy array of "
                                 "the box's shape and the value's dtype")
            arrays.append(array)
        return arrays

    def _plan_box(self, key, batch, shard: TensorRecord, offset, common: Box, box: Box, array, dtype) -> None:
        """Blocks of the shard rows holding ``common``, each one buffer of the extents it needs."""
        itemsize = dtype.itemsize
        spans = _spans(shard)
        need = Box(tuple(c - o for c, o in zip(common.offset, offset)), common.shape)
        place = Box(tuple(c - b for c, b in zip(common.offset, box.offset)), common.shape)
        if is_one_run(shard.shape, need) and is_one_run(box.shape, place):
            starts, length = needed_runs(shard.shape, itemsize, need)
            at = int(needed_runs(box.shape, itemsize, place)[0][0])
            self._plan_run(key, batch, shard, offset, spans, int(starts[0]), length, array, at)
            return
        row_bytes = int(np.prod(shard.shape[1:], dtype=np.int64)) * itemsize
        for block in row_blocks(need, shard.shape, itemsize, BLOCK_BYTES):
            starts, length = needed_runs(shard.shape, itemsize, block)
            touched = touched_extents(spans, starts, length)
            if not len(touched):
                continue
            first_row = block.offset[0] if block.shape else 0
            rows = block.shape[0] if block.shape else 1
            low = min(int(spans[touched[0], 0]), first_row * row_bytes if block.shape else 0)
            high = max(int(spans[touched[-1], 1]), (first_row + rows) * row_bytes if block.shape else itemsize)
            buffer = np.empty(high - low, dtype=np.uint8)
            for group in np.split(touched, np.nonzero(np.diff(touched) != 1)[0] + 1):
                begin, end = int(spans[group[0], 0]), int(spans[group[-1], 1])
                # (numbered: two boxes may need the same extents, each into a buffer of its own)
                name = f"{key} (shard at {list(offset)}, bytes {begin}:{end}, read {len(batch.records)})"
                batch.records[name] = _record_of(shard, group)
                batch.out[name] = buffer[begin - low:end - low]
            rows_shape = (rows, *shard.shape[1:]) if block.shape else ()
            source = (slice(None), *block.slices()[1:]) if block.shape else ()
            origin = tuple(b + o for b, o in zip(block.offset, offset))
            target = Box(origin, block.shape).slices(box.offset)
            batch.copies.append(_Copy(buffer, (first_row * row_bytes if block.shape else 0) - low,
                                      rows_shape, source, array, target))
            batch.bytes += len(buffer)

    def _plan_run(self, key, batch, shard: TensorRecord, offset, spans, start: int, length: int, array, at: int):
        """A box whose bytes are one run in the shard and one run in its destination (a split by rows):
        extents wholly inside the run are read straight into the destination, the one or two at its
        ends into a buffer of their own, and the part inside copied over."""
        flat = array.reshape(-1).view(np.uint8)
        touched = touched_extents(spans, np.array([start], dtype=np.int64), length)
        inner = [int(i) for i in touched if spans[i, 0] >= start and spans[i, 1] <= start + length]
        for group in np.split(np.array(inner, dtype=np.int64), np.nonzero(np.diff(inner) != 1)[0] + 1) if inner else ():
            begin, end = int(spans[group[0], 0]), int(spans[group[-1], 1])
            name = f"{key} (shard at {list(offset)}, bytes {begin}:{end}, read {len(batch.records)})"
            batch.records[name] = _record_of(shard, group)
            batch.out[name] = flat[at + begin - start:at + end - start]
            batch.bytes += end - begin
        for index in (int(i) for i in touched if int(i) not in inner):
            begin, end = int(spans[index, 0]), int(spans[index, 1])
            buffer = np.empty(end - begin, dtype=np.uint8)
            name = f"{key} (shard at {list(offset)}, bytes {begin}:{end}, read {len(batch.records)})"
            batch.records[name] = _record_of(shard, [index])
            batch.out[name] = buffer
            low, high = max(begin, start), min(end, start + length)
            batch.copies.append(_FlatCopy(buffer, low - begin, flat, at + low - start, high - low))
            batch.bytes += end - begin

    async def _finish(self, batch: _Batch) -> None:
        """Read a batch (every extent verified), then copy each block's elements out."""
        if not batch.records:
            return
        await self._read_records(batch.records, assemble=True, out=batch.out)
        for copy in batch.copies:
            copy.apply()


def _spans(shard: TensorRecord) -> np.ndarray:
    """``[start, stop)`` of each extent in the shard's own bytes."""
    bounds = np.cumsum([0, *(extent.length for extent in shard.extents)], dtype=np.int64)
    return np.stack([bounds[:-1], bounds[1:]], axis=1) if len(shard.extents) else np.zeros((0, 2), np.int64)


def _record_of(shard: TensorRecord, indices) -> TensorRecord:
    """Consecutive extents ``indices`` of ``shard`` as a record of bytes of their own (their checksums combined)."""
    extents = tuple(shard.extents[int(index)] for index in indices)
    crc = extents[0].crc32c
    for extent in extents[1:]:
        crc = crc32c_combine(crc, extent.crc32c, extent.length)
    length = sum(extent.length for extent in extents)
    return TensorRecord("|u1", (length,), length, crc, extents)


def whole_box(shape: Sequence[int], out: Any = None) -> ShardedTarget:
    """A request for the whole of a value of ``shape`` (into ``out`` when given)."""
    return ShardedTarget((Box((0,) * len(shape), tuple(shape)),), () if out is None else (out,))
