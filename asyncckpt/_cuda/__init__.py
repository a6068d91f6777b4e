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

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 16 * MiB
DEFAULT_PINNED_BYTES = 256 * MiB
DEFAULT_SAFETY_FACTOR = 2.0

DEVICE_COPY = "device_copy"
STREAM_WAIT = "stream_wait"
HOST_COPY = "host_copy"
_PACKED = "packed"  # a plan entry: the array is part of the save's packed device copy
DEFAULT_PACK_BYTES = 1 << 20

# DLPack device types whose memory is GPU memory (kDLCUDA, kDLCUDAManaged). kDLCUDAHost (3) is
# pinned *host* memory, readable by NumPy.
_DLPACK_CUDA_DEVICES = frozenset({2, 13})


class DeviceCopyError(RuntimeError):
    """A copy between host and device failed; names the array and the byte range."""


class HostSyncError(RuntimeError):
    """The host waited for the device where a test forbade it (the simulated device's ``forbid_host_sync``)."""


def is_cuda_array(value: Any) -> bool:
    """True for arrays in GPU memory: CuPy arrays and objects exposing CUDA memory by protocol.

    Recognised: CuPy arrays; ``__cuda_array_interface__`` (Numba, PyTorch CUDA tensors, JAX GPU
    arrays); ``__dlpack_device__`` reporting a CUDA device. NumPy arrays and CPU tensors are not.
    """
    if isinstance(value, (np.ndarray, np.generic)):
        return False
    if type(value).__module__.split(".")[0] == "cupy":
        return True
    try:
        if hasattr(value, "__cuda_array_interface__"):
            return True
    except Exception:  # raised by the property (PyTorch does for tensors that require grad)
        pass
    dlpack_device = getattr(value, "__dlpack_device__", None)
    if callable(dlpack_device):
        try:
            return int(dlpack_device()[0]) in _DLPACK_CUDA_DEVICES
        except Exception:
            return False
    return False


# =============================================================================================
# The backend protocol


@runtime_checkable
class DeviceBackend(Protocol):
    """What the staging code needs from one GPU. Streams and events are the backend's own objects.

    Copies take *byte offsets* into C-contiguous device arrays and NumPy ``uint8`` host arrays; a
    host array passed to an ``*_async`` copy must stay alive and unchanged until an event recorded
    after the copy is done.
    """

    device_id: int

    def is_device_array(self, value: Any) -> bool:
        """Whether ``value`` is an array this backend can copy from or into."""

    def adopt(self, value: Any) -> Any:
        """The backend's own array type viewing ``value``'s memory (no copy)."""

    def is_c_contiguous(self, array: Any) -> bool:
        """Whether ``array``'s bytes are one C-order run."""

    def current_stream(self) -> Any:
        """The calling thread's current stream: the one training work is enqueued on."""

    def new_stream(self) -> Any:
        """A new stream that does not synchronise implicitly with the others."""

    def record_event(self, stream: Any) -> Any:
        """A new event, recorded on ``stream`` after everything enqueued there so far."""

    def wait_event(self, stream: Any, event: Any) -> None:
        """Make later work on ``stream`` wait for ``event`` (on the device; the host does not wait)."""

    def event_done(self, event: Any) -> bool:
        """Whether ``event`` has completed (never blocks)."""

    def synchronize_event(self, event: Any) -> None:
        """Block the host until ``event`` completes; raise the error of a failed operation before it."""

    def copy_on_stream(self, array: Any, stream: Any) -> Any:
        """A new C-contiguous copy of ``array``, enqueued on ``stream``."""

    def assign_on_stream(self, destination: Any, source: Any, stream: Any) -> None:
        """Enqueue ``destination[...] = source`` (device to device) on ``stream``."""

    def gather_table(self, arrays: Sequence[Any], offsets: Sequence[int], stream: Any) -> Any:
        """A reusable description of where each C-contiguous array goes in a packed buffer, made
        ready by work enqueued on ``stream`` (no host wait). Valid while the arrays live."""

    def gather_on_stream(self, table: Any, nbytes: int, stream: Any) -> Any:
        """A new ``uint8`` device array of ``nbytes`` holding the bytes ``table`` describes, filled
        by work enqueued on ``stream`` (one launch, whatever the number of arrays)."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A new uninitialised device array."""

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        """A page-locked host buffer as a NumPy ``uint8`` array of ``nbytes``."""

    def d2h_async(self, source: Any, offset: int, destination: np.ndarray, stream: Any) -> None:
        """Enqueue a copy of ``destination.nbytes`` bytes from ``source`` at byte ``offset``."""

    def h2d_async(self, source: np.ndarray, destination: Any, offset: int, stream: Any) -> None:
        """Enqueue a copy of ``source`` into ``destination`` at byte ``offset``."""

    def mem_info(self) -> tuple[int, int]:
        """``(free, total)`` device memory in bytes."""


