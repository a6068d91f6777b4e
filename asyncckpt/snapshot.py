"""Host snapshots of the values being saved: staging buffers, the byte budget, the copy-on-write guard.

A write stages each data file of its :class:`~asyncckpt.plan.WritePlan` into one ``bytearray``
(the buffer handed to storage as is) and computes the CRC-32C of every piece while the bytes are
hot. Staging runs in the background, so ``start_write`` never copies live arrays itself; the value
written is nevertheless the value at ``start_write`` time:

* ``bytes`` and plain arrays have no way to announce a change, so ``start_write`` takes them at
  once (``bytes`` as they are; arrays as an owned C-order little-endian copy).
* A *snapshot source* (``Variable``) gets a mutation hook. The holder calls it, in the mutating
  thread, before changing its array. The hook stages every not-yet-staged file holding bytes of
  that holder -- waiting for a background copy of the same file to finish first -- and only then
  returns and lets the mutation proceed. Once all of a holder's files are staged its hook is
  removed, so later mutations cost nothing.

Memory bound: staging buffers are reserved from a :class:`ByteBudget` before any byte is copied and
released by the writer once storage reports those bytes durable, so staged-but-unwritten data never
exceeds ``staging_budget_bytes``. On top of that come the owned copies of plain arrays, and the
storage layer's own copy of each in-flight write (at most ``max_concurrent_writes`` files). Peak
extra host memory is therefore about ``staging_budget_bytes + max_concurrent_writes * max_file_bytes``
plus the plain arrays passed to ``start_write``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np

from asyncckpt import _arrays
from asyncckpt._runtime import running_loop
from asyncckpt.format import BYTES_DTYPE, OBJECT_GRAPH_KEY, encode_dtype
from asyncckpt.plan import WritePlan

__all__ = [
    "SaveEntry",
    "BudgetClosedError",
    "ByteBudget",
    "Source",
    "prepare_sources",
    "host_bytes",
    "StagedFile",
    "Snapshot",
]


@dataclass(frozen=True)
class SaveEntry:
    """One checkpoint key and where its value comes from.

    ``source`` is a snapshot source (has ``_snapshot_array``, ``_add_mutation_hook`` and
    ``_remove_mutation_hook``), a NumPy or device array, or ``bytes``.
    """

    key: str
    source: Any


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
# Sources


@dataclass
class Source:
    """A prepared :class:`SaveEntry`: what the manifest records and where to copy bytes from.

    ``kind`` is ``"bytes"``, ``"array"`` (an owned host copy) or ``"holder"`` (a snapshot source,
    read live until staged).
    """

    key: str
    kind: str
    value: Any
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def byte_view(self, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` of the value as a flat ``'B'`` memoryview (a view when possible)."""
        if self.kind == "bytes":
            return memoryview(self.value)[start:stop]
        array = self.value._snapshot_array() if self.kind == "holder" else self.value
        if self.kind == "holder" and (encode_dtype(array.dtype) != self.dtype or tuple(array.shape) != self.shape):
            raise ValueError(
                f"the value of {self.key!r} changed from {self.dtype}{list(self.shape)} to "
                f"{encode_dtype(array.dtype)}{list(array.shape)} during the write without calling its "
                "mutation hooks first"
            )
        return host_bytes(array, start, stop)


def _is_snapshot_source(value: Any) -> bool:
    return all(
        callable(getattr(value, name, None))
        for name in ("_snapshot_array", "_add_mutation_hook", "_remove_mutation_hook")
    )


def _owned_copy(key: str, value: Any) -> np.ndarray:
    if _arrays.is_device_array(value):
        value = _arrays.to_numpy(value)
    elif not isinstance(value, (np.ndarray, np.generic)):
        raise TypeError(
            f"the value of {key!r} is a {type(value).__name__}; expected a NumPy or device array, "
            "bytes, or an object with the snapshot-source protocol"
        )
    try:
        little = np.dtype(encode_dtype(value.dtype))
    except TypeError as exc:
        raise TypeError(f"cannot save {key!r}: {exc}") from None
    return np.array(value, dtype=little, order="C", copy=True)


