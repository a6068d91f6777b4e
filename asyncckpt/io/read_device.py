"""Reading into device destinations: window by window through pinned buffers, checksummed, uploaded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np

from asyncckpt import _arrays, _cuda
from asyncckpt.dtypes import describe_dtype
from asyncckpt.format import (
    BYTES_DTYPE,
    TensorRecord,
)
from asyncckpt.io.plan import ReadRange
from asyncckpt.shards import ShardedTarget

from asyncckpt.io.plan import scatter
from asyncckpt.io.settings import MiB
from asyncckpt.io.tasks import finish_even_if_cancelled

logger = logging.getLogger("asyncckpt")


@dataclass(frozen=True)
class DeviceTarget:
    """A device destination: the stager uploading into it and the backend's own array viewing it."""

    stager: _cuda.Stager
    array: Any


class DeviceUploads:
    """The device destinations of one read; as a context manager, the ordering of their uploads.

    Entered in the caller's thread: each device's uploads run after the work pending on that
    thread's current stream; on exit (error or not) that stream waits, on the device, for them.
    """

    def __init__(self, targets: dict[str, DeviceTarget]) -> None:
        self.targets = targets
        self._streams: list[tuple[_cuda.Stager, Any]] = []

    def __enter__(self) -> DeviceUploads:
        try:
            for stager in {id(t.stager): t.stager for t in self.targets.values()}.values():
                self._streams.append((stager, stager.begin_uploads()))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for stager, stream in self._streams:
            stager.end_uploads(stream)


