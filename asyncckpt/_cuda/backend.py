"""What the copy engine needs from a GPU, and the few names every part of it shares.

The engine never calls CuPy directly: it talks to a :class:`DeviceBackend`, so the same ordering
and pooling code runs on a real device (:class:`asyncckpt._cuda.cupy.CupyBackend`) and on the CPU
simulation the tests use. The errors and constants here are the engine's vocabulary.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "MiB",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_PINNED_BYTES",
    "DEFAULT_SAFETY_FACTOR",
    "DEFAULT_PACK_BYTES",
    "CapturePolicy",
    "DEVICE_COPY",
    "STREAM_WAIT",
    "HOST_COPY",
    "DeviceBackend",
    "DeviceCopyError",
    "HostSyncError",
    "is_cuda_array",
]

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 16 * MiB
DEFAULT_PINNED_BYTES = 256 * MiB
DEFAULT_SAFETY_FACTOR = 2.0
DEFAULT_PACK_BYTES = 1 << 20


class CapturePolicy(str, enum.Enum):
    """How a device array is captured at save time; docs/gpu.md weighs the costs of each.

    A ``str`` too, so a policy compares equal to its name and prints as it (``"device_copy"``).
    """

    #: A device-to-device copy on the training stream, read back to the host in the background.
    DEVICE_COPY = "device_copy"
    #: Copies into reserved pinned buffers that later training work waits for, on the device.
    STREAM_WAIT = "stream_wait"
    #: A copy to pageable host memory that the save waits for: the last resort.
    HOST_COPY = "host_copy"

    def __str__(self) -> str:
        return self.value


DEVICE_COPY = CapturePolicy.DEVICE_COPY
STREAM_WAIT = CapturePolicy.STREAM_WAIT
HOST_COPY = CapturePolicy.HOST_COPY

# DLPack device types whose memory is GPU memory (kDLCUDA, kDLCUDAManaged). kDLCUDAHost (3) is
# pinned *host* memory, readable by NumPy.
_DLPACK_CUDA_DEVICES = frozenset({2, 13})


class DeviceCopyError(RuntimeError):
    """A copy between host and device failed; names the array and the byte range."""


class HostSyncError(RuntimeError):
    """The host waited for the device inside a block where a test forbids it (``forbid_host_sync``)."""


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