def prepare_sources(entries: Sequence[SaveEntry]) -> list[Source]:
    """Validate ``entries`` and freeze what can be frozen now.

    ``bytes`` are taken as they are and arrays are copied; snapshot sources are only inspected
    (dtype and shape of their live array). Raises ``ValueError`` for a duplicate, empty or
    reserved key and ``TypeError`` for an unsupported value or dtype, naming the key.
    """
    sources: list[Source] = []
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, SaveEntry):
            raise TypeError(f"expected SaveEntry objects, got {type(entry).__name__}")
        key, value = entry.key, entry.source
        if not isinstance(key, str) or not key:
            raise ValueError(f"checkpoint keys must be non-empty strings, got {key!r}")
        if key == OBJECT_GRAPH_KEY:
            raise ValueError(f"{OBJECT_GRAPH_KEY!r} is reserved for the object graph")
        if key in seen:
            raise ValueError(f"duplicate checkpoint key {key!r}")
        seen.add(key)
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            sources.append(Source(key, "bytes", data, BYTES_DTYPE, (), len(data)))
        elif isinstance(value, str):
            raise TypeError(f"the value of {key!r} is a str; encode it to bytes first")
        elif _is_snapshot_source(value):
            live = value._snapshot_array()
            try:
                dtype = encode_dtype(live.dtype)
            except TypeError as exc:
                raise TypeError(f"cannot save {key!r}: {exc}") from None
            shape = tuple(int(dim) for dim in live.shape)
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            sources.append(Source(key, "holder", value, dtype, shape, nbytes))
        else:
            array = _owned_copy(key, value)
            sources.append(Source(key, "array", array, array.dtype.str, tuple(array.shape), array.nbytes))
    return sources


def host_bytes(array: Any, start: int, stop: int) -> memoryview:
    """Bytes ``[start, stop)`` of ``array``'s C-order little-endian representation.

    A view for C-contiguous little-endian host arrays; otherwise only the elements covering the
    range are copied (device arrays: only that range crosses to the host).
    """
    if _arrays.is_device_array(array):
        cupy = _arrays.cupy_module()
        flat = cupy.ascontiguousarray(array).reshape(-1).view(cupy.uint8)
        return memoryview(cupy.asnumpy(flat[start:stop]))
    array = np.asarray(array)
    little = np.dtype(encode_dtype(array.dtype))
    if array.flags.c_contiguous and array.dtype == little:
        return memoryview(array.reshape(-1).view(np.uint8))[start:stop]
    itemsize = array.dtype.itemsize
    first, last = start // itemsize, -(-stop // itemsize)
    elements = array.reshape(-1)[first:last] if array.flags.c_contiguous else array.flat[first:last]
    part = np.ascontiguousarray(elements, dtype=little).view(np.uint8)
    base = first * itemsize
    return memoryview(part)[start - base : stop - base]


# ---------------------------------------------------------------------------------------------
# Staging


@dataclass
class StagedFile:
    """A data file ready to write: ``buffer`` is its full content, ``crcs`` one CRC per piece."""

    index: int
    name: str
    buffer: bytearray
    crcs: tuple[int, ...]


@dataclass
class _Guard:
    """The mutation hook of one snapshot source and the files it still waits for."""

    holder: Any
    files: tuple[int, ...]
    remaining: int
    hook: Callable[[Any], None] | None = field(default=None)


