"""The :class:`~asyncckpt._cuda.backend.DeviceBackend` of a CUDA device, through CuPy.

With :mod:`asyncckpt._arrays`, the only module that imports ``cupy``, and only on first use, so the
package imports and runs on machines without CuPy or a GPU. It also holds the one kernel the engine
compiles: the gather that packs many small arrays into one buffer with a single launch.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from asyncckpt._cuda.backend import is_cuda_array
from asyncckpt._runtime import process_state

__all__ = ["CupyBackend", "CupyBackends", "cupy_backend", "backend_for"]


class CupyBackends:
    """The process's CuPy backend of each device: one per device, so each device has one stager."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_device: dict[int, CupyBackend] = {}

    def for_device(self, device_id: int) -> "CupyBackend":
        """The backend of device ``device_id``, created on first use."""
        device_id = int(device_id)
        with self._lock:
            backend = self._by_device.get(device_id)
            if backend is None:
                backend = self._by_device[device_id] = CupyBackend(device_id)
            return backend


def cupy_backend(device_id: int) -> "CupyBackend":
    """The :class:`CupyBackend` of device ``device_id`` (one per device per process)."""
    return process_state().owned(CupyBackends).for_device(device_id)


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
        self._gather_kernel: Any = None  # compiled on first use (CuPy caches the binary on disk)

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
                self._gather()((count,), (256,), (device_table, self._cupy.int64(count), packed))
        return packed

    def _gather(self):
        """The packing kernel: block i copies array i of a gather table."""
        if self._gather_kernel is None:
            self._gather_kernel = self._cupy.RawKernel(_GATHER_SOURCE, "gather_bytes")
        return self._gather_kernel

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

