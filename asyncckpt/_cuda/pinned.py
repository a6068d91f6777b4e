"""Page-locked host buffers, pooled: allocating pinned memory is slow, so saves and restores reuse it.

Copies between the device and pinned memory run asynchronously at full bandwidth; from pageable
memory they are staged by the driver and may block. A :class:`PinnedPool` bounds how much pinned
memory is held and hands buffers out without ever waiting for one. A :class:`StagingArea` is one
device's pool as its capturer and its uploader share it: the lock, the pool's resizing, and the
memory that must outlive the copies still reading it.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from asyncckpt._cuda.backend import DeviceBackend

__all__ = ["PinnedBuffer", "PinnedPool", "StagingArea"]


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
    it: device-side users make their stream wait on it, host-side users wait for it. Like the
    stager it belongs to, the pool refers to its backend weakly.
    """

    def __init__(self, backend: DeviceBackend, *, buffer_bytes: int, capacity_bytes: int) -> None:
        if type(buffer_bytes) is not int or buffer_bytes <= 0:
            raise ValueError(f"buffer_bytes must be a positive int, got {buffer_bytes!r}")
        self._backend_ref = weakref.ref(backend)
        self.buffer_bytes = buffer_bytes
        self.allocated_bytes = 0
        self._free: collections.deque[PinnedBuffer] = collections.deque()
        self._retired = False
        self._capacity = 0
        #: ``(event, memory)`` of dropped buffers a copy may still use: kept until the event is done.
        self.graveyard: list[tuple[Any, Any]] = []
        self.capacity_bytes = capacity_bytes

    @property
    def _backend(self) -> DeviceBackend:
        return _alive(self._backend_ref)

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



class StagingArea:
    """One device's pinned memory, shared by its capturer (saving) and its uploader (restoring).

    Both directions draw buffers from the same pool -- an upload may even take back a buffer that
    holds a prefetched, unread capture chunk -- so the pool, the lock guarding it, the memory kept
    until the copies reading it are done and the counters of both directions live here.

    Parameters
    ----------
    backend:
        The device.
    pinned_bytes:
        Most page-locked host memory held at once (the pool's capacity).
    chunk_bytes:
        Size of one pinned buffer and of one copy.
    """

    def __init__(self, backend: DeviceBackend, *, pinned_bytes: int, chunk_bytes: int) -> None:
        if type(chunk_bytes) is not int or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        if type(pinned_bytes) is not int or pinned_bytes <= 0:
            raise ValueError(f"pinned_bytes must be a positive int, got {pinned_bytes!r}")
        self._backend_ref = weakref.ref(backend)
        #: Guards the pool and every capture's chunks; reentrant, as capture reads nest.
        self.lock = threading.RLock()
        self._configured_chunk_bytes = chunk_bytes
        self.chunk_bytes = min(chunk_bytes, pinned_bytes)
        self.pool = PinnedPool(backend, buffer_bytes=self.chunk_bytes, capacity_bytes=pinned_bytes)
        #: Pools replaced when the chunks shrank, until their last busy buffer has come back.
        self.old_pools: list[PinnedPool] = []
        self._graveyard: list[tuple[Any, Any]] = []  # (event, memory a copy before it may still use)
        self.closed = False
        #: What each direction did: device_copies, stream_waits, host_copies, packed_arrays,
        #: prefetched, evictions, direct_reads, uploaded_chunks, direct_uploads.
        self.stats: collections.Counter = collections.Counter()

    @property
    def backend(self) -> DeviceBackend:
        """The device (referred to weakly: the process's registry of stagers must not keep it alive)."""
        return _alive(self._backend_ref)

    def check_open(self) -> None:
        """Refuse new copies once :meth:`close` has run."""
        if self.closed:
            raise RuntimeError("the stager is closed")

    def set_pinned_bytes(self, nbytes: int) -> None:
        """Change the pool's capacity (buffers above it are freed as they come back).

        Below one chunk, chunks shrink to ``nbytes`` so that the pool stays within it (a new pool
        replaces the old one, whose buffers are freed as they come back).
        """
        if type(nbytes) is not int or nbytes <= 0:
            raise ValueError(f"pinned_bytes must be a positive int, got {nbytes!r}")
        with self.lock:
            chunk_bytes = min(self._configured_chunk_bytes, nbytes)
            if chunk_bytes == self.chunk_bytes:
                self.pool.capacity_bytes = nbytes
                return
            self.pool.retire()
            self.old_pools.append(self.pool)  # busy buffers come back to it and are freed then
            self.chunk_bytes = chunk_bytes
            self.pool = PinnedPool(self.backend, buffer_bytes=chunk_bytes, capacity_bytes=nbytes)

    def warm_up(self) -> None:
        """Allocate the whole pinned pool now, so the first save does not pay for it."""
        with self.lock:
            buffers = self.pool.try_reserve(self.pool.free_buffers) or []
            for buffer in buffers:
                buffer.owner.release(buffer, buffer.pending)

    def buffer_for(
        self, nbytes: int, reclaim: Callable[[], PinnedBuffer | None] | None = None
    ) -> PinnedBuffer | None:
        """A pinned buffer of at least ``nbytes`` available now, else ``None``. Caller holds the lock.

        ``reclaim``, when the pool has none free, takes one back from a lower-priority user.
        """
        buffer = self.pool.try_acquire() or (reclaim() if reclaim is not None else None)
        if buffer is not None and buffer.array.nbytes < nbytes:  # from a pool shrunk since
            buffer.owner.release(buffer, buffer.pending)
            return None
        return buffer

    def keep_until(self, event: Any, memory: Any) -> None:
        """Hold ``memory`` (a device copy, a private host buffer) until ``event``, a copy using it, is done.

        Caller holds the lock.
        """
        self._graveyard.append((event, memory))

    def collect(self) -> None:
        """Free held memory and dropped pinned buffers whose last copy has finished."""
        with self.lock:
            backend = self.backend
            if self._graveyard:
                self._graveyard = [(event, obj) for event, obj in self._graveyard if not backend.event_done(event)]
            for pool in [self.pool, *self.old_pools]:
                pool.collect()
            self.old_pools = [pool for pool in self.old_pools if pool.graveyard or pool.allocated_bytes > 0]

    def close(self) -> None:
        """Refuse new copies, wait for those still using held memory, then let it all go."""
        with self.lock:
            self.closed = True
            graveyard, self._graveyard = self._graveyard, []
            for pool in [self.pool, *self.old_pools]:
                graveyard.extend(pool.graveyard)
                pool.graveyard = []
        for event, _ in graveyard:
            with contextlib.suppress(Exception):
                self.backend.synchronize_event(event)


def _alive(reference: weakref.ref) -> DeviceBackend:
    backend = reference()
    if backend is None:
        raise ReferenceError("the device backend of this stager no longer exists")
    return backend