# =============================================================================================
# CuPy


@functools.lru_cache(maxsize=None)
def cupy_backend(device_id: int) -> "CupyBackend":
    """The :class:`CupyBackend` of device ``device_id`` (one per device per process)."""
    return CupyBackend(device_id)


def backend_for(array: Any) -> "CupyBackend":
    """The CuPy backend of the device holding ``array`` (a CuPy array or a foreign GPU array)."""
    import cupy  # noqa: PLC0415 - optional dependency, imported on first use only

    if not isinstance(array, cupy.ndarray):
        array = CupyBackend.adopt_foreign(array)
    return cupy_backend(int(array.device.id))


_GATHER_SOURCE = r"""
extern "C" __global__ void gather_bytes(const unsigned long long* table, long long count, unsigned char* out) {
    // Block i copies array i: table holds count source pointers, then offsets, then sizes.
    const long long i = blockIdx.x;
    const unsigned char* src = (const unsigned char*)table[i];
    unsigned char* dst = out + table[count + i];
    const unsigned long long n = table[2 * count + i];
    unsigned long long done = 0;
    if ((((unsigned long long)src | (unsigned long long)dst) & 7) == 0) {
        const unsigned long long words = n / 8;
        const unsigned long long* s = (const unsigned long long*)src;
        unsigned long long* d = (unsigned long long*)dst;
        for (unsigned long long w = threadIdx.x; w < words; w += blockDim.x) d[w] = s[w];
        done = words * 8;
    }
    for (unsigned long long b = done + threadIdx.x; b < n; b += blockDim.x) dst[b] = src[b];
}
"""


@functools.lru_cache(maxsize=None)
def _gather_kernel():
    """The packing kernel (compiled on first use; CuPy caches the binary on disk)."""
    import cupy  # noqa: PLC0415

    return cupy.RawKernel(_GATHER_SOURCE, "gather_bytes")


