"""Bringing captured bytes to the host: chunk by chunk, through the pinned pool, as they are read.

A capture (:class:`DeviceCapture`) is the value of one device array at save time, held on the
device (a device copy or the array itself) or already on the host. Its bytes are cut in chunks of
the pool's buffer size; each chunk copy records its own event, so a reader gets the first chunk
while later ones are still in flight. :class:`CaptureReader` prefetches ``device_copy`` chunks in
capture order into free buffers, fetches a chunk on demand when a read gets ahead, evicts the
latest unread prefetch when the pool is full, and copies through a private buffer as a last
resort: no read ever waits for a buffer, so readers cannot deadlock on the pool whatever order they
read in. A chunk's buffer goes back once all its bytes are read; a capture's device memory once
it is all read or closed.
"""

from __future__ import annotations

import collections
import math
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from asyncckpt._cuda.backend import HOST_COPY, CapturePolicy, DeviceCopyError
from asyncckpt._cuda.pinned import PinnedBuffer, StagingArea

__all__ = ["DeviceCapture", "CaptureReader", "CaptureState"]


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


class CaptureState:
    """A capture as its reader tracks it: its source, its chunks, who still reads it.

    It outlives the :class:`DeviceCapture` objects reading it, which may be collected unread.
    """

    def __init__(self, label: str, policy: CapturePolicy, source: Any, nbytes: int, chunk_bytes: int) -> None:
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

    def mark_read(self, start: int, stop: int) -> None:
        """Count bytes ``[start, stop)`` as read without reading them (a pack's alignment padding)."""
        for chunk in self.chunks[start // self.chunk_bytes : (stop - 1) // self.chunk_bytes + 1]:
            chunk.read_bytes += min(stop, chunk.stop) - max(start, chunk.start)
            if chunk.read_bytes >= chunk.length:  # a chunk smaller than the alignment, all padding
                chunk.consumed = True
                self.remaining -= 1


class DeviceCapture:
    """The value of one device array at save time, on its way to the host.

    Obtained from :meth:`Stager.stage`. ``dtype``, ``shape`` and ``nbytes`` describe the array;
    ``policy`` (a :class:`CapturePolicy`) says how it was captured. Read the bytes with
    :meth:`read_into` (copies into your buffer), :meth:`acquire` / :meth:`release` or
    :meth:`chunks` (zero-copy views of the pinned buffers). Each byte can be read once; resources
    go back as bytes are read, or with :meth:`close` (also run when the capture is garbage
    collected). Small arrays of one save share a packed device copy: their captures are windows
    ``[base, base + nbytes)`` of one staged buffer.
    """

    def __init__(
        self,
        reader: "CaptureReader",
        state: CaptureState,
        dtype: np.dtype,
        shape: tuple[int, ...],
        *,
        base: int = 0,
        nbytes: int | None = None,
        label: str | None = None,
    ) -> None:
        self._reader = reader
        self._state = state
        self.dtype = dtype
        self.shape = shape
        self._base = base
        self._nbytes = state.nbytes if nbytes is None else nbytes
        self._label = label
        self._read = 0
        state.users += 1
        # The finalizer holds the backend: a capture keeps its device alive until it is closed.
        self._finalizer = weakref.finalize(self, _close_capture, reader, state, reader.backend)

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
        return self._reader.chunk_ready(self._state, self._base // self.chunk_bytes + index)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._nbytes:
            raise ValueError(f"bytes [{offset}, {offset + length}) are outside {self.label!r} of {self._nbytes} bytes")

    def _open(self, position: int, stop: int) -> tuple[int, memoryview]:
        """``(chunk index, view of bytes [position, min(stop, chunk end)))``, in value coordinates."""
        start = self._base + position
        index = start // self.chunk_bytes
        chunk = self._state.chunks[index]
        try:
            view = self._reader.open_chunk(self._state, index)
        except DeviceCopyError as exc:
            if self._label is None or self._label == self._state.label:
                raise
            raise DeviceCopyError(f"copying {self._label!r} from the device failed: {exc}") from exc
        end = min(self._base + stop, chunk.stop)
        return index, view[start - chunk.start : end - chunk.start]

    def _close(self, index: int, nbytes: int) -> None:
        with self._reader.lock:  # windows of one pack are read from several writer threads
            self._read += nbytes
            self._reader.close_chunk(self._state, index, nbytes)

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
            self._reader.wait_chunk(self._state, index)
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
        self._reader.prefetch()

    def close(self) -> None:
        """Give back pinned buffers and device memory now (unread bytes are dropped)."""
        self._finalizer()


def _close_capture(reader: "CaptureReader", state: CaptureState, backend: Any) -> None:
    """A capture's finalizer; it is given ``backend`` only to hold it while the capture lives."""
    reader.close_state(state)


class CaptureReader:
    """One device's copies of captured chunks to the host, on a copy stream of its own.

    It shares the device's :class:`StagingArea` with the uploader: the area's lock guards every
    chunk, and :meth:`evict` lends the uploader a buffer held by an unread prefetch.
    """

    def __init__(self, staging: StagingArea) -> None:
        self._staging = staging
        #: The non-blocking stream device-to-host copies run on.
        self.stream = staging.backend.new_stream()
        self._queue: collections.deque[CaptureState] = collections.deque()  # device_copy captures to prefetch
        self._prefetched: list[tuple[CaptureState, _Chunk]] = []  # most recent last: evicted first

    @property
    def backend(self):
        return self._staging.backend

    @property
    def lock(self):
        return self._staging.lock

    def queue(self, state: CaptureState) -> None:
        """Prefetch ``state``'s chunks (from the next read or :meth:`prefetch` on). Caller holds the lock."""
        self._queue.append(state)

    def prefetch(self) -> None:
        """Start copying captured chunks into free pinned buffers now, instead of at the first read."""
        with self.lock:
            self._pump()

    def fetch(self, state: CaptureState, chunk: _Chunk, buffer: PinnedBuffer) -> None:
        """Enqueue the copy of ``chunk`` into ``buffer`` on the copy stream. Caller holds the lock."""
        if buffer.pending is not None:
            self.backend.wait_event(self.stream, buffer.pending)  # its last copy finishes first
            buffer.pending = None
        self.backend.d2h_async(state.source, chunk.start, buffer.array[: chunk.length], self.stream)
        chunk.buffer = buffer
        chunk.event = self.backend.record_event(self.stream)
        chunk.arrived = False

    def _pump(self) -> None:
        """Prefetch ``device_copy`` chunks, in capture order, into buffers that are free now."""
        if self._staging.closed:  # a closed stager prefetches nothing more (reads still fetch)
            self._queue.clear()
            return
        if len(self._prefetched) > 2 * self._staging.pool.max_buffers + 16:  # forget chunks read or dropped since
            self._prefetched = [(state, chunk) for state, chunk in self._prefetched
                                if chunk.prefetched and chunk.buffer is not None and not state.closed]
        while self._queue:
            state = self._queue[0]
            if (state.closed or state.next_prefetch >= len(state.chunks)
                    or state.chunk_bytes > self._staging.pool.buffer_bytes):  # made before the chunks shrank: read on demand
                self._queue.popleft()
                continue
            chunk = state.chunks[state.next_prefetch]
            if chunk.buffer is not None or chunk.consumed or chunk.readers:
                state.next_prefetch += 1
                continue
            buffer = self._staging.buffer_for(chunk.length)
            if buffer is None:
                return
            self.fetch(state, chunk, buffer)
            chunk.prefetched = True
            self._prefetched.append((state, chunk))
            state.next_prefetch += 1
            self._staging.stats["prefetched"] += 1

    def evict(self) -> PinnedBuffer | None:
        """Take the buffer of the most recently prefetched chunk nobody has started reading."""
        while self._prefetched:
            state, chunk = self._prefetched.pop()
            if not chunk.prefetched or chunk.buffer is None or chunk.readers or chunk.read_bytes:
                continue
            buffer = chunk.buffer
            buffer.pending = chunk.event
            chunk.buffer, chunk.event, chunk.prefetched = None, None, False
            self._staging.stats["evictions"] += 1
            return buffer
        return None

    def chunk_ready(self, state: CaptureState, index: int) -> bool:
        """Whether chunk ``index`` of ``state`` is on the host (never blocks)."""
        with self.lock:
            chunk = state.chunks[index]
            if state.policy == HOST_COPY or chunk.consumed:
                return True
            return chunk.event is not None and self.backend.event_done(chunk.event)

    def open_chunk(self, state: CaptureState, index: int) -> memoryview:
        """A host view of chunk ``index`` once it has arrived; pair with :meth:`close_chunk`."""
        direct = None
        with self.lock:
            chunk = state.chunks[index]
            if chunk.consumed:
                raise RuntimeError(f"bytes [{chunk.start}, {chunk.stop}) of {state.label!r} were already read")
            if state.closed:
                raise RuntimeError(f"the capture of {state.label!r} is closed")
            if state.policy == HOST_COPY:
                chunk.readers += 1
                return memoryview(state.source)[chunk.start : chunk.stop]
            if chunk.buffer is None:
                buffer = self._staging.buffer_for(chunk.length, reclaim=self.evict)
                if buffer is not None:
                    self.fetch(state, chunk, buffer)
                else:  # the pool is all in use: copy through a private buffer instead of waiting
                    direct = np.empty(chunk.length, dtype=np.uint8)
                    self.backend.d2h_async(state.source, chunk.start, direct, self.stream)
                    event = self.backend.record_event(self.stream)
                    self._staging.stats["direct_reads"] += 1
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
            with self.lock:
                chunk.readers -= 1
                self._release_chunk(state, chunk)  # the capture may have been closed meanwhile
            raise DeviceCopyError(
                f"copying bytes [{chunk.start}, {chunk.stop}) of {state.label!r} from the device failed: {exc}"
            ) from exc
        if direct is None:
            with self.lock:
                if chunk.event is event:
                    chunk.arrived = True
        return view

    def wait_chunk(self, state: CaptureState, index: int) -> None:
        """Wait, without reading, until chunk ``index`` is on the host (fetching it if a buffer is free)."""
        with self.lock:
            chunk = state.chunks[index]
            if state.closed or state.policy == HOST_COPY or chunk.consumed or chunk.arrived:
                return
            if chunk.buffer is None:
                buffer = self._staging.buffer_for(chunk.length)
                if buffer is None:
                    return  # the read will copy it through a private buffer
                self.fetch(state, chunk, buffer)
                chunk.prefetched = True
                self._prefetched.append((state, chunk))
            event = chunk.event
        try:
            self.backend.synchronize_event(event)
        except Exception:
            return  # the read raises it, naming the bytes
        with self.lock:
            if chunk.event is event:
                chunk.arrived = True

    def close_chunk(self, state: CaptureState, index: int, nbytes: int) -> None:
        """End a read of ``nbytes`` of chunk ``index``; its buffer goes back once it is all read."""
        with self.lock:
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
                    self.retire(state)
                self._pump()

    def _release_chunk(self, state: CaptureState, chunk: _Chunk) -> None:
        """Give ``chunk``'s buffer back once nobody reads it and it is consumed or abandoned."""
        if chunk.buffer is None or chunk.readers or not (chunk.consumed or state.closed):
            return
        chunk.buffer.owner.release(chunk.buffer, None if chunk.consumed else chunk.event)
        chunk.buffer, chunk.event = None, None

    def retire(self, state: CaptureState) -> None:
        """Drop the state's source once no copy can still be reading it. Caller holds the lock."""
        state.closed = True
        source, state.source = state.source, None
        keepalive, state.keepalive = state.keepalive, None
        if state.policy != HOST_COPY and source is not None:
            self._staging.keep_until(self.backend.record_event(self.stream), (source, keepalive))
        self._staging.collect()

    def close_state(self, state: CaptureState) -> None:
        """One reader of ``state`` is done; the last one gives back its buffers and device memory."""
        with self.lock:
            state.users -= 1
            if state.closed or state.users > 0:
                return
            state.closed = True
            for chunk in state.chunks:
                self._release_chunk(state, chunk)
            self.retire(state)
            self._pump()
