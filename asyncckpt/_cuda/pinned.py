"""Page-locked host buffers, pooled: allocating pinned memory is slow, so saves and restores reuse it.

Copies between the device and pinned memory run asynchronously at full bandwidth; from pageable
memory they are staged by the driver and may block. The pool bounds how much pinned memory is held
and hands buffers out without ever waiting for one.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from asyncckpt._cuda.backend import DeviceBackend

__all__ = ["PinnedBuffer", "PinnedPool"]


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