class DeviceReads:
    """The device half of CheckpointReader."""

    def _device_uploads(self, out: Mapping[str, Any] | None, stager: _cuda.Stager | None) -> DeviceUploads:
        """Check the device destinations in ``out`` (before anything is read) and order their uploads.

        Runs in the caller's thread: its current stream is the one the uploads are ordered on.
        Host destinations are checked later, by :meth:`_destination`.
        """
        targets: dict[str, DeviceTarget] = {}
        for key, given in (out or {}).items():
            if isinstance(given, (np.ndarray, ShardedTarget)) or type(self._tensors.get(key)) is not TensorRecord:
                continue  # host destinations, boxes, sharded values and unknown keys: _read's to handle
            found = _arrays.device_target(given, None if stager is None else stager.backend)
            if found is None:
                continue
            backend, array = found
            record = self._tensors[key]
            if record.dtype == BYTES_DTYPE:
                raise ValueError(f"key {key!r} holds a byte string; it cannot be read into an array")
            dtype, shape = np.dtype(array.dtype), tuple(int(d) for d in array.shape)
            if dtype != record.spec.dtype or shape != record.shape or not backend.is_c_contiguous(array):
                layout = "" if backend.is_c_contiguous(array) else " non-contiguous"
                raise ValueError(
                    f"cannot read key {key!r} ({record.dtype}{list(record.shape)}) into a{layout} "
                    f"{describe_dtype(dtype)}{list(shape)} device array: a destination must be a C-contiguous array "
                    "of the same dtype and shape"
                )
            targets[key] = DeviceTarget(stager or _cuda.stager_for(backend), array)
        return DeviceUploads(targets)

    async def _fetch_windows(
        self, read_range: ReadRange, views: dict[str, memoryview], devices: Mapping[str, DeviceTarget]
    ) -> list[int]:
        """Read a range with device targets window by window; return each target's verified CRC.

        A window is one storage read: its device bytes (at most one pinned buffer, of one device)
        go into a pinned buffer, host bytes straight into their destinations, gaps into scratch
        space. Once read, the window's pieces extend their targets' running CRC-32C (a target
        whose last byte is in the window is checked), then its uploads are enqueued and the
        buffer goes back to the pool; the next window is read while they run.
        """
        targets = read_range.targets
        total = read_range.stop - read_range.start
        gaps = [b.range_offset - (a.range_offset + a.length) for a, b in zip(targets, targets[1:])]
        gaps.append(total - (targets[-1].range_offset + targets[-1].length))
        scratch = memoryview(bytearray(max(gaps)))
        crcs = [0] * len(targets)
        index = within = position = 0  # next target, bytes of it already read, offset in the range
        while index < len(targets):
            start = position
            buffers: list[Any] = []
            parts: list[tuple[int, memoryview, bool]] = []  # (target index, piece, target complete)
            pieces: list[tuple[int, int, Any, int]] = []  # uploads: (buffer offset, nbytes, array, offset)
            stager = pinned = window = None
            used = 0
            try:
                while index < len(targets):
                    target = targets[index]
                    if target.range_offset > position:  # a gap between extents: bytes nobody needs
                        buffers.append(scratch[: target.range_offset - position])
                        position = target.range_offset
                        continue
                    remaining = target.length - within
                    device = devices.get(target.key)
                    if device is None:
                        offset = target.tensor_offset + within
                        piece = views[target.key][offset : offset + remaining]
                    else:
                        if stager is None:
                            stager = device.stager
                            pinned, window = await self._window_buffer(stager, total - position)
                        elif device.stager is not stager or used == len(window):
                            break  # the window's buffer is full, or belongs to another device
                        size = min(remaining, len(window) - used)
                        piece = memoryview(window)[used : used + size]
                        pieces.append((used, size, device.array, target.tensor_offset + within))
                        used += size
                    buffers.append(piece)
                    within += len(piece)
                    position += len(piece)
                    parts.append((index, piece, within == target.length))
                    if within == target.length:
                        index, within = index + 1, 0
                if index == len(targets) and position < total:
                    buffers.append(scratch[: total - position])
                    position = total
                await finish_even_if_cancelled(self._read_into(read_range, start, buffers))
                if position - start >= MiB:
                    await asyncio.to_thread(self._verify_window, read_range, parts, crcs)
                else:
                    self._verify_window(read_range, parts, crcs)
            except BaseException:
                if pinned is not None:
                    stager.upload_window(pinned, ())  # nothing uploaded from it: just give it back
                raise
            if pinned is not None:
                stager.upload_window(pinned, pieces)  # asynchronous copies from page-locked memory
            elif stager is not None:  # from pageable memory a copy may block: not on the loop
                await asyncio.to_thread(stager.upload_window, window, pieces)
        return crcs

    async def _window_buffer(self, stager: _cuda.Stager, most: int) -> tuple[_cuda.PinnedBuffer | None, np.ndarray]:
        """``(pinned buffer, its bytes)`` to read a window into, or ``(None, private bytes)``.

        Never waits for a free buffer (the pool may be held by captures or other windows): with
        none free the window goes through a private pageable buffer of at most ``most`` bytes.
        A buffer whose last upload still runs is waited for in a worker thread.
        """
        pinned = stager.take_upload_buffer()
        if pinned is None:
            return None, np.empty(min(stager.chunk_bytes, most), dtype=np.uint8)
        try:
            if not stager.buffer_idle(pinned):
                await asyncio.to_thread(stager.wait_for_buffer, pinned)
            pinned.pending = None
        except BaseException:
            stager.upload_window(pinned, ())
            raise
        return pinned, pinned.array

    async def _fetch_overlapping(
        self, read_range: ReadRange, views: dict[str, memoryview], devices: Mapping[str, DeviceTarget]
    ) -> list[int]:
        """A range whose extents overlap (only a crafted manifest has them): read whole, verify, copy."""
        buffers, pieces, copies = scatter(read_range, views)
        await self._read_into(read_range, 0, buffers)
        checked = await asyncio.to_thread(self._verify, read_range, pieces, copies)
        for target, piece in zip(read_range.targets, pieces):
            device = devices.get(target.key)
            if device is not None:
                private = np.frombuffer(piece, dtype=np.uint8).copy()
                await asyncio.to_thread(
                    device.stager.upload_window, private, [(0, target.length, device.array, target.tensor_offset)]
                )
        return checked

    def _verify_window(self, read_range: ReadRange, parts: list[tuple[int, memoryview, bool]], crcs: list[int]) -> None:
        """Extend the targets' running CRC-32C by the window's pieces; check the completed ones."""
        checksum = crc32c.crc32c
        for index, piece, complete in parts:
            crcs[index] = checksum(piece, crcs[index])
            target = read_range.targets[index]
            if complete and crcs[index] != target.crc32c:
                raise self._checksum_mismatch(read_range, target, crcs[index])

