"""One device's copy engine, and the per-process entry points that find it.

:class:`Stager` is what callers hold per device: its capturer (saving) and its uploader (restoring)
share one pinned pool, so it composes the two over one :class:`~asyncckpt._cuda.pinned.StagingArea`
and offers both sides' calls. :func:`stager_for` gives each backend its one stager, from the
process's :class:`Stagers`; the module functions below are the entry points the rest of the
package calls.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncckpt._cuda.backend import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_PACK_BYTES,
    DEFAULT_PINNED_BYTES,
    DEFAULT_SAFETY_FACTOR,
    DeviceBackend,
)
from asyncckpt._cuda.capture import DeviceCapturer, PackPlan
from asyncckpt._cuda.cupy import CupyBackend, backend_for
from asyncckpt._cuda.pinned import PinnedBuffer, PinnedPool, StagingArea
from asyncckpt._cuda.readback import DeviceCapture
from asyncckpt._cuda.upload import DeviceUploader
from asyncckpt._runtime import process_state

__all__ = [
    "Stager",
    "Stagers",
    "stagers",
    "stager_for",
    "stage_device_arrays",
    "snapshot_device_arrays",
    "upload",
    "download",
]


class Stager:
    """One device's copy engine: its capturer and its uploader, sharing one pinned pool.

    A stager refers to its backend weakly, as the process's :class:`Stagers` hold one per backend
    for as long as the backend lives; its captures keep the backend alive until they are closed.

    Parameters
    ----------
    backend:
        The device; keep it alive while the stager is used.
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
        self.staging = StagingArea(backend, pinned_bytes=pinned_bytes, chunk_bytes=chunk_bytes)
        self.capturer = DeviceCapturer(self.staging, safety_factor=safety_factor, pack_bytes=pack_bytes)
        self.uploader = DeviceUploader(self.staging, reclaim=self.capturer.reader.evict)

    def __repr__(self) -> str:
        return f"<Stager {self.backend!r} pinned={self.pool.capacity_bytes} chunk={self.chunk_bytes}>"

    # ------------------------------------------------------------------ the device and its pool
    @property
    def backend(self) -> DeviceBackend:
        return self.staging.backend

    @property
    def pool(self) -> PinnedPool:
        """The pinned pool buffers come from now (replaced when the chunks shrink)."""
        return self.staging.pool

    @property
    def chunk_bytes(self) -> int:
        """Size of one pinned buffer and of one copy."""
        return self.staging.chunk_bytes

    @property
    def stats(self):
        """Counters of what both directions did (a :class:`collections.Counter`)."""
        return self.staging.stats

    @property
    def safety_factor(self) -> float:
        return self.capturer.safety_factor

    @property
    def pack_bytes(self) -> int:
        return self.capturer.pack_bytes

    @property
    def copy_stream(self):
        """The stream device-to-host copies run on."""
        return self.capturer.reader.stream

    @property
    def upload_stream(self):
        """The stream host-to-device copies run on."""
        return self.uploader.stream

    def set_pinned_bytes(self, nbytes: int) -> None:
        """Change the pool's capacity; see :meth:`StagingArea.set_pinned_bytes`."""
        self.staging.set_pinned_bytes(nbytes)

    def warm_up(self) -> None:
        """Allocate the whole pinned pool now, so the first save does not pay for it."""
        self.staging.warm_up()

    def collect(self) -> None:
        """Free device copies and private buffers whose last copy has finished.

        Also done by every :meth:`stage` and :meth:`upload` and whenever a capture is used up.
        """
        self.staging.collect()

    def close(self) -> None:
        """Wait for copies still referencing memory, then drop every pooled buffer."""
        self.staging.close()

    # ------------------------------------------------------------------ saving
    def stage(self, arrays: Sequence[Any], *, labels: Sequence[str] | None = None) -> list[DeviceCapture]:
        """Capture ``arrays`` as they will be once the current stream's pending work is done.

        See :meth:`DeviceCapturer.stage`; never waits for the device but in the ``host_copy`` policy.
        """
        return self.capturer.stage(arrays, labels=labels)

    def stage_pack(self, plan: PackPlan) -> DeviceCapture | None:
        """Capture every array of ``plan`` with one gather; see :meth:`DeviceCapturer.stage_pack`."""
        return self.capturer.stage_pack(plan)

    def prefetch(self) -> None:
        """Start copying captured chunks into free pinned buffers now, instead of at the first read."""
        self.capturer.reader.prefetch()

    # ------------------------------------------------------------------ restoring
    def upload(self, host: Any, target: Any) -> None:
        """Copy the host array ``host`` into the device array ``target``; see :meth:`DeviceUploader.upload`."""
        self.uploader.upload(host, target)

    def download(self, array: Any) -> np.ndarray:
        """A host copy of ``array`` after the current stream's pending work (waits for it)."""
        return self.uploader.download(array)

    def begin_uploads(self) -> Any:
        """Order later uploads after the current stream's pending work (:meth:`DeviceUploader.begin_uploads`)."""
        return self.uploader.begin_uploads()

    def take_upload_buffer(self, min_bytes: int = 1) -> PinnedBuffer | None:
        """A pinned buffer for one window now, or ``None`` (:meth:`DeviceUploader.take_upload_buffer`)."""
        return self.uploader.take_upload_buffer(min_bytes)

    def buffer_idle(self, buffer: PinnedBuffer) -> bool:
        """Whether no copy still reads ``buffer`` (never blocks)."""
        return self.uploader.buffer_idle(buffer)

    def wait_for_buffer(self, buffer: PinnedBuffer) -> None:
        """Block until no copy still reads ``buffer``, so that the host may overwrite it."""
        self.uploader.wait_for_buffer(buffer)

    def upload_window(self, source: PinnedBuffer | np.ndarray, pieces: Sequence[tuple[int, int, Any, int]]) -> None:
        """Enqueue one window's uploads, letting go of its buffer (:meth:`DeviceUploader.upload_window`)."""
        self.uploader.upload_window(source, pieces)

    def end_uploads(self, stream: Any) -> None:
        """Make later work on ``stream`` wait, on the device, for the uploads."""
        self.uploader.end_uploads(stream)


class Stagers:
    """The stager of each device backend of this process, created on first use.

    Owned by the process state (:func:`asyncckpt._runtime.process_state`), so a forked child starts
    with none. Keyed weakly: a backend's stager, with its pinned pool, goes when the backend does
    (CuPy backends live as long as the process, simulated ones as long as a test). That works
    because a stager refers to its backend weakly; otherwise each entry would keep its own key alive.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_backend: weakref.WeakKeyDictionary[DeviceBackend, Stager] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._by_backend)

    def for_backend(self, backend: DeviceBackend) -> Stager:
        """The stager of ``backend``, created with the default sizes on first use."""
        stager = self._by_backend.get(backend)
        if stager is None:
            with self._lock:
                stager = self._by_backend.get(backend)
                if stager is None:
                    stager = self._by_backend[backend] = Stager(backend)
        return stager

    def configure(self, backend: DeviceBackend, **settings: Any) -> Stager:
        """Give ``backend`` a new stager made with ``settings`` (:class:`Stager`'s keywords).

        Captures the old stager made keep it until they are read or closed.
        """
        stager = Stager(backend, **settings)
        with self._lock:
            self._by_backend[backend] = stager
        return stager


def stagers() -> Stagers:
    """The process's :class:`Stagers`."""
    return process_state().owned(Stagers)


def stager_for(backend: DeviceBackend) -> Stager:
    """The stager of ``backend`` (created on first use with the default sizes)."""
    return stagers().for_backend(backend)


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
