"""Memory for copies a write makes: the byte budget they reserve from and the pool of staging blocks.

Staging buffers (the copies mutation hooks make of values about to change) are reserved from a
:class:`ByteBudget` before any byte is copied and released once the file they belong to is
durable; the blocks come from the process's :class:`StagingPool` (owned by the process state).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Any

import numpy as np


from asyncckpt._runtime import process_state
__all__ = ["BudgetClosedError", "ByteBudget", "STAGING_BLOCK_BYTES", "StagingPool", "copy_bytes", "staging_pool"]


# ---------------------------------------------------------------------------------------------
# The byte budget


class BudgetClosedError(RuntimeError):
    """The write owning a budget has ended; nothing more will be staged for it."""


class ByteBudget:
    """An asyncio byte semaphore with FIFO fairness, confined to one event loop.

    The background copier ``await``\\ s :meth:`acquire` before copying a file; the writer calls
    :meth:`release` once the file is durable. Threads other than the loop's use
    :meth:`acquire_from_thread`. :meth:`reserve` is the context-manager form for code that
    acquires and releases in one place.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"budget capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._available = capacity
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()
        self._error: BaseException | None = None

    @property
    def in_use(self) -> int:
        """Bytes currently reserved."""
        return self.capacity - self._available

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` are free (and every earlier waiter is served), then take them."""
        if nbytes > self.capacity:
            raise ValueError(f"cannot reserve {nbytes} bytes from a budget of {self.capacity}")
        if self._error is not None:
            raise BudgetClosedError("the byte budget is closed") from self._error
        if not self._waiters and self._available >= nbytes:
            self._available -= nbytes
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (nbytes, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(nbytes)  # granted just as we were cancelled: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise

    def force_acquire(self, nbytes: int) -> None:
        """Take ``nbytes`` now even if that overdraws the budget (for callers that cannot wait)."""
        self._available -= nbytes

    def release(self, nbytes: int) -> None:
        """Return ``nbytes`` and wake the waiters that now fit, in arrival order."""
        self._available += nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            nbytes, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if nbytes > self._available:
                return
            self._waiters.popleft()
            self._available -= nbytes
            waiter.set_result(None)

    def close(self, error: BaseException | None = None) -> None:
        """Fail every current and future waiter; used when the owning write ends."""
        self._error = error if error is not None else BudgetClosedError("the byte budget is closed")
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(BudgetClosedError("the byte budget is closed"))

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int):
        """``async with budget.reserve(n):`` holds ``n`` bytes for the body."""
        await self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)

    def acquire_from_thread(self, nbytes: int, loop: asyncio.AbstractEventLoop) -> None:
        """Block the calling (non-loop) thread until ``nbytes`` are taken on ``loop``.

        Raises :class:`BudgetClosedError` when the budget is closed or the loop is gone.
        """
        try:
            future = asyncio.run_coroutine_threadsafe(self.acquire(nbytes), loop)
        except RuntimeError as exc:  # loop closed
            raise BudgetClosedError("the event loop owning the budget has stopped") from exc
        try:
            future.result()
        except BudgetClosedError:
            raise
        except BaseException as exc:  # cancelled by a runtime shutdown
            raise BudgetClosedError("the budget wait was cancelled") from exc


# ---------------------------------------------------------------------------------------------
# Staging buffers


class StagingPool:
    """Staging blocks kept from one write to the next.

    A fresh buffer costs a page fault per 4 KiB on first touch -- measured at 0.4-1.7 GB/s on a
    virtual machine, ten times slower than copying into memory already mapped -- and a mutation
    hook copies in the training thread, so training that changes its variables while a save runs
    would pay it at every save. Hooks therefore copy into blocks of :data:`STAGING_BLOCK_BYTES`,
    one size for all so that any freed block serves any copy; blocks come back here once their
    file is durable, are kept up to ``retain_bytes`` in all, and are released after
    ``idle_seconds`` without use (so a program that stops saving gets its memory back).
    """

    def __init__(self, retain_bytes: int = 256 << 20, idle_seconds: float = 30.0) -> None:
        self.retain_bytes = retain_bytes
        self.idle_seconds = idle_seconds
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._uses = 0

    @property
    def kept_bytes(self) -> int:
        """Bytes held for reuse right now."""
        return len(self._free) * STAGING_BLOCK_BYTES

    def take(self, nbytes: int) -> np.ndarray:
        """A writable ``uint8`` array of ``nbytes`` (at most one block), from a kept block if any."""
        if nbytes > STAGING_BLOCK_BYTES:
            raise ValueError(f"a staging block holds at most {STAGING_BLOCK_BYTES} bytes, not {nbytes}")
        if nbytes < STAGING_BLOCK_BYTES // 4:
            return np.empty(nbytes, dtype=np.uint8)  # small: cheap to allocate, not worth a block
        with self._lock:
            self._uses += 1
            block = self._free.pop() if self._free else None
        if block is None:
            block = np.empty(STAGING_BLOCK_BYTES, dtype=np.uint8)
        return block[:nbytes]

    def give(self, array: np.ndarray, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Return an array from :meth:`take`; ``loop`` schedules the idle release."""
        block = array.base if array.base is not None else array
        if not isinstance(block, np.ndarray) or block.nbytes != STAGING_BLOCK_BYTES:
            return
        with self._lock:
            if (len(self._free) + 1) * STAGING_BLOCK_BYTES > self.retain_bytes:
                return  # let it go
            self._free.append(block)
            uses = self._uses
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing will trim, fine
                loop.call_soon_threadsafe(loop.call_later, self.idle_seconds, self._trim_if_idle, uses)

    def _trim_if_idle(self, uses: int) -> None:
        with self._lock:
            if self._uses == uses:
                self._free.clear()

    def clear(self) -> None:
        """Release every kept block now."""
        with self._lock:
            self._free.clear()


#: The size of a staging block (and the most a hook copies into one buffer).
STAGING_BLOCK_BYTES = 4 << 20

def staging_pool() -> StagingPool:
    """The process's pool every :class:`~asyncckpt.io.snapshot.Snapshot` stages into by default."""
    return process_state().owned(StagingPool)


def copy_bytes(destination: Any, source: Any) -> None:
    """Copy one flat byte buffer into another of the same length, releasing the GIL for large ones.

    (``memoryview`` slice assignment holds the GIL for the whole copy; NumPy's does not.)
    """
    if len(source) >= 1 << 16:
        np.copyto(np.frombuffer(destination, dtype=np.uint8), np.frombuffer(source, dtype=np.uint8))
    else:
        destination[:] = source


