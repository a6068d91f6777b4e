"""Restoring: copying host bytes into device arrays through pinned buffers, ordered on the device.

Uploads run on a copy stream of their own, ordered after the work pending on the caller's current
stream when they begin (which may still use the targets); that stream then waits for them on the
device, so later work sees the restored values and the host never waits. A restore reading a
checkpoint into device arrays drives the window primitives itself: ``begin_uploads``, then per
window ``take_upload_buffer``, fill it from storage, ``upload_window``, and ``end_uploads`` at the
end, so window k+1 is read while window k is uploaded and pinned memory stays within the pool.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from asyncckpt._cuda.backend import DeviceBackend
from asyncckpt._cuda.pinned import PinnedBuffer, StagingArea

__all__ = ["DeviceUploader"]


class DeviceUploader:
    """One device's restore side: uploads through the pinned pool, and blocking downloads.

    Parameters
    ----------
    staging:
        The device's pinned memory, shared with its capturer.
    reclaim:
        Takes back a pinned buffer from the capturer (one holding a prefetched chunk nobody reads
        yet) when the pool has none free, so that an upload never waits for a buffer.
    """

    def __init__(self, staging: StagingArea, *, reclaim: Callable[[], PinnedBuffer | None] | None = None) -> None:
        self._staging = staging
        self._reclaim = reclaim
        #: The non-blocking stream host-to-device copies run on.
        self.stream = staging.backend.new_stream()

    @property
    def backend(self) -> DeviceBackend:
        return self._staging.backend

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
            piece = flat[start : start + self._staging.chunk_bytes]
            buffer = self.take_upload_buffer(piece.nbytes)
            if buffer is None:  # every pinned buffer is busy: upload from a private copy
                self.upload_window(piece.copy(), [(0, piece.nbytes, destination, start)])
            else:
                self.wait_for_buffer(buffer)
                buffer.array[: piece.nbytes] = piece
                self.upload_window(buffer, [(0, piece.nbytes, destination, start)])
            start += piece.nbytes
        if not contiguous:
            backend.wait_event(stream, backend.record_event(self.stream))
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

    def begin_uploads(self) -> Any:
        """Order the uploads enqueued from now on after the work pending on the current stream.

        Call it in the thread whose current stream the targets are used on (CuPy's current stream
        is per thread); pass what it returns (that stream) to :meth:`end_uploads`. Never waits.
        """
        backend = self.backend
        stream = backend.current_stream()
        with self._staging.lock:
            self._staging.check_open()
            self._staging.collect()
            backend.wait_event(self.stream, backend.record_event(stream))
        return stream

    def take_upload_buffer(self, min_bytes: int = 1) -> PinnedBuffer | None:
        """A pinned buffer of at least ``min_bytes`` for one window, now; ``None`` if none is free.

        Never waits: ``None`` when every buffer is held (by readers of captures, or by other
        windows being filled), and the caller then uploads from a private pageable buffer instead
        of waiting for one. The buffer may still be read by its last copy (``buffer.pending``):
        call :meth:`wait_for_buffer` (it blocks: off the event loop) or poll :meth:`buffer_idle`
        before writing into it. Give it back through :meth:`upload_window`.
        """
        with self._staging.lock:
            return self._staging.buffer_for(min_bytes, reclaim=self._reclaim)

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
        ``target_offset``, on :attr:`stream`. ``source`` is a buffer from
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
                backend.h2d_async(host[offset : offset + nbytes], target, target_offset, self.stream)
        event = backend.record_event(self.stream) if pieces else None
        with self._staging.lock:
            if pinned:
                source.owner.release(source, event)
                if pieces:
                    self._staging.stats["uploaded_chunks"] += 1
            elif pieces:
                self._staging.keep_until(event, host)
                self._staging.stats["direct_uploads"] += 1

    def end_uploads(self, stream: Any) -> None:
        """Make later work on ``stream`` (from :meth:`begin_uploads`) wait, on the device, for the uploads."""
        self.backend.wait_event(stream, self.backend.record_event(self.stream))
