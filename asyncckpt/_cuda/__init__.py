"""Device arrays on CUDA GPUs: the backend seam, pinned staging buffers and ordered asynchronous copies.

Everything here talks to the GPU through a :class:`DeviceBackend`: :class:`CupyBackend` on a real
device, :class:`FakeDeviceBackend` in tests (a CPU simulation with streams run by worker threads),
so the ordering and pooling logic is exercised on machines without a GPU.

Saving: :meth:`Stager.stage` (``stage_device_arrays``)
------------------------------------------------------
``stage`` never waits for the device (except in the last-resort policy below). It records an event
on the caller's *current stream* -- the training stream -- so every copy it enqueues runs after the
work already enqueued there (a kernel still writing an array when ``save()`` is called is captured
after it finishes). Work the training stream enqueues *after* ``stage`` returns must not change what
is written; each array gets one of three policies, chosen in this order:

``device_copy`` (preferred; chosen while ``free_device_bytes >= safety_factor * copied_bytes``)
    A device-to-device copy is enqueued on the training stream itself, so it is ordered after the
    pending work and before anything enqueued later. The copy is then brought to the host in chunks
    on a dedicated non-blocking copy stream, in the background, through the pinned pool. Cost: the
    training stream runs one extra device copy (device bandwidth, ~1-3 TB/s), and the device holds
    an extra ``nbytes`` per array until its last chunk has been read; then it is freed (after a
    copy-stream event says no copy still reads it). ``free_device_bytes`` is
    ``cudaMemGetInfo``'s free memory, deliberately *not* counting CuPy's cached pool blocks, which
    the next training step will want back. The default factor 2 leaves training at least as much
    free memory as the copies take.
``stream_wait`` (when the device is short of memory and the pinned pool can take the whole array now)
    Every chunk of the array is copied device-to-host at once on the copy stream (after the
    save-time event) into reserved pinned buffers, an event is recorded after the last copy, and the
    training stream waits on it (``cudaStreamWaitEvent``: a device-side wait, no host sync). Cost:
    no device memory, but work enqueued after the save starts only when these copies are done
    (about ``nbytes / PCIe bandwidth``), and the pinned buffers stay reserved until read.
``host_copy`` (last resort: neither fits)
    The array is copied to a pageable host array and ``stage`` waits for that copy: the one case
    where saving synchronises with the device. Cost: ``nbytes`` of host memory outside the staging
    budget, and a save stall of the pending work plus the copy.

Arrays that are not C-contiguous need a contiguous device copy in every policy: when
``device_copy`` is declined the copy is still made on the training stream and then handled by
``stream_wait`` or ``host_copy``; with no device memory for it the save fails, naming the array.

"Never waits" assumes allocation does not wait either: the device copies come from CuPy's memory
pool, which after the first steps of a training loop holds blocks to reuse; a save that must grow
the pool calls ``cudaMalloc``, and the first save allocates the pinned pool (``Stager.warm_up``
does that ahead of time).

Many small arrays
-----------------
Copying arrays one by one costs tens of microseconds of host time each, so thousands of small
variables would stall a save for a fraction of a second. C-contiguous arrays of at most
``pack_bytes`` (1 MiB) are therefore *packed*: one kernel gathers them into a single device buffer
on the training stream (the ``device_copy`` policy, for all of them at once), using a table of
their device pointers that a :class:`PackPlan` builds once and reuses. A :class:`CapturePlan` does
that grouping once per save structure (per device: one pack, the other arrays one by one) and is
reused while the arrays are the same objects, so a repeat save costs a few calls whatever the
number of variables. Each packed array's :class:`DeviceCapture` is a window of the pack.

Chunks and the pinned pool
--------------------------
A :class:`PinnedPool` holds page-locked host buffers of ``chunk_bytes`` each, at most
``pinned_bytes`` in all (a save passes its staging budget), and is reused across saves and restores
(allocating pinned memory is slow). It comes on top of what the snapshot stage itself holds.
Each chunk copy records its own event, so a reader gets the first chunk while later ones are still
being copied. ``device_copy`` chunks are prefetched in capture order into free buffers, from the
first read or :meth:`Stager.prefetch` on (not inside ``stage``, whose time is the save's stall); a read of a
chunk that is not yet fetched takes a free buffer, or evicts the most recently prefetched unread
chunk (it will be fetched again), or, when the pool is all in use, copies through a private
pageable buffer. No read ever waits for a buffer, so readers cannot deadlock on the pool whatever
order they read in. Each byte of a capture is read once; its buffer returns to the pool when all
of its bytes have been read (``read_into``) or when the consumer moves on (``chunks()``).

Restoring: :meth:`Stager.upload` (``upload``) and reads straight into pinned buffers
--------------------------------------------------------------------------------------
Uploads run on a second copy stream, ordered after the work pending on the current stream when
they begin (which may still use the target); the current stream then waits for them (a device-side
wait), so later work sees the restored values. A restore reading a checkpoint into device arrays
uses the window primitives directly: :meth:`Stager.begin_uploads` (in the caller's thread), then
per window of ``chunk_bytes`` :meth:`Stager.take_upload_buffer` (never waits; ``None`` when every
buffer is held, and the window goes through a private pageable buffer instead), the bytes are read
from storage into that pinned buffer and checksummed, and :meth:`Stager.upload_window` enqueues the
host-to-device copies and gives the buffer back with their event as ``pending``; the next user of
the buffer waits for it (:meth:`Stager.wait_for_buffer`, off the event loop). While window k is
uploaded, window k+1 is read into another buffer; pinned memory stays within the pool.
:meth:`Stager.end_uploads` makes the caller's stream wait for them all. ``upload`` (a host array
into a device array) copies each chunk into a pinned buffer the same way; it returns once every
chunk is enqueued and waits on the host only to reuse a pinned buffer whose upload has not
finished yet.

Other frameworks
----------------
PyTorch or JAX tensors on a GPU are adopted without a copy (``cupy.from_dlpack``, which orders the
producer's stream before CuPy's current stream, else ``__cuda_array_interface__``). The copies are
ordered against CuPy's current stream: run ``save()``/``restore()`` with the framework's stream
made current, e.g. ``with cupy.cuda.Stream.from_external(torch_stream):`` (before CuPy 14:
``with cupy.cuda.ExternalStream(torch_stream.cuda_stream):``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import operator
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "DEVICE_COPY",
    "STREAM_WAIT",
    "HOST_COPY",
    "DeviceBackend",
    "CupyBackend",
    "HostSyncError",
    "DeviceCopyError",
    "PinnedPool",
    "PinnedBuffer",
    "DeviceCapture",
    "PackPlan",
    "CapturePlan",
    "Stager",
    "is_cuda_array",
    "cupy_backend",
    "backend_for",
    "stager_for",
    "stage_device_arrays",
    "snapshot_device_arrays",
    "upload",
    "download",
]


from asyncckpt._cuda.backend import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_PACK_BYTES,
    DEFAULT_PINNED_BYTES,
    DEFAULT_SAFETY_FACTOR,
    DEVICE_COPY,
    HOST_COPY,
    STREAM_WAIT,
    DeviceBackend,
    DeviceCopyError,
    HostSyncError,
    MiB,
    is_cuda_array,
)
from asyncckpt._cuda.cupy import CupyBackend, backend_for, cupy_backend
from asyncckpt._cuda.pinned import PinnedBuffer, PinnedPool

_PACKED = "packed"  # a plan entry: the array is part of the save's packed device copy


# =============================================================================================
# Captures: one staged device array


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


class _Chunk:
    __slots__ = ("index", "start", "stop", "buffer", "event", "readers", "read_bytes", "consumed", "prefetched",
                 "arrived")

    def __init__(self, index: int, start: int, stop: int) -> None:
        self.index = index
        self.start = start
        self.stop = stop
        self.buffer: PinnedBuffer | None = None
        self.event: Any = None
        self.readers = 0
        self.read_bytes = 0
        self.consumed = False
        self.prefetched = False
        self.arrived = False  # the copy into ``buffer`` is known to be done (no need to wait again)

    @property
    def length(self) -> int:
        return self.stop - self.start


class _CaptureState:
    """The stager-owned half of a capture (the :class:`DeviceCapture` facade may be collected)."""

    def __init__(self, label: str, policy: str, source: Any, nbytes: int, chunk_bytes: int) -> None:
        self.label = label
        self.policy = policy
        self.source = source  # device_copy: the copy; stream_wait: the original; host_copy: host bytes
        self.nbytes = nbytes
        self.chunk_bytes = chunk_bytes
        count = math.ceil(nbytes / chunk_bytes)
        self.chunks = [_Chunk(i, i * chunk_bytes, min(nbytes, (i + 1) * chunk_bytes)) for i in range(count)]
        self.remaining = count
        self.next_prefetch = 0
        self.closed = False
        self.users = 0  # DeviceCapture objects reading this state (several for a packed state)
        self.keepalive: Any = None  # what the device work producing ``source`` reads (a gather's table)


class DeviceCapture:
    """The value of one device array at save time, on its way to the host.

    Obtained from :meth:`Stager.stage`. ``dtype``, ``shape`` and ``nbytes`` describe the array;
    ``policy`` says how it was captured (``device_copy``, ``stream_wait`` or ``host_copy``).
    Read the bytes with :meth:`read_into` (copies into your buffer), :meth:`acquire` /
    :meth:`release` or :meth:`chunks` (zero-copy views of the pinned buffers). Each byte can be
    read once; resources go back as bytes are read, or with :meth:`close` (also run when the
    capture is garbage collected). Small arrays of one save share a packed device copy: their
    captures are windows ``[base, base + nbytes)`` of one staged buffer.
    """

    def __init__(
        self,
        stager: "Stager",
        state: _CaptureState,
        dtype: np.dtype,
        shape: tuple[int, ...],
        *,
        base: int = 0,
        nbytes: int | None = None,
        label: str | None = None,
    ) -> None:
        self._stager = stager
        self._state = state
        self.dtype = dtype
        self.shape = shape
        self._base = base
        self._nbytes = state.nbytes if nbytes is None else nbytes
        self._label = label
        self._read = 0
        state.users += 1
        self._finalizer = weakref.finalize(self, stager._close_state, state)

    label = property(lambda self: self._label if self._label is not None else self._state.label)
    policy = property(lambda self: self._state.policy)
    nbytes = property(lambda self: self._nbytes)

    @property
    def chunk_bytes(self) -> int:
        return self._state.chunk_bytes

    @property
    def num_chunks(self) -> int:
        """Pinned chunks this value's bytes lie in."""
        if not self._nbytes:
            return 0
        return (self._base + self._nbytes - 1) // self.chunk_bytes - self._base // self.chunk_bytes + 1

    @property
    def consumed(self) -> bool:
        """Whether every byte has been read."""
        return self._read >= self._nbytes

    def __repr__(self) -> str:
        return f"<DeviceCapture {self.label!r} {self.dtype}{list(self.shape)} {self.policy}>"

    def chunk_ready(self, index: int) -> bool:
        """Whether this value's chunk ``index`` is already on the host (never blocks)."""
        return self._stager._chunk_ready(self._state, self._base // self.chunk_bytes + index)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._nbytes:
            raise ValueError(f"bytes [{offset}, {offset + length}) are outside {self.label!r} of {self._nbytes} bytes")

    def _open(self, position: int, stop: int) -> tuple[int, memoryview]:
        """``(chunk index, view of bytes [position, min(stop, chunk end)))``, in value coordinates."""
        start = self._base + position
        index = start // self.chunk_bytes
        chunk = self._state.chunks[index]
        try:
            view = self._stager._open_chunk(self._state, index)
        except DeviceCopyError as exc:
            if self._label is None or self._label == self._state.label:
                raise
            raise DeviceCopyError(f"copying {self._label!r} from the device failed: {exc}") from exc
        end = min(self._base + stop, chunk.stop)
        return index, view[start - chunk.start : end - chunk.start]

    def _close(self, index: int, nbytes: int) -> None:
        with self._stager._lock:  # windows of one pack are read from several writer threads
            self._read += nbytes
            self._stager._close_chunk(self._state, index, nbytes)

    def read_into(self, offset: int, out) -> None:
        """Copy bytes ``[offset, offset + len(out))`` of the value into the writable buffer ``out``.

        Blocks until those bytes are on the host. Raises :class:`DeviceCopyError` when a copy
        failed, ``ValueError`` for a range outside the value, and ``RuntimeError`` for bytes
        already read or a closed capture.
        """
        target = memoryview(out).cast("B")
        if target.readonly:
            raise ValueError("read_into needs a writable buffer")
        end = offset + len(target)
        self._check_range(offset, len(target))
        position = offset
        while position < end:
            index, view = self._open(position, end)
            try:
                target[position - offset : position - offset + len(view)] = view
            finally:
                self._close(index, len(view))
            position += len(view)

    def acquire(self, offset: int, length: int) -> memoryview:
        """A zero-copy view of bytes ``[offset, offset + n)``, ``0 < n <= length``, once on the host.

        ``n`` stops at the end of the pinned chunk holding ``offset``, so a view never spans two
        buffers. The view stays valid until :meth:`release` is called with ``(offset, n)``; the
        bytes then count as read. Blocks until the chunk has arrived; raises like :meth:`read_into`.
        """
        if length <= 0:
            raise ValueError(f"acquire needs a positive length, got {length}")
        self._check_range(offset, length)
        return self._open(offset, offset + length)[1]

    def wait(self, offset: int, length: int) -> None:
        """Block until the chunks holding bytes ``[offset, offset + length)`` are on the host.

        Reads nothing: lets a reader wait for the device *before* taking a lock that others need,
        so that its :meth:`acquire` under the lock returns at once. Never raises (a failed copy is
        reported by the read).
        """
        position, end = max(offset, 0), min(offset + length, self._nbytes)
        while position < end:
            index = (self._base + position) // self.chunk_bytes
            self._stager._wait_chunk(self._state, index)
            position = self._state.chunks[index].stop - self._base

    def release(self, offset: int, nbytes: int) -> None:
        """End the use of a view from :meth:`acquire`; its buffer returns once its chunk is all read."""
        self._close((self._base + offset) // self.chunk_bytes, nbytes)

    def host_bytes(self, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` in a new host buffer (``read_into`` without bringing your own)."""
        buffer = bytearray(max(0, stop - start))
        self.read_into(start, buffer)
        return memoryview(buffer)

    def chunks(self) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(byte_offset, view)`` per chunk, in order, each as soon as it is on the host.

        A view is valid until the iterator advances (its buffer then goes back to the pool).
        """
        position = 0
        while position < self._nbytes:
            index, view = self._open(position, self._nbytes)
            try:
                yield position, view
            finally:
                self._close(index, len(view))
            position += len(view)

    def prefetch(self) -> None:
        """Start bringing captured chunks to the host now rather than at the first read."""
        self._stager.prefetch()

    def close(self) -> None:
        """Give back pinned buffers and device memory now (unread bytes are dropped)."""
        self._finalizer()


# =============================================================================================
# The stager


class Stager:
    """Pinned buffers, copy streams and the capture/upload logic of one device.

    Parameters
    ----------
    backend:
        The device.
    pinned_bytes:
        Most page-locked host memory held at once (the pool's capacity). Saves pass their staging
        budget through :meth:`set_pinned_bytes`.
    chunk_bytes:
        Size of one pinned buffer and of one copy.
    safety_factor:
        A device copy is made only while free device memory is at least this many times the bytes
        copied so far in the save (``math.inf`` never makes one).
    pack_bytes:
        C-contiguous arrays of at most this many bytes are gathered into one packed device copy
        per save by a single kernel (``0`` copies each on its own).
    """

    def __init__(
        self,
        backend: DeviceBackend,
        *,
        pinned_bytes: int = DEFAULT_PINNED_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        safety_factor: float = DEFAULT_SAFETY_FACTOR,
        pack_bytes: int = DEFAULT_PACK_BYTES,
    ) -> None:
        if type(chunk_bytes) is not int or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        if type(pinned_bytes) is not int or pinned_bytes <= 0:
            raise ValueError(f"pinned_bytes must be a positive int, got {pinned_bytes!r}")
        if not safety_factor >= 1:
            raise ValueError(f"safety_factor must be at least 1, got {safety_factor!r}")
        self.backend = backend
        self._configured_chunk_bytes = chunk_bytes
        self.chunk_bytes = min(chunk_bytes, pinned_bytes)
        self.safety_factor = float(safety_factor)
        if type(pack_bytes) is not int or pack_bytes < 0:
            raise ValueError(f"pack_bytes must be a non-negative int, got {pack_bytes!r}")
        self.pack_bytes = pack_bytes
        self.pool = PinnedPool(backend, buffer_bytes=self.chunk_bytes, capacity_bytes=pinned_bytes)
        self._lock = threading.RLock()
        self._d2h = backend.new_stream()
        self._h2d = backend.new_stream()
        self._prefetch_queue: collections.deque[_CaptureState] = collections.deque()
        self._prefetched: list[tuple[_CaptureState, _Chunk]] = []
        self._graveyard: list[tuple[Any, Any]] = []
        self._old_pools: list[PinnedPool] = []
        self._closed = False
        self.stats: collections.Counter = collections.Counter()

    def __repr__(self) -> str:
        return f"<Stager {self.backend!r} pinned={self.pool.capacity_bytes} chunk={self.chunk_bytes}>"

    @property
    def copy_stream(self):
        """The stream device-to-host copies run on."""
        return self._d2h

    @property
    def upload_stream(self):
        """The stream host-to-device copies run on."""
        return self._h2d

    def set_pinned_bytes(self, nbytes: int) -> None:
        """Change the pool's capacity (buffers above it are freed as they come back).

        Below one chunk, chunks shrink to ``nbytes`` so that the pool stays within it (a new pool
        replaces the old one, whose buffers are freed as they come back).
        """
        if type(nbytes) is not int or nbytes <= 0:
            raise ValueError(f"pinned_bytes must be a positive int, got {nbytes!r}")
        with self._lock:
            chunk_bytes = min(self._configured_chunk_bytes, nbytes)
            if chunk_bytes == self.chunk_bytes:
                self.pool.capacity_bytes = nbytes
                return
            self.pool.retire()
            self._old_pools.append(self.pool)  # busy buffers come back to it and are freed then
            self.chunk_bytes = chunk_bytes
            self.pool = PinnedPool(self.backend, buffer_bytes=chunk_bytes, capacity_bytes=nbytes)

    def warm_up(self) -> None:
        """Allocate the whole pinned pool now, so the first save does not pay for it."""
        with self._lock:
            buffers = self.pool.try_reserve(self.pool.free_buffers) or []
            for buffer in buffers:
                buffer.owner.release(buffer, buffer.pending)

    def close(self) -> None:
        """Wait for copies still referencing memory, then drop every pooled buffer."""
        with self._lock:
            self._closed = True
            graveyard, self._graveyard = self._graveyard, []
            for pool in [self.pool, *self._old_pools]:
                graveyard.extend(pool.graveyard)
                pool.graveyard = []
            self._prefetch_queue.clear()
        for event, _ in graveyard:
            with contextlib.suppress(Exception):
                self.backend.synchronize_event(event)

    # ------------------------------------------------------------------ saving
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
        with self._lock:
            if self._closed:
                raise RuntimeError("the stager is closed")
            self._collect()
            stream = backend.current_stream()
            total = sum(int(array.nbytes) for array in arrays)
            free = backend.mem_info()[0] if total else 0
            copied = 0
            plans: list[tuple[str, Any, list[PinnedBuffer] | None]] = []
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
                    buffers = self.pool.try_reserve(self._count_chunks(nbytes))
                    plans.append((HOST_COPY, array, None) if buffers is None else (STREAM_WAIT, array, buffers))
            except BaseException:
                for _, _, buffers in plans:
                    for buffer in buffers or ():
                        buffer.owner.release(buffer, buffer.pending)
                if packed_state is not None:  # nobody will read it: free its device copy once made
                    backend.wait_event(self._d2h, backend.record_event(stream))
                    self._retire(packed_state)
                raise
            # Everything below is ordered after the pending work and after the device copies.
            backend.wait_event(self._d2h, backend.record_event(stream))
            states: list[_CaptureState] = []
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
                        backend.d2h_async(source, 0, host, self._d2h)
                        syncs.append((backend.record_event(self._d2h), source))
                        self.stats["host_copies"] += 1
                    state = _CaptureState(label, policy, host, nbytes, self.chunk_bytes)
                elif policy == STREAM_WAIT:
                    state = _CaptureState(label, policy, source, nbytes, self.chunk_bytes)
                    for chunk, buffer in zip(state.chunks, buffers):
                        self._fetch(state, chunk, buffer)
                    waits = True
                    self.stats["stream_waits"] += 1
                else:
                    state = _CaptureState(label, policy, source, nbytes, self.chunk_bytes)
                    self._prefetch_queue.append(state)
                    self.stats["device_copies"] += 1
                states.append(state)
            if waits:
                # Later training work waits, on the device, until these copies have read the arrays.
                backend.wait_event(stream, backend.record_event(self._d2h))
            # device_copy chunks are prefetched from the first read on (by the writer, not here:
            # enqueuing dozens of copies would lengthen the save's stall for nothing).
        captures = []
        for index, (state, array, label) in enumerate(zip(states, arrays, labels)):
            dtype, shape = np.dtype(array.dtype), tuple(int(d) for d in array.shape)
            if index in offsets:
                captures.append(DeviceCapture(self, state, dtype, shape, base=offsets[index],
                                              nbytes=int(array.nbytes), label=label))
            else:
                captures.append(DeviceCapture(self, state, dtype, shape))
        for event, _ in syncs:  # host_copy only: the documented last resort
            try:
                backend.synchronize_event(event)
            except BaseException as exc:
                for capture in captures:
                    capture.close()
                raise DeviceCopyError(f"copying {len(syncs)} array(s) from the device failed: {exc}") from exc
        return captures

    def stage_pack(self, plan: "PackPlan") -> DeviceCapture | None:
        """Capture every array of ``plan`` with one gather into a packed device copy.

        The capture holds the arrays' bytes at ``plan.offsets``, ordered like :meth:`stage`.
        ``None`` when the device lacks the memory for the copy: capture them with :meth:`stage`.
        """
        backend = self.backend
        with self._lock:
            if self._closed:
                raise RuntimeError("the stager is closed")
            self._collect()
            stream = backend.current_stream()
            state = self._gather(plan, stream, backend.mem_info()[0])
            if state is None:
                return None
            backend.wait_event(self._d2h, backend.record_event(stream))
        return DeviceCapture(self, state, np.dtype(np.uint8), (plan.nbytes,), label=plan.label)

    def prefetch(self) -> None:
        """Start copying captured chunks into free pinned buffers now, instead of at the first read."""
        with self._lock:
            self._pump()

    def _pack(self, arrays: Sequence[Any], stream: Any, free: int) -> tuple[_CaptureState | None, dict[int, int]]:
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

    def _gather(self, plan: "PackPlan", stream: Any, free: int) -> _CaptureState | None:
        """Enqueue ``plan``'s gather on ``stream`` and queue its chunks for prefetching. Caller holds the lock."""
        if plan.nbytes * self.safety_factor > free:
            return None
        try:
            packed = self.backend.gather_on_stream(plan.table(self.backend, stream), plan.nbytes, stream)
        except MemoryError:  # cupy.cuda.memory.OutOfMemoryError is a MemoryError
            return None
        # The gather reads the table and the arrays on the device: they stay alive with the packed
        # copy, whose retirement waits for the copies to the host ordered after the gather.
        state = _CaptureState(plan.label, DEVICE_COPY, packed, plan.nbytes, self.chunk_bytes)
        state.keepalive = plan.table(self.backend, stream)
        for start, stop in plan.padding:  # alignment gaps: never read, so counted as read now
            self._mark_read(state, start, stop)
        self._prefetch_queue.append(state)
        self.stats["device_copies"] += 1
        self.stats["packed_arrays"] += len(plan.arrays)
        return state

    @staticmethod
    def _mark_read(state: _CaptureState, start: int, stop: int) -> None:
        for chunk in state.chunks[start // state.chunk_bytes : (stop - 1) // state.chunk_bytes + 1]:
            chunk.read_bytes += min(stop, chunk.stop) - max(start, chunk.start)
            if chunk.read_bytes >= chunk.length:  # a chunk smaller than the alignment, all padding
                chunk.consumed = True
                state.remaining -= 1

    def _count_chunks(self, nbytes: int) -> int:
        return math.ceil(nbytes / self.chunk_bytes)

    def _try_copy(self, array, stream):
        try:
            return self.backend.copy_on_stream(array, stream)
        except MemoryError:  # cupy.cuda.memory.OutOfMemoryError is a MemoryError
            return None

    def _fetch(self, state: _CaptureState, chunk: _Chunk, buffer: PinnedBuffer) -> None:
        """Enqueue the copy of ``chunk`` into ``buffer`` on the copy stream. Caller holds the lock."""
        if buffer.pending is not None:
            self.backend.wait_event(self._d2h, buffer.pending)  # its last copy finishes first
            buffer.pending = None
        self.backend.d2h_async(state.source, chunk.start, buffer.array[: chunk.length], self._d2h)
        chunk.buffer = buffer
        chunk.event = self.backend.record_event(self._d2h)
        chunk.arrived = False

    def _pump(self) -> None:
        """Prefetch ``device_copy`` chunks, in capture order, into buffers that are free now."""
        if len(self._prefetched) > 2 * self.pool.max_buffers + 16:  # forget chunks read or dropped since
            self._prefetched = [(state, chunk) for state, chunk in self._prefetched
                                if chunk.prefetched and chunk.buffer is not None and not state.closed]
        while self._prefetch_queue:
            state = self._prefetch_queue[0]
            if (state.closed or state.next_prefetch >= len(state.chunks)
                    or state.chunk_bytes > self.pool.buffer_bytes):  # made before the chunks shrank: read on demand
                self._prefetch_queue.popleft()
                continue
            chunk = state.chunks[state.next_prefetch]
            if chunk.buffer is not None or chunk.consumed or chunk.readers:
                state.next_prefetch += 1
                continue
            buffer = self._buffer_for(chunk.length, evict=False)
            if buffer is None:
                return
            self._fetch(state, chunk, buffer)
            chunk.prefetched = True
            self._prefetched.append((state, chunk))
            state.next_prefetch += 1
            self.stats["prefetched"] += 1

    def _buffer_for(self, nbytes: int, *, evict: bool) -> PinnedBuffer | None:
        """A pinned buffer of at least ``nbytes`` available now (evicting a prefetch if allowed)."""
        buffer = self.pool.try_acquire() or (self._evict() if evict else None)
        if buffer is not None and buffer.array.nbytes < nbytes:  # from a pool shrunk since
            buffer.owner.release(buffer, buffer.pending)
            return None
        return buffer

    def _evict(self) -> PinnedBuffer | None:
        """Take the buffer of the most recently prefetched chunk nobody has started reading."""
        while self._prefetched:
            state, chunk = self._prefetched.pop()
            if not chunk.prefetched or chunk.buffer is None or chunk.readers or chunk.read_bytes:
                continue
            buffer = chunk.buffer
            buffer.pending = chunk.event
            chunk.buffer, chunk.event, chunk.prefetched = None, None, False
            self.stats["evictions"] += 1
            return buffer
        return None

    def _chunk_ready(self, state: _CaptureState, index: int) -> bool:
        with self._lock:
            chunk = state.chunks[index]
            if state.policy == HOST_COPY or chunk.consumed:
                return True
            return chunk.event is not None and self.backend.event_done(chunk.event)

    def _open_chunk(self, state: _CaptureState, index: int) -> memoryview:
        """A host view of chunk ``index`` once it has arrived; pair with :meth:`_close_chunk`."""
        direct = None
        with self._lock:
            chunk = state.chunks[index]
            if chunk.consumed:
                raise RuntimeError(f"bytes [{chunk.start}, {chunk.stop}) of {state.label!r} were already read")
            if state.closed:
                raise RuntimeError(f"the capture of {state.label!r} is closed")
            if state.policy == HOST_COPY:
                chunk.readers += 1
                return memoryview(state.source)[chunk.start : chunk.stop]
            if chunk.buffer is None:
                buffer = self._buffer_for(chunk.length, evict=True)
                if buffer is not None:
                    self._fetch(state, chunk, buffer)
                else:  # the pool is all in use: copy through a private buffer instead of waiting
                    direct = np.empty(chunk.length, dtype=np.uint8)
                    self.backend.d2h_async(state.source, chunk.start, direct, self._d2h)
                    event = self.backend.record_event(self._d2h)
                    self.stats["direct_reads"] += 1
            chunk.prefetched = False
            chunk.readers += 1
            if direct is None:
                event = None if chunk.arrived else chunk.event
                view = memoryview(chunk.buffer.array)[: chunk.length]
            else:
                view = memoryview(direct)
            self._pump()
        if event is None:  # an earlier read of this chunk already waited for it
            return view
        try:
            self.backend.synchronize_event(event)
        except BaseException as exc:
            with self._lock:
                chunk.readers -= 1
                self._release_chunk(state, chunk)  # the capture may have been closed meanwhile
            raise DeviceCopyError(
                f"copying bytes [{chunk.start}, {chunk.stop}) of {state.label!r} from the device failed: {exc}"
            ) from exc
        if direct is None:
            with self._lock:
                if chunk.event is event:
                    chunk.arrived = True
        return view

    def _wait_chunk(self, state: _CaptureState, index: int) -> None:
        """Wait, without reading, until chunk ``index`` is on the host (fetching it if a buffer is free)."""
        with self._lock:
            chunk = state.chunks[index]
            if state.closed or state.policy == HOST_COPY or chunk.consumed or chunk.arrived:
                return
            if chunk.buffer is None:
                buffer = self._buffer_for(chunk.length, evict=False)
                if buffer is None:
                    return  # the read will copy it through a private buffer
                self._fetch(state, chunk, buffer)
                chunk.prefetched = True
                self._prefetched.append((state, chunk))
            event = chunk.event
        try:
            self.backend.synchronize_event(event)
        except Exception:
            return  # the read raises it, naming the bytes
        with self._lock:
            if chunk.event is event:
                chunk.arrived = True

    def _close_chunk(self, state: _CaptureState, index: int, nbytes: int) -> None:
        with self._lock:
            chunk = state.chunks[index]
            chunk.readers -= 1
            chunk.read_bytes += nbytes
            newly_consumed = not chunk.consumed and chunk.read_bytes >= chunk.length
            if newly_consumed:
                chunk.consumed = True
                state.remaining -= 1
            self._release_chunk(state, chunk)
            if newly_consumed:
                if state.remaining == 0:
                    self._retire(state)
                self._pump()

    def _release_chunk(self, state: _CaptureState, chunk: _Chunk) -> None:
        """Give ``chunk``'s buffer back once nobody reads it and it is consumed or abandoned."""
        if chunk.buffer is None or chunk.readers or not (chunk.consumed or state.closed):
            return
        chunk.buffer.owner.release(chunk.buffer, None if chunk.consumed else chunk.event)
        chunk.buffer, chunk.event = None, None

    def _retire(self, state: _CaptureState) -> None:
        """Drop the state's source once no copy can still be reading it. Caller holds the lock."""
        state.closed = True
        source, state.source = state.source, None
        keepalive, state.keepalive = state.keepalive, None
        if state.policy != HOST_COPY and source is not None:
            self._graveyard.append((self.backend.record_event(self._d2h), (source, keepalive)))
        self._collect()

    def _close_state(self, state: _CaptureState) -> None:
        with self._lock:
            state.users -= 1
            if state.closed or state.users > 0:
                return
            state.closed = True
            for chunk in state.chunks:
                self._release_chunk(state, chunk)
            self._retire(state)
            self._pump()

    def collect(self) -> None:
        """Free device copies and private buffers whose last copy has finished.

        Also done by every :meth:`stage` and :meth:`upload` and whenever a capture is used up.
        """
        with self._lock:
            self._collect()

    def _collect(self) -> None:
        if self._graveyard:
            self._graveyard = [(event, obj) for event, obj in self._graveyard if not self.backend.event_done(event)]
        for pool in [self.pool, *self._old_pools]:
            pool.collect()
        self._old_pools = [pool for pool in self._old_pools if pool.graveyard or pool.allocated_bytes > 0]

    # ------------------------------------------------------------------ restoring
    def upload(self, host: Any, target: Any) -> None:
        """Copy the host array ``host`` into the device array ``target`` through pinned buffers.

        The copies are ordered after the work pending on the current stream and before the work
        enqueued on it later. ``host`` is cast to ``target``'s dtype and must have its size.
        """
        backend = self.backend
        target = backend.adopt(target)
        dtype = np.dtype(target.dtype)
        source = np.ascontiguousarray(host, dtype=dtype)
        if source.size != int(np.prod(target.shape, dtype=np.int64)):
            raise ValueError(f"cannot upload a value of shape {source.shape} into an array of shape {tuple(target.shape)}")
        flat = source.reshape(-1).view(np.uint8)  # C-contiguous: ascontiguousarray
        contiguous = backend.is_c_contiguous(target)
        destination = target if contiguous else backend.empty(tuple(target.shape), dtype)
        stream = self.begin_uploads()
        start = 0
        while start < flat.nbytes:
            piece = flat[start : start + self.chunk_bytes]
            buffer = self.take_upload_buffer(piece.nbytes)
            if buffer is None:  # every pinned buffer is busy: upload from a private copy
                self.upload_window(piece.copy(), [(0, piece.nbytes, destination, start)])
            else:
                self.wait_for_buffer(buffer)
                buffer.array[: piece.nbytes] = piece
                self.upload_window(buffer, [(0, piece.nbytes, destination, start)])
            start += piece.nbytes
        if not contiguous:
            backend.wait_event(stream, backend.record_event(self._h2d))
            backend.assign_on_stream(target, destination, stream)
            return
        self.end_uploads(stream)

    def download(self, array: Any) -> np.ndarray:
        """A host copy of ``array`` after the current stream's pending work (waits for it)."""
        backend = self.backend
        array = backend.adopt(array)
        stream = backend.current_stream()
        source = array if backend.is_c_contiguous(array) else backend.copy_on_stream(array, stream)
        out = np.empty(tuple(int(d) for d in array.shape), dtype=np.dtype(array.dtype))
        flat = out.reshape(-1).view(np.uint8)
        if flat.nbytes:
            backend.d2h_async(source, 0, flat, stream)
            backend.synchronize_event(backend.record_event(stream))
        return out

    # ------------------------------------------------------------------ uploads window by window
    # The primitives of ``upload`` and of restores that read from storage straight into pinned
    # buffers (``CheckpointReader.read_many`` with device destinations): begin, then per window
    # take a buffer, fill it, upload it (which gives the buffer back), then end.

    def begin_uploads(self) -> Any:
        """Order the uploads enqueued from now on after the work pending on the current stream.

        Call it in the thread whose current stream the targets are used on (CuPy's current stream
        is per thread); pass what it returns (that stream) to :meth:`end_uploads`. Never waits.
        """
        backend = self.backend
        stream = backend.current_stream()
        with self._lock:
            if self._closed:
                raise RuntimeError("the stager is closed")
            self._collect()
            backend.wait_event(self._h2d, backend.record_event(stream))
        return stream

    def take_upload_buffer(self, min_bytes: int = 1) -> PinnedBuffer | None:
        """A pinned buffer of at least ``min_bytes`` for one window, now; ``None`` if none is free.

        Never waits: ``None`` when every buffer is held (by readers of captures, or by other
        windows being filled), and the caller then uploads from a private pageable buffer instead
        of waiting for one. The buffer may still be read by its last copy (``buffer.pending``):
        call :meth:`wait_for_buffer` (it blocks: off the event loop) or poll :meth:`buffer_idle`
        before writing into it. Give it back through :meth:`upload_window`.
        """
        with self._lock:
            return self._buffer_for(min_bytes, evict=True)

    def buffer_idle(self, buffer: PinnedBuffer) -> bool:
        """Whether no copy still reads ``buffer`` (never blocks)."""
        return buffer.pending is None or self.backend.event_done(buffer.pending)

    def wait_for_buffer(self, buffer: PinnedBuffer) -> None:
        """Block until no copy still reads ``buffer``, so that the host may overwrite it."""
        if buffer.pending is not None:
            # A failure of that earlier copy belongs to whoever made it; the buffer is free either way.
            with contextlib.suppress(Exception):
                self.backend.synchronize_event(buffer.pending)
            buffer.pending = None

    def upload_window(self, source: PinnedBuffer | np.ndarray, pieces: Sequence[tuple[int, int, Any, int]]) -> None:
        """Enqueue the uploads of one window and let go of its buffer.

        ``pieces`` are ``(source_offset, nbytes, target, target_offset)``: bytes of ``source`` to
        copy into the C-contiguous device array ``target`` (the backend's own array) at byte
        ``target_offset``, on :attr:`upload_stream`. ``source`` is a buffer from
        :meth:`take_upload_buffer`, which goes back to the pool with the copies' event as its
        ``pending``, or a private ``uint8`` host array, kept alive until the copies are done
        (copying from pageable memory may block the calling thread: keep it off the event loop).
        Empty ``pieces`` just give the buffer back.
        """
        backend = self.backend
        pinned = isinstance(source, PinnedBuffer)
        host = source.array if pinned else source
        for offset, nbytes, target, target_offset in pieces:
            if nbytes:
                backend.h2d_async(host[offset : offset + nbytes], target, target_offset, self._h2d)
        event = backend.record_event(self._h2d) if pieces else None
        with self._lock:
            if pinned:
                source.owner.release(source, event)
                if pieces:
                    self.stats["uploaded_chunks"] += 1
            elif pieces:
                self._graveyard.append((event, host))
                self.stats["direct_uploads"] += 1

    def end_uploads(self, stream: Any) -> None:
        """Make later work on ``stream`` (from :meth:`begin_uploads`) wait, on the device, for the uploads."""
        self.backend.wait_event(stream, self.backend.record_event(self._h2d))


# =============================================================================================
# Capture plans: what a save structure's device arrays need, made once


class CapturePlan:
    """How the device arrays of one save structure are captured; reusable while they are the same objects.

    Small C-contiguous arrays of each device are gathered by one launch (a :class:`PackPlan`, whose
    table is made once); the others are staged one by one. So :meth:`capture`, run at every save,
    costs a few calls whatever the number of small arrays. ``backend`` overrides the CuPy backend
    of each array's device (tests pass a :class:`FakeDeviceBackend`).
    """

    def __init__(self, arrays: Sequence[Any], labels: Sequence[str], backend: DeviceBackend | None = None) -> None:
        if len(labels) != len(arrays):
            raise ValueError(f"got {len(labels)} labels for {len(arrays)} arrays")
        self.arrays = tuple(arrays)
        groups: dict[int, tuple[DeviceBackend, list[int]]] = {}
        for index, array in enumerate(self.arrays):
            owner = backend if backend is not None else backend_for(array)
            groups.setdefault(id(owner), (owner, []))[1].append(index)
        # Per device: (stager, pack or None, packed indices, other indices, other arrays, their labels)
        self._groups: list[tuple[Stager, PackPlan | None, list[int], list[int], list[Any], list[str]]] = []
        for owner, indices in groups.values():
            stager = stager_for(owner)
            adopted = {i: owner.adopt(self.arrays[i]) for i in indices}
            small = [i for i in indices if 0 < int(adopted[i].nbytes) <= stager.pack_bytes
                     and owner.is_c_contiguous(adopted[i])]
            if len(small) < 2:
                small = []
            packed = set(small)
            others = [i for i in indices if i not in packed]
            pack = None
            if small:
                names = ", ".join(labels[i] for i in small[:3])
                pack = PackPlan([adopted[i] for i in small], label=f"{len(small)} packed arrays ({names}, ...)")
            self._groups.append((stager, pack, small, others, [adopted[i] for i in others], [labels[i] for i in others]))
        self._labels = tuple(labels)
        self.slots = self._slots([True] * len(self._groups))

    def matches(self, arrays: Sequence[Any]) -> bool:
        """Whether ``arrays`` are exactly the plan's array objects, in order."""
        return len(arrays) == len(self.arrays) and all(map(operator.is_, arrays, self.arrays))

    def _slots(self, packed_ok: Sequence[bool]) -> tuple[tuple[int, int], ...]:
        slots: list[tuple[int, int]] = [(0, 0)] * len(self.arrays)
        position = 0
        for (_, pack, small, others, _, _), ok in zip(self._groups, packed_ok):
            if pack is not None and ok:
                for index, offset in zip(small, pack.offsets):
                    slots[index] = (position, offset)
                position += 1
            else:
                for index in small:
                    slots[index] = (position, 0)
                    position += 1
            for index in others:
                slots[index] = (position, 0)
                position += 1
        return tuple(slots)

    def capture(self, pinned_bytes: int | None = None) -> tuple[list[DeviceCapture], tuple[tuple[int, int], ...]]:
        """Stage every array now: ``(captures, slots)``, array ``i`` at byte ``slots[i][1]`` of ``captures[slots[i][0]]``.

        Ordered like :meth:`Stager.stage`; ``pinned_bytes`` sets each stager's pool capacity.
        """
        captures: list[DeviceCapture] = []
        packed_ok = []
        try:
            for stager, pack, small, _, other_arrays, other_labels in self._groups:
                if pinned_bytes is not None:
                    stager.set_pinned_bytes(pinned_bytes)
                if pack is not None:
                    packed = stager.stage_pack(pack)
                    packed_ok.append(packed is not None)
                    if packed is not None:
                        captures.append(packed)
                    else:  # no device memory for the pack this time: the per-array policies
                        captures.extend(stager.stage(pack.arrays, labels=[self._labels[i] for i in small]))
                else:
                    packed_ok.append(True)
                if other_arrays:
                    captures.extend(stager.stage(other_arrays, labels=other_labels))
        except BaseException:
            for capture in captures:
                capture.close()
            raise
        slots = self.slots if all(packed_ok) else self._slots(packed_ok)
        return captures, slots


# =============================================================================================
# Entry points

_stagers_lock = threading.Lock()


def stager_for(backend: DeviceBackend) -> Stager:
    """The stager owned by ``backend`` (created on first use with the default sizes)."""
    stager = getattr(backend, "_asyncckpt_stager", None)
    if stager is None:
        with _stagers_lock:
            stager = getattr(backend, "_asyncckpt_stager", None)
            if stager is None:
                stager = Stager(backend)
                backend._asyncckpt_stager = stager
    return stager


def stage_device_arrays(
    backend: DeviceBackend,
    arrays: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    pinned_bytes: int | None = None,
) -> list[DeviceCapture]:
    """Capture ``arrays`` of one device for saving; see :meth:`Stager.stage`.

    ``pinned_bytes`` (the save's staging budget) sets the pool's capacity for this and later saves.
    """
    stager = stager_for(backend)
    if pinned_bytes is not None:
        stager.set_pinned_bytes(pinned_bytes)
    return stager.stage(arrays, labels=labels)


def snapshot_device_arrays(
    arrays: Sequence[Any], *, labels: Sequence[str] | None = None, pinned_bytes: int | None = None
) -> list[DeviceCapture]:
    """:func:`stage_device_arrays` for CuPy or foreign GPU arrays, possibly on several devices.

    The entry point for the snapshot stage: one call per save, with every device array of it.
    """
    labels = [f"array {i}" for i in range(len(arrays))] if labels is None else list(labels)
    groups: dict[int, list[int]] = {}
    backends: dict[int, CupyBackend] = {}
    for index, array in enumerate(arrays):
        backend = backend_for(array)
        backends[backend.device_id] = backend
        groups.setdefault(backend.device_id, []).append(index)
    captures: list[DeviceCapture | None] = [None] * len(arrays)
    for device_id, indices in groups.items():
        staged = stage_device_arrays(
            backends[device_id], [arrays[i] for i in indices], labels=[labels[i] for i in indices], pinned_bytes=pinned_bytes
        )
        for index, capture in zip(indices, staged):
            captures[index] = capture
    return captures  # type: ignore[return-value]


def upload(backend: DeviceBackend, host_array: Any, device_target: Any) -> None:
    """Copy ``host_array`` into ``device_target`` asynchronously; see :meth:`Stager.upload`."""
    stager_for(backend).upload(host_array, device_target)


def download(backend: DeviceBackend, array: Any) -> np.ndarray:
    """A host copy of device ``array`` ordered after the current stream's work (blocks for it)."""
    return stager_for(backend).download(array)
