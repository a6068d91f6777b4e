"""Pure planning: which bytes of which key go to which data file, and which byte ranges to read.

Both plans are plain functions of their inputs (no I/O, no clocks), so they are tested with plain
asserts and reused by every storage backend.

Write layout (TensorFlow TensorBundle style): values smaller than ``small_array_bytes`` are packed
back to back, in entry order, into ``pack-NNNNN`` files of at most ``pack_bytes``; larger values
are split into ``chunk-NNNNN`` files of at most ``chunk_bytes`` each. Empty values take no file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from asyncckpt.format import TensorRecord

__all__ = [
    "PlanItem",
    "Piece",
    "FilePlan",
    "WritePlan",
    "plan_write",
    "ReadTarget",
    "ReadRange",
    "plan_read",
    "ordered",
    "scatter",
]


@dataclass(frozen=True)
class PlanItem:
    """One value to write: its checkpoint key and its size in bytes.

    ``extent_bytes`` splits the value's chunks into extents (each with its own checksum) of at
    most that many bytes: for values read in parts (shards), so a partial read reads and checks
    little beyond what it needs.
    """

    key: str
    nbytes: int
    extent_bytes: int | None = None


class Piece(NamedTuple):
    """``length`` bytes of item ``item`` starting at ``item_offset``, stored at ``file_offset``.

    A named tuple: a plan of 10,000 values makes 10,000 of them, and a tuple is built in a tenth
    of the time a frozen dataclass takes.
    """

    item: int
    item_offset: int
    file_offset: int
    length: int


@dataclass(frozen=True)
class FilePlan:
    """One data file: its name inside the data directory, its size and its pieces in file order."""

    name: str
    size: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class WritePlan:
    """The whole layout of one checkpoint's data.

    ``extents[i]`` lists, in the item's byte order, ``(file_index, piece_index)`` pairs locating
    each run of item ``i``'s bytes; concatenated they are the whole value.
    """

    items: tuple[PlanItem, ...]
    files: tuple[FilePlan, ...]
    extents: tuple[tuple[tuple[int, int], ...], ...]

    def files_of_item(self, item: int) -> tuple[int, ...]:
        """Indices of the files holding any byte of ``item`` (ascending, no repeats)."""
        return tuple(sorted({file_index for file_index, _ in self.extents[item]}))

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.files)


def plan_write(
    items: Sequence[PlanItem], *, small_array_bytes: int, pack_bytes: int, chunk_bytes: int
) -> WritePlan:
    """Lay ``items`` out into data files.

    Parameters
    ----------
    items:
        The values in entry order; their order decides the order of bytes in pack files.
    small_array_bytes:
        Values strictly smaller than this are packed; others are chunked.
    pack_bytes:
        Target size of a pack file. A pack is closed before a value would push it past this size,
        so no pack exceeds ``max(pack_bytes, small_array_bytes - 1)``.
    chunk_bytes:
        Largest chunk file.
    """
    if min(small_array_bytes, pack_bytes, chunk_bytes) <= 0:
        raise ValueError("small_array_bytes, pack_bytes and chunk_bytes must be positive")
    files: list[FilePlan] = []
    pack_pieces: list[Piece] = []
    pack_size = 0
    pack_count = chunk_count = 0

    def close_pack() -> None:
        nonlocal pack_pieces, pack_size, pack_count
        if pack_pieces:
            files.append(FilePlan(f"pack-{pack_count:05d}", pack_size, tuple(pack_pieces)))
            pack_count += 1
            pack_pieces, pack_size = [], 0

    for index, item in enumerate(items):
        if item.nbytes < 0:
            raise ValueError(f"item {item.key!r} has negative size {item.nbytes}")
        if item.nbytes == 0:
            continue
        if item.nbytes < small_array_bytes:
            if pack_size + item.nbytes > pack_bytes:
                close_pack()
            pack_pieces.append(Piece(index, 0, pack_size, item.nbytes))
            pack_size += item.nbytes
            continue
        for start in range(0, item.nbytes, chunk_bytes):
            length = min(chunk_bytes, item.nbytes - start)
            step = item.extent_bytes or length
            pieces = tuple(Piece(index, start + offset, offset, min(step, length - offset))
                           for offset in range(0, length, step))
            files.append(FilePlan(f"chunk-{chunk_count:05d}", length, pieces))
            chunk_count += 1
    close_pack()
    # A pack is appended when it closes, after chunks of later items; put files back in the order
    # of their first byte's item so staging follows entry order.
    files.sort(key=lambda file: (file.pieces[0].item, file.pieces[0].item_offset))

    located: list[list[tuple[int, int, int]]] = [[] for _ in items]
    for file_index, file in enumerate(files):
        for piece_index, piece in enumerate(file.pieces):
            located[piece.item].append((piece.item_offset, file_index, piece_index))
    # Most items are one piece: no sort, no generator for them.
    extents = tuple(
        ((runs[0][1], runs[0][2]),) if len(runs) == 1 else tuple((f, p) for _, f, p in sorted(runs))
        for runs in located
    )
    return WritePlan(tuple(items), tuple(files), extents)


@dataclass(frozen=True)
class ReadTarget:
    """An extent to deliver from a read range: ``key``'s extent ``extent_index``.

    Its bytes sit at ``range_offset`` in the range and belong at ``tensor_offset`` in the value.
    """

    key: str
    extent_index: int
    tensor_offset: int
    range_offset: int
    length: int
    crc32c: int


@dataclass(frozen=True)
class ReadRange:
    """One storage read: bytes ``[start, stop)`` of data file ``file``, serving ``targets``."""

    file: str
    start: int
    stop: int
    targets: tuple[ReadTarget, ...]


def plan_read(
    records: Mapping[str, TensorRecord], *, coalesce_gap_bytes: int, max_range_bytes: int
) -> tuple[ReadRange, ...]:
    """Group the extents of ``records`` into byte-range reads.

    Extents of one file whose gap is at most ``coalesce_gap_bytes`` are read together, as long as
    the merged range stays within ``max_range_bytes`` (an extent larger than that is read alone).
    Ranges are returned grouped by file, in offset order.
    """
    by_file: dict[str, list[tuple[int, int, str, int, int, int]]] = defaultdict(list)
    for key, record in records.items():
        tensor_offset = 0
        for extent_index, extent in enumerate(record.extents):
            by_file[extent.file].append(
                (extent.offset, extent.length, key, extent_index, tensor_offset, extent.crc32c)
            )
            tensor_offset += extent.length

    ranges: list[ReadRange] = []
    for file in sorted(by_file):
        pending: list[tuple[int, int, str, int, int, int]] = []
        start = stop = 0

        def flush() -> None:
            targets = tuple(
                ReadTarget(key, extent_index, tensor_offset, offset - start, length, crc)
                for offset, length, key, extent_index, tensor_offset, crc in pending
            )
            ranges.append(ReadRange(file, start, stop, targets))

        for extent in sorted(by_file[file], key=lambda e: (e[0], e[1], e[2], e[3])):
            offset, length = extent[0], extent[1]
            end = offset + length
            if pending and offset - stop <= coalesce_gap_bytes and max(stop, end) - start <= max_range_bytes:
                pending.append(extent)
                stop = max(stop, end)
                continue
            if pending:
                flush()
            pending, start, stop = [extent], offset, end
        if pending:
            flush()
    return tuple(ranges)


def ordered(targets: Sequence[Any]) -> bool:
    """Whether the targets follow each other without overlapping (always, but for crafted manifests)."""
    return all(a.range_offset + a.length <= b.range_offset for a, b in zip(targets, targets[1:]))


def scatter(read_range: ReadRange, views: dict[str, memoryview]) -> tuple[list[Any], list[memoryview], list]:
    """How to read ``read_range``: ``(buffers, pieces, copies)``.

    ``buffers`` are what the read fills, in file order; ``pieces`` the bytes of each target among
    them; ``copies`` ``(destination, piece)`` pairs to copy once the pieces are verified. Targets
    are normally read straight into their destinations, with gaps going to scratch space. Without
    destinations (verification), or with overlapping extents (only a crafted manifest has them),
    the whole range is read into scratch space and sliced.
    """
    targets = read_range.targets
    if not ordered(targets) or not views:
        scratch = memoryview(bytearray(read_range.stop - read_range.start))
        pieces = [scratch[t.range_offset : t.range_offset + t.length] for t in targets]
        copies = [
            (views[t.key][t.tensor_offset : t.tensor_offset + t.length], piece)
            for t, piece in zip(targets, pieces)
            if t.key in views
        ]
        return [scratch], pieces, copies
    pieces = [views[t.key][t.tensor_offset : t.tensor_offset + t.length] for t in targets]
    buffers: list[memoryview] = []
    gaps: list[int] = []
    position = 0
    for target, piece in zip(targets, pieces):
        if target.range_offset > position:
            gaps.append(len(buffers))
            buffers.append(target.range_offset - position)
        buffers.append(piece)
        position = target.range_offset + target.length
    if read_range.stop - read_range.start > position:
        gaps.append(len(buffers))
        buffers.append(read_range.stop - read_range.start - position)
    if gaps:  # one scratch buffer serves every gap: their bytes are not needed
        scratch = memoryview(bytearray(max(buffers[index] for index in gaps)))
        for index in gaps:
            buffers[index] = scratch[: buffers[index]]
    return buffers, pieces, []