class CupyBackend:
    """A :class:`DeviceBackend` for one CUDA device, through CuPy.

    Raw copies use ``cupy.cuda.runtime.memcpyAsync`` so that they are asynchronous on every CuPy
    version (``ndarray.get(stream=...)`` became blocking by default in CuPy 13).
    """

    def __init__(self, device_id: int | None = None) -> None:
        import cupy  # noqa: PLC0415 - optional dependency, imported on first use only

        self._cupy = cupy
        self._runtime = cupy.cuda.runtime
        self.device_id = cupy.cuda.Device().id if device_id is None else int(device_id)
        self._device = cupy.cuda.Device(self.device_id)
        self._tables: list[tuple[Any, Any]] = []  # gather tables kept alive until their copy ran

    def __repr__(self) -> str:
        return f"<CupyBackend cuda:{self.device_id}>"

    @staticmethod
    def adopt_foreign(value: Any):
        """A CuPy view of a foreign GPU array: DLPack first (stream-ordered), else the CUDA array interface."""
        import cupy  # noqa: PLC0415

        if isinstance(value, cupy.ndarray):
            return value
        if getattr(value, "requires_grad", False) and callable(getattr(value, "detach", None)):
            value = value.detach()  # a PyTorch parameter: same memory, without the autograd record
        if callable(getattr(value, "__dlpack__", None)) and is_cuda_array(value):
            try:
                return cupy.from_dlpack(value)
            except Exception:
                if not hasattr(value, "__cuda_array_interface__"):
                    raise
        if hasattr(value, "__cuda_array_interface__"):
            # CAI v3: CuPy synchronises the producer's stream here (its documented default).
            return cupy.asarray(value)
        raise TypeError(f"{type(value).__name__} is not a GPU array (no DLPack CUDA export, no __cuda_array_interface__)")

    def is_device_array(self, value: Any) -> bool:
        return is_cuda_array(value)

    def adopt(self, value: Any):
        array = self.adopt_foreign(value)
        if int(array.device.id) != self.device_id:
            raise ValueError(f"the array lives on cuda:{array.device.id}, not on cuda:{self.device_id}")
        return array

    def is_c_contiguous(self, array: Any) -> bool:
        return bool(array.flags.c_contiguous)

    def current_stream(self):
        with self._device:
            return self._cupy.cuda.get_current_stream()

    def new_stream(self):
        with self._device:
            return self._cupy.cuda.Stream(non_blocking=True)

    def record_event(self, stream):
        with self._device:
            # block=True: a host waiting on it sleeps instead of spinning a core.
            event = self._cupy.cuda.Event(block=True, disable_timing=True)
            event.record(stream)
            return event

    def wait_event(self, stream, event) -> None:
        with self._device:
            stream.wait_event(event)

    def event_done(self, event) -> bool:
        return bool(event.done)

    def synchronize_event(self, event) -> None:
        event.synchronize()  # releases the GIL while waiting

    def copy_on_stream(self, array, stream):
        with self._device, stream:
            return array.copy(order="C")

    def assign_on_stream(self, destination, source, stream) -> None:
        with self._device, stream:
            destination[...] = source

    def gather_table(self, arrays, offsets, stream):
        cupy = self._cupy
        count = len(arrays)
        with self._device:
            self._tables = [(event, keep) for event, keep in self._tables if not event.done]
            # The table goes up from pinned memory, asynchronously: a copy from pageable memory
            # would wait for the work pending on the stream.
            host = np.frombuffer(cupy.cuda.alloc_pinned_memory(3 * count * 8), np.uint64, 3 * count)
            host[:count] = [array.data.ptr for array in arrays]
            host[count : 2 * count] = offsets
            host[2 * count :] = [array.nbytes for array in arrays]
            table = cupy.empty(3 * count, dtype=cupy.uint64)
            self._runtime.memcpyAsync(table.data.ptr, host.ctypes.data, host.nbytes,
                                      self._runtime.memcpyHostToDevice, stream.ptr)
            self._tables.append((self.record_event(stream), host))
        return table, count, tuple(arrays)  # the arrays stay alive as long as their pointers are used

    def gather_on_stream(self, table, nbytes: int, stream):
        device_table, count, _arrays = table
        with self._device:
            packed = self._cupy.empty(nbytes, dtype=self._cupy.uint8)
            with stream:
                _gather_kernel()((count,), (256,), (device_table, self._cupy.int64(count), packed))
        return packed

    def empty(self, shape, dtype):
        with self._device:
            return self._cupy.empty(shape, dtype=dtype)

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        memory = self._cupy.cuda.alloc_pinned_memory(max(nbytes, 1))
        return np.frombuffer(memory, dtype=np.uint8, count=nbytes)  # keeps ``memory`` alive

    def d2h_async(self, source, offset: int, destination: np.ndarray, stream) -> None:
        nbytes = destination.nbytes
        if nbytes:
            with self._device:
                self._runtime.memcpyAsync(
                    destination.ctypes.data, source.data.ptr + offset, nbytes, self._runtime.memcpyDeviceToHost, stream.ptr
                )

    def h2d_async(self, source: np.ndarray, destination, offset: int, stream) -> None:
        nbytes = source.nbytes
        if nbytes:
            with self._device:
                self._runtime.memcpyAsync(
                    destination.data.ptr + offset, source.ctypes.data, nbytes, self._runtime.memcpyHostToDevice, stream.ptr
                )

    def mem_info(self) -> tuple[int, int]:
        with self._device:
            free, total = self._runtime.memGetInfo()
        return int(free), int(total)


# =============================================================================================
# The pinned pool


class PinnedBuffer:
    """One pooled page-locked buffer. ``pending`` is the event of the last copy that used it."""

    __slots__ = ("array", "pending", "owner")

    def __init__(self, array: np.ndarray, owner: "PinnedPool") -> None:
        self.array = array
        self.pending: Any = None
        self.owner = owner


