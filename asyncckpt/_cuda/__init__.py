"""The device copy engine: GPU arrays to the host for saves and back for restores, training unstalled.

Copies are enqueued on the caller's current stream or ordered after it with events, so a save
captures the values the pending work leaves and a restore is seen by the work that follows, and
the host waits for the device only as a last resort. Design: docs/gpu.md.

- :mod:`~asyncckpt._cuda.backend`: the :class:`DeviceBackend` protocol, errors, policies, sizes;
- :mod:`~asyncckpt._cuda.cupy`: the CuPy backend (the one module importing ``cupy``);
- :mod:`~asyncckpt._cuda.pinned`: the pool of page-locked buffers and one device's staging area;
- :mod:`~asyncckpt._cuda.capture`: saving, the capture policies and the packed copy of small arrays;
- :mod:`~asyncckpt._cuda.readback`: saving, bringing captured chunks to the host;
- :mod:`~asyncckpt._cuda.capture_plan`: a save structure's grouping, made once;
- :mod:`~asyncckpt._cuda.upload`: restoring, uploads through pinned windows;
- :mod:`~asyncckpt._cuda.stager`: one device's engine, the process's stagers and the entry points.

The names below are what the rest of the package uses (``_cuda.stager_for(backend)`` and so on).
"""

from __future__ import annotations

from asyncckpt._cuda.backend import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_PACK_BYTES,
    DEFAULT_PINNED_BYTES,
    DEFAULT_SAFETY_FACTOR,
    DEVICE_COPY,
    HOST_COPY,
    STREAM_WAIT,
    CapturePolicy,
    DeviceBackend,
    DeviceCopyError,
    HostSyncError,
    is_cuda_array,
)
from asyncckpt._cuda.capture import DeviceCapturer, PackPlan
from asyncckpt._cuda.capture_plan import CapturePlan
from asyncckpt._cuda.cupy import CupyBackend, CupyBackends, backend_for, cupy_backend
from asyncckpt._cuda.pinned import PinnedBuffer, PinnedPool, StagingArea
from asyncckpt._cuda.readback import CaptureReader, DeviceCapture
from asyncckpt._cuda.stager import (
    Stager,
    Stagers,
    download,
    snapshot_device_arrays,
    stage_device_arrays,
    stager_for,
    stagers,
    upload,
)
from asyncckpt._cuda.upload import DeviceUploader

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_PACK_BYTES",
    "DEFAULT_PINNED_BYTES",
    "DEFAULT_SAFETY_FACTOR",
    "CapturePolicy",
    "DEVICE_COPY",
    "STREAM_WAIT",
    "HOST_COPY",
    "DeviceBackend",
    "DeviceCopyError",
    "HostSyncError",
    "is_cuda_array",
    "CupyBackend",
    "CupyBackends",
    "cupy_backend",
    "backend_for",
    "PinnedBuffer",
    "PinnedPool",
    "StagingArea",
    "DeviceCapture",
    "CaptureReader",
    "PackPlan",
    "DeviceCapturer",
    "CapturePlan",
    "DeviceUploader",
    "Stager",
    "Stagers",
    "stagers",
    "stager_for",
    "stage_device_arrays",
    "snapshot_device_arrays",
    "upload",
    "download",
]
