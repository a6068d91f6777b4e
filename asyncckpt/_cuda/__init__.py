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