class PinnedPool:
    """Page-locked buffers of ``buffer_bytes`` each, never more than ``capacity_bytes`` allocated.

    Buffers are handed out oldest-released first, so a buffer whose copy is still running is
    reused last. A buffer comes back with ``pending`` set to the event of the copy that last used
    it: device-side users make their stream wait on it, host-side users wait for it.
    """

    def __init__(self, backend: DeviceBackend, *, buffer_bytes: int, capacity_bytes: int) -> None:
        if type(buffer_bytes) is not int or buffer_bytes <= 0:
            raise ValueError(f"buffer_bytes must be a positive int, got {buffer_bytes!r}")
        self._backend = backend
        self.buffer_bytes = buffer_bytes
        self.allocated_bytes = 0
        self._free: collections.deque[PinnedBuffer] = collections.deque()
        self._retired = False
        self._capacity = 0
        #: ``(event, memory)`` of dropped buffers a copy may still use: kept until the event is done.
        self.graveyard: list[tuple[Any, Any]] = []
        self.capacity_bytes = capacity_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        """At least one buffer. Lowering it drops free buffers now and busy ones when released."""
        if type(value) is not int or value <= 0:
            raise ValueError(f"the pinned pool capacity must be a positive int, got {value!r}")
        self._capacity = max(value, self.buffer_bytes)
        while self._free and self.allocated_bytes > self._capacity:
            self._drop(self._free.pop())

    @property
    def max_buffers(self) -> int:
        return self._capacity // self.buffer_bytes

    @property
    def free_buffers(self) -> int:
        """Buffers obtainable right now (free ones plus those that may still be allocated)."""
        return len(self._free) + max(0, self._capacity - self.allocated_bytes) // self.buffer_bytes

    def try_acquire(self) -> PinnedBuffer | None:
        """A buffer now, or ``None`` when all are in use. Not thread-safe: callers hold a lock."""
        if self._retired:
            return None
        if self._free:
            head = self._free[0]
            if head.pending is None or self.allocated_bytes + self.buffer_bytes > self._capacity:
                return self._free.popleft()  # a copy may still use it: the caller orders after it
            if self._backend.event_done(head.pending):
                head.pending = None
                return self._free.popleft()
        if self.allocated_bytes + self.buffer_bytes <= self._capacity:
            self.allocated_bytes += self.buffer_bytes
            try:
                return PinnedBuffer(self._backend.alloc_pinned(self.buffer_bytes), self)
            except BaseException:
                self.allocated_bytes -= self.buffer_bytes
                raise
        return None

    def try_reserve(self, count: int) -> list[PinnedBuffer] | None:
        """``count`` buffers at once, or none (``None``) if that many are not available now."""
        if count > self.free_buffers:
            return None
        buffers = []
        try:
            for _ in range(count):
                buffers.append(self.try_acquire())
        except BaseException:  # an allocation failed part way: give back what was taken
            for buffer in buffers:
                self.release(buffer, buffer.pending)
            raise
        return buffers

    def release(self, buffer: PinnedBuffer, pending: Any = None) -> None:
        """Return ``buffer``; ``pending`` is the event of a copy that may still be using it."""
        buffer.pending = pending
        if self._retired or self.allocated_bytes > self._capacity:
            self._drop(buffer)  # over a lowered capacity: let it go
            return
        self._free.append(buffer)

    def retire(self) -> None:
        """Free every idle buffer now and each busy one when it is released; hand out no more."""
        self._retired = True
        while self._free:
            self._drop(self._free.pop())

    def _drop(self, buffer: PinnedBuffer) -> None:
        """Stop counting ``buffer``; its memory lives on in the graveyard while a copy may use it."""
        self.allocated_bytes -= self.buffer_bytes
        if buffer.pending is not None and not self._backend.event_done(buffer.pending):
            self.graveyard.append((buffer.pending, buffer.array))

    def collect(self) -> None:
        """Free dropped buffers whose last copy has finished."""
        if self.graveyard:
            self.graveyard = [(event, memory) for event, memory in self.graveyard if not self._backend.event_done(event)]


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
