"""Saving: capturing device arrays as they will be once the training stream's pending work is done.

:meth:`DeviceCapturer.stage` never waits for the device (except in the last-resort policy): it
enqueues its copies on the caller's current stream, so they run after the work already there and
before anything enqueued later, and picks one policy per array (``device_copy``, then
``stream_wait``, then ``host_copy``; docs/gpu.md weighs their costs). Small C-contiguous arrays are
packed first: a :class:`PackPlan` lays them end to end and one kernel gathers them, so saving
thousands of small variables costs one launch instead of one copy each. Bringing the captured
bytes to the host is :mod:`asyncckpt._cuda.readback`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncckpt._cuda.backend import (
    DEFAULT_PACK_BYTES,
    DEFAULT_SAFETY_FACTOR,
    DEVICE_COPY,
    HOST_COPY,
    STREAM_WAIT,
    CapturePolicy,
    DeviceBackend,
    DeviceCopyError,
)
from asyncckpt._cuda.pinned import PinnedBuffer, StagingArea
from asyncckpt._cuda.readback import CaptureReader, CaptureState, DeviceCapture

__all__ = ["PackPlan", "DeviceCapturer"]

_PACKED = "packed"  # a plan entry: the array is part of the save's packed device copy


class PackPlan:
    """Small C-contiguous arrays of one device laid end to end: the layout of a packed device copy.

    Made once for a set of arrays and reusable by every save of exactly those array objects: the
    gather table (their device pointers) is built on first use, asynchronously, and kept -- which
    is why the plan holds the arrays. ``label`` names the pack in errors.
    """

    #: Each array starts at a multiple of this, so the gather kernel copies 8-byte words (an
    #: odd-sized array would otherwise misalign every array after it).
    ALIGNMENT = 8

    def __init__(self, arrays: Sequence[Any], label: str | None = None) -> None:
        self.arrays = tuple(arrays)
        offsets, padding, position = [], [], 0
        for array in self.arrays:
            start = -(-position // self.ALIGNMENT) * self.ALIGNMENT
            if start > position:
                padding.append((position, start))
            offsets.append(start)
            position = start + int(array.nbytes)
        self.offsets = tuple(offsets)
        #: ``(start, stop)`` byte ranges between arrays that hold nothing.
        self.padding = tuple(padding)
        self.nbytes = position
        self.label = label if label is not None else f"{len(self.arrays)} packed arrays"
        self._table: Any = None
        self._made_on: Any = None
        self._ready: Any = None

    def table(self, backend: DeviceBackend, stream: Any) -> Any:
        """The gather table, made on first use; later work on ``stream`` is ordered after it."""
        if self._table is None:
            self._table = backend.gather_table(self.arrays, self.offsets, stream)
            self._made_on, self._ready = stream, backend.record_event(stream)
        elif stream is not self._made_on:
            backend.wait_event(stream, self._ready)
        return self._table


class DeviceCapturer:
    """One device's save side: the capture policies and the packed copy of small arrays.

    Parameters
    ----------
    staging:
        The device's pinned memory, shared with its uploader.
    safety_factor:
        A device copy is made only while free device memory is at least this many times the bytes
        copied so far in the save (``math.inf`` never makes one).
    pack_bytes:
        C-contiguous arrays of at most this many bytes are gathered into one packed device copy
        per save by a single kernel (``0`` copies each on its own).
    """

    def __init__(
        self,
        staging: StagingArea,
        *,
        safety_factor: float = DEFAULT_SAFETY_FACTOR,
        pack_bytes: int = DEFAULT_PACK_BYTES,
    ) -> None:
        if not safety_factor >= 1:
            raise ValueError(f"safety_factor must be at least 1, got {safety_factor!r}")
        if type(pack_bytes) is not int or pack_bytes < 0:
            raise ValueError(f"pack_bytes must be a non-negative int, got {pack_bytes!r}")
        self._staging = staging
        self.safety_factor = float(safety_factor)
        self.pack_bytes = pack_bytes
        #: Brings the captured chunks to the host, on the device-to-host copy stream.
        self.reader = CaptureReader(staging)

    @property
    def backend(self) -> DeviceBackend:
        return self._staging.backend

    def stage(self, arrays: Sequence[Any], *, labels: Sequence[str] | None = None) -> list[DeviceCapture]:
        """Capture ``arrays`` as they will be once the current stream's pending work is done.

        Returns one :class:`DeviceCapture` per array, in order. Does not wait for the device
        unless an array falls back to the ``host_copy`` policy (see the module docstring).
        """
        backend = self.backend
        arrays = [backend.adopt(array) for array in arrays]
        labels = [f"array {i}" for i in range(len(arrays))] if labels is None else [str(label) for label in labels]
        if len(labels) != len(arrays):
            raise ValueError(f"got {len(labels)} labels for {len(arrays)} arrays")
        to_host = self.reader.stream
        with self._staging.lock:
            self._staging.check_open()
            self._staging.collect()
            stream = backend.current_stream()
            total = sum(int(array.nbytes) for array in arrays)
            free = backend.mem_info()[0] if total else 0
            copied = 0
            plans: list[tuple[CapturePolicy | str, Any, list[PinnedBuffer] | None]] = []
            packed_state, offsets = self._pack(arrays, stream, free)
            if packed_state is not None:
                copied += packed_state.nbytes
            try:
                for index, (array, label) in enumerate(zip(arrays, labels)):
                    nbytes = int(array.nbytes)
                    if index in offsets:
                        plans.append((_PACKED, None, None))
                        continue
                    if nbytes == 0:
                        plans.append((HOST_COPY, array, None))
                        continue
                    if (copied + nbytes) * self.safety_factor <= free:
                        copy = self._try_copy(array, stream)
                        if copy is not None:
                            copied += nbytes
                            plans.append((DEVICE_COPY, copy, None))
                            continue
                    if not backend.is_c_contiguous(array):
                        copy = self._try_copy(array, stream)
                        if copy is None:
                            raise DeviceCopyError(
                                f"cannot capture {label!r}: it is not C-contiguous and the device has no "
                                "memory left for a contiguous copy"
                            )
                        array = copy
                    buffers = self._staging.pool.try_reserve(self._count_chunks(nbytes))
                    plans.append((HOST_COPY, array, None) if buffers is None else (STREAM_WAIT, array, buffers))
            except BaseException:
                for _, _, buffers in plans:
                    for buffer in buffers or ():
                        buffer.owner.release(buffer, buffer.pending)
                if packed_state is not None:  # nobody will read it: free its device copy once made
                    backend.wait_event(to_host, backend.record_event(stream))
                    self.reader.retire(packed_state)
                raise
            # Everything below is ordered after the pending work and after the device copies.
            backend.wait_event(to_host, backend.record_event(stream))
            states: list[CaptureState] = []
            syncs: list[tuple[Any, Any]] = []
            waits = False
            for (policy, source, buffers), label in zip(plans, labels):
                if policy == _PACKED:
                    states.append(packed_state)
                    continue
                nbytes = int(source.nbytes)
                if policy == HOST_COPY:
                    host = np.empty(nbytes, dtype=np.uint8)
                    if nbytes:
                        backend.d2h_async(source, 0, host, to_host)
                        syncs.append((backend.record_event(to_host), source))
                        self._staging.stats["host_copies"] += 1
                    state = CaptureState(label, policy, host, nbytes, self._staging.chunk_bytes)
                elif policy == STREAM_WAIT:
                    state = CaptureState(label, policy, source, nbytes, self._staging.chunk_bytes)
                    for chunk, buffer in zip(state.chunks, buffers):
                        self.reader.fetch(state, chunk, buffer)
                    waits = True
                    self._staging.stats["stream_waits"] += 1
                else:
                    state = CaptureState(label, policy, source, nbytes, self._staging.chunk_bytes)
                    self.reader.queue(state)
                    self._staging.stats["device_copies"] += 1
                states.append(state)
            if waits:
                # Later training work waits, on the device, until these copies have read the arrays.
                backend.wait_event(stream, backend.record_event(to_host))
            # device_copy chunks are prefetched from the first read on (by the writer, not here:
            # enqueuing dozens of copies would lengthen the save's stall for nothing).
        captures = []
        for index, (state, array, label) in enumerate(zip(states, arrays, labels)):
            dtype, shape = np.dtype(array.dtype), tuple(int(d) for d in array.shape)
            if index in offsets:
                captures.append(DeviceCapture(self.reader, state, dtype, shape, base=offsets[index],
                                              nbytes=int(array.nbytes), label=label))
            else:
                captures.append(DeviceCapture(self.reader, state, dtype, shape))
        for event, _ in syncs:  # host_copy only: the documented last resort
            try:
                backend.synchronize_event(event)
            except BaseException as exc:
                for capture in captures:
                    capture.close()
                raise DeviceCopyError(f"copying {len(syncs)} array(s) from the device failed: {exc}") from exc
        return captures

    def stage_pack(self, plan: PackPlan) -> DeviceCapture | None:
        """Capture every array of ``plan`` with one gather into a packed device copy.

        The capture holds the arrays' bytes at ``plan.offsets``, ordered like :meth:`stage`.
        ``None`` when the device lacks the memory for the copy: capture them with :meth:`stage`.
        """
        backend = self.backend
        with self._staging.lock:
            self._staging.check_open()
            self._staging.collect()
            stream = backend.current_stream()
            state = self._gather(plan, stream, backend.mem_info()[0])
            if state is None:
                return None
            backend.wait_event(self.reader.stream, backend.record_event(stream))
        return DeviceCapture(self.reader, state, np.dtype(np.uint8), (plan.nbytes,), label=plan.label)

    def _pack(self, arrays: Sequence[Any], stream: Any, free: int) -> tuple[CaptureState | None, dict[int, int]]:
        """Gather the small arrays into one device copy on ``stream``: ``(its state, {index: offset})``.

        One launch instead of a copy per array is what keeps the stall of saving thousands of
        small variables short. ``(None, {})`` when fewer than two arrays are small or the device
        lacks the memory (they then take the per-array policies). Caller holds the lock.
        """
        indices = []
        if self.pack_bytes:
            indices = [i for i, array in enumerate(arrays)
                       if 0 < int(array.nbytes) <= self.pack_bytes and self.backend.is_c_contiguous(array)]
        if len(indices) < 2:
            return None, {}
        plan = PackPlan([arrays[i] for i in indices])
        state = self._gather(plan, stream, free)
        return (None, {}) if state is None else (state, dict(zip(indices, plan.offsets)))

    def _gather(self, plan: PackPlan, stream: Any, free: int) -> CaptureState | None:
        """Enqueue ``plan``'s gather on ``stream`` and queue its chunks for prefetching. Caller holds the lock."""
        if plan.nbytes * self.safety_factor > free:
            return None
        try:
            packed = self.backend.gather_on_stream(plan.table(self.backend, stream), plan.nbytes, stream)
        except MemoryError:  # cupy.cuda.memory.OutOfMemoryError is a MemoryError
            return None
        # The gather reads the table and the arrays on the device: they stay alive with the packed
        # copy, whose retirement waits for the copies to the host ordered after the gather.
        state = CaptureState(plan.label, DEVICE_COPY, packed, plan.nbytes, self._staging.chunk_bytes)
        state.keepalive = plan.table(self.backend, stream)
        for start, stop in plan.padding:  # alignment gaps: never read, so counted as read now
            state.mark_read(start, stop)
        self.reader.queue(state)
        self._staging.stats["device_copies"] += 1
        self._staging.stats["packed_arrays"] += len(plan.arrays)
        return state

    def _count_chunks(self, nbytes: int) -> int:
        return math.ceil(nbytes / self._staging.chunk_bytes)

    def _try_copy(self, array, stream):
        try:
            return self.backend.copy_on_stream(array, stream)
        except MemoryError:  # cupy.cuda.memory.OutOfMemoryError is a MemoryError
            return None