class Snapshot:
    """Stages the files of ``plan`` from ``sources`` under ``budget``, guarding live sources.

    Parameters
    ----------
    sources, plan:
        From :func:`prepare_sources` and :func:`~asyncckpt.plan.plan_write` (one item per source).
    budget:
        The byte budget; a file's bytes are reserved before it is staged.
    loop:
        The loop the budget and ``deliver`` belong to.
    deliver:
        Called on ``loop`` with each :class:`StagedFile`, or with an exception raised while a
        mutation hook was staging (so the write fails instead of the mutating thread).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        plan: WritePlan,
        budget: ByteBudget,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[StagedFile | BaseException], None],
    ) -> None:
        self._sources = list(sources)
        self._plan = plan
        self._budget = budget
        self._loop = loop
        self._deliver = deliver
        self._staged = [False] * len(plan.files)
        self._file_locks = [threading.Lock() for _ in plan.files]
        self._state_lock = threading.Lock()
        self._closed = False
        self.staging_seconds = 0.0
        self.staged_by_hooks = 0
        # Per item: files still to stage before its source can be dropped.
        self._item_remaining = [len(plan.files_of_item(i)) for i in range(len(self._sources))]
        self._guards: dict[int, _Guard] = {}
        for item, source in enumerate(self._sources):
            if source.kind != "holder":
                continue
            guard = self._guards.get(id(source.value))
            files = plan.files_of_item(item)
            if guard is None:
                self._guards[id(source.value)] = _Guard(source.value, files, 0)
            else:
                guard.files = tuple(sorted(set(guard.files) | set(files)))
        for guard in self._guards.values():
            guard.remaining = len(guard.files)

    def install_guards(self) -> None:
        """Register the mutation hooks (call before returning from ``start_write``)."""
        for holder_id, guard in self._guards.items():
            if guard.remaining:
                guard.hook = self._make_hook(holder_id)
                guard.holder._add_mutation_hook(guard.hook)

    def _make_hook(self, holder_id: int) -> Callable[[Any], None]:
        def before_mutation(_holder: Any) -> None:
            self._stage_for_holder(holder_id)

        return before_mutation

    def _stage_for_holder(self, holder_id: int) -> None:
        guard = self._guards[holder_id]
        in_loop = running_loop() is self._loop
        for index in guard.files:
            if self._closed or self._staged[index]:
                continue
            size = self._plan.files[index].size
            # Budget first, file lock second, never the other way round: nobody waits for budget
            # while holding a file lock, and budget is freed by the writer, which needs no lock
            # and waits only on storage. So this wait always ends (each file fits the budget).
            try:
                if in_loop:
                    self._budget.force_acquire(size)  # cannot block the loop that frees budget
                else:
                    self._budget.acquire_from_thread(size, self._loop)
            except BudgetClosedError:
                return  # the write is over; the mutation no longer needs protecting
            try:
                staged = self.stage(index)
            except BaseException as exc:
                self._release_threadsafe(size)
                self._call_on_loop(self._deliver, exc)
                return
            if staged is None:
                self._release_threadsafe(size)
                continue
            with self._state_lock:
                self.staged_by_hooks += 1
            self._call_on_loop(self._deliver, staged)

    def _release_threadsafe(self, nbytes: int) -> None:
        self._call_on_loop(self._budget.release, nbytes)

    def _call_on_loop(self, callback, *args) -> None:
        if running_loop() is self._loop:
            callback(*args)
            return
        with contextlib.suppress(RuntimeError):  # the loop has shut down: nobody is listening
            self._loop.call_soon_threadsafe(callback, *args)

    def stage(self, index: int) -> StagedFile | None:
        """Copy file ``index`` into a new buffer; ``None`` if it was already staged.

        The caller holds ``size`` bytes of budget for it. Thread-safe; blocks while another thread
        stages the same file.
        """
        file = self._plan.files[index]
        with self._file_locks[index]:
            if self._staged[index]:
                return None
            started = time.perf_counter()
            buffer = bytearray(file.size)
            view = memoryview(buffer)
            crcs = []
            for piece in file.pieces:
                target = view[piece.file_offset : piece.file_offset + piece.length]
                target[:] = self._sources[piece.item].byte_view(piece.item_offset, piece.item_offset + piece.length)
                crcs.append(crc32c.crc32c(target))
            self._staged[index] = True
            elapsed = time.perf_counter() - started
        self._after_staged(index, elapsed)
        return StagedFile(index, file.name, buffer, tuple(crcs))

    def _after_staged(self, index: int, elapsed: float) -> None:
        unhook = []
        with self._state_lock:
            self.staging_seconds += elapsed
            holders = set()  # one holder may be several items of this file (saved under several keys)
            for item in {piece.item for piece in self._plan.files[index].pieces}:
                self._item_remaining[item] -= 1
                source = self._sources[item]
                if source.kind == "holder":
                    holders.add(id(source.value))
                elif self._item_remaining[item] == 0:
                    source.value = None  # the owned copy is no longer needed
            for holder_id in holders:
                guard = self._guards[holder_id]
                guard.remaining -= 1
                if guard.remaining == 0 and guard.hook is not None:
                    unhook.append((guard.holder, guard.hook))
                    guard.hook = None
        for holder, hook in unhook:
            holder._remove_mutation_hook(hook)

    async def run_copier(self) -> None:
        """Stage every file not staged by a hook, in plan order, one at a time, off the loop."""
        for index, file in enumerate(self._plan.files):
            if self._staged[index]:
                continue
            await self._budget.acquire(file.size)
            try:
                staged = await asyncio.to_thread(self.stage, index)
            except BaseException:
                self._budget.release(file.size)
                raise
            if staged is None:
                self._budget.release(file.size)
            else:
                self._deliver(staged)

    def close(self) -> None:
        """End the snapshot: remove remaining hooks and wake anyone waiting for budget."""
        self._closed = True
        self._call_on_loop(self._budget.close)
        unhook = []
        with self._state_lock:
            for guard in self._guards.values():
                if guard.hook is not None:
                    unhook.append((guard.holder, guard.hook))
                    guard.hook = None
        for holder, hook in unhook:
            holder._remove_mutation_hook(hook)
