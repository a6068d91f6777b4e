"""Host snapshots of the values being saved: the copy-on-write guard, zero-copy file contents, the budget.

A write streams each data file of its :class:`~asyncckpt.io.plan.WritePlan` to storage as a
:class:`FileContent` -- a :class:`~asyncckpt.io.storage.StreamedValue` whose batches are views of the
sources' own bytes -- and computes the CRC-32C of every piece as the batches go out. Nothing is
copied on the way unless a value is about to change; the value written is nevertheless the value
at ``start_write`` time:

* ``bytes`` and plain arrays have no way to announce a change, so ``start_write`` takes them at
  once (``bytes`` as they are; arrays as an owned C-order little-endian copy).
* A *snapshot source* (``Variable``) is guarded by a mutation hook. The holder calls it, in the
  mutating thread, before changing its array. The hook copies every byte of that holder that has
  not gone out yet into a staging buffer -- waiting while a batch holding its bytes is being
  written -- and only then returns and lets the mutation proceed; the file's remaining batches are
  then served from the copy. Once every byte of a holder has been written or copied its guard is
  spent and later mutations cost nothing.

* A snapshot source whose array lives on a GPU is *captured* instead (:meth:`Snapshot.capture_device_values`):
  before ``start_write`` returns, :mod:`asyncckpt._cuda` enqueues its copy to the host ordered
  after the work already on the current stream (a device-to-device copy first when memory allows),
  so kernels enqueued later -- which call no hook -- cannot change what is written. Its bytes are
  then read zero-copy from the pinned chunks as they arrive, and it gets no guard.

Guards are installed in bulk where the holder's type offers ``_add_mutation_hooks(table, hook)``
(``Variable`` does): one registration covers every such holder of a write, so guarding 10,000
variables costs the same as guarding one. Other holders get one ``_add_mutation_hook`` each.

Memory bound: staging buffers (the copies hooks make) are reserved from a :class:`ByteBudget`
before any byte is copied and released once the file they belong to is durable, so they never
exceed ``staging_budget_bytes``. On top of that come the owned copies of plain arrays, and -- for
storage that cannot stream a value (any TensorStore kvstore) -- one gathered buffer per file in
flight, at most ``max_concurrent_writes`` files. The filesystem backend streams: a write of live
variables needs no memory beyond the staging copies of values changed while it runs. Device values
pass through the copy engine's pinned pool, whose capacity is set to the same budget, and hold a
device-to-device copy (device memory, freed as its chunks are read) under the ``device_copy`` policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import crc32c
import numpy as np

from asyncckpt import _arrays, _cuda
from asyncckpt._runtime import running_loop
from asyncckpt.io.guard_layout import DeviceCaptureCache, GuardLayout
from asyncckpt.io.plan import WritePlan
from asyncckpt.io.sources import Source, SourceKind
from asyncckpt.io.staging import STAGING_BLOCK_BYTES, BudgetClosedError, ByteBudget, StagingPool, copy_bytes, staging_pool
from asyncckpt.io.storage import StreamedValue

__all__ = ["FileContent", "SEGMENT_BYTES", "Snapshot", "WriteAbortedError"]

#: Most bytes one batch of a :class:`FileContent` holds. A mutation of a value whose bytes are in
#: the batch being written waits for that one batch (a few milliseconds), never for a whole file.
SEGMENT_BYTES = 4 << 20
_BATCH_BUFFERS = 1024  # buffers per batch: Linux's IOV_MAX for one writev


# ---------------------------------------------------------------------------------------------
# Guards and streamed file contents


class _FileState:
    """Progress of one data file within one write (guarded by ``lock``).

    ``waiting`` counts hooks queued for the lock; the writer lets them in before its next batch
    (``turn``), so a mutation waits for at most the batch being written.
    """

    __slots__ = (
        "lock", "turn", "gate", "waiting", "cursor", "piece", "offset", "staged", "staged_bytes", "buffers", "crcs",
        "captured", "open_views",
    )

    def __init__(self, pieces: int) -> None:
        self.lock = threading.Lock()
        self.turn = threading.Condition(self.lock)
        self.gate = threading.Lock()
        self.waiting = 0
        self.cursor = 0  # bytes of the file written so far (only grows)
        self.piece = 0  # the piece the next bytes come from
        self.offset = 0  # and its first byte not written yet
        self.staged: dict[int, tuple[int, list]] = {}  # piece -> (first byte copied, staging blocks)
        self.staged_bytes = 0
        self.buffers: list[np.ndarray] = []  # staging buffers to return to the pool
        self.crcs = [0] * pieces
        self.captured = bytearray(pieces)  # 1 once a piece is written or copied
        self.open_views: list[list] = []  # [device capture, offset, view, bytes used] held by the batch


class _FileStates:
    """Each data file's :class:`_FileState`, made when the file is first touched.

    A save of 1,000 arrays of a few MiB has 1,000 files; making their states (two locks and a
    condition each) up front cost ``save()`` 7 ms, while the writer reaches them one by one later.
    """

    __slots__ = ("_pieces", "_states", "_lock")

    def __init__(self, plan: WritePlan) -> None:
        self._pieces = [len(file.pieces) for file in plan.files]
        self._states: list[_FileState | None] = [None] * len(self._pieces)
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> _FileState:
        state = self._states[index]
        if state is None:
            with self._lock:
                state = self._states[index]
                if state is None:
                    state = self._states[index] = _FileState(self._pieces[index])
        return state


class WriteAbortedError(RuntimeError):
    """The write owning a snapshot has ended; its file contents can no longer be produced."""


class FileContent(StreamedValue):
    """The bytes of one planned data file, served from the sources while storage writes them.

    Batches are views of the sources' memory (or of a hook's copy); each batch stays locked against
    mutation until the consumer asks for the next one, and the CRC-32C of every piece is computed
    on exactly the bytes handed out.
    """

    def __init__(self, snapshot: Snapshot, index: int) -> None:
        self._snapshot = snapshot
        self._index = index
        self._consumed = False
        self.size = snapshot._plan.files[index].size

    def segments(self) -> Iterator[list[memoryview]]:
        self._consume()
        return self._snapshot._segments(self._index)

    def readinto(self, buffer: Any) -> int:
        """Copy the next bytes into ``buffer``; return how many (0 at the end)."""
        if not self._consumed:
            self._consume()
        return self._snapshot._fill(self._index, memoryview(buffer).cast("B"))

    def _consume(self) -> None:
        if self._consumed:
            # Bytes already handed out may have changed since (their guard is spent): serving
            # them again could mix two versions of a value.
            raise RuntimeError(f"the content of data file {self._index} can be consumed only once")
        self._consumed = True


class Snapshot:
    """Serves the files of ``plan`` from ``sources``, guarding live sources until they are written.

    Parameters
    ----------
    sources, plan:
        From :func:`prepare_sources` and :func:`~asyncckpt.io.plan.plan_write` (one item per source).
    budget:
        The staging budget: hooks reserve what they copy before copying it.
    loop:
        The loop the budget belongs to.
    layout:
        A :class:`GuardLayout` of ``sources`` and ``plan`` (built here when not given; pass a kept
        one to make repeated writes of the same objects cheap).
    segment_bytes:
        Most bytes per batch of a file's content (:data:`SEGMENT_BYTES`).
    pool:
        Where staging buffers come from (:func:`~asyncckpt.io.staging.staging_pool`).
    device_backend:
        The :class:`~asyncckpt._cuda.DeviceBackend` whose arrays :meth:`capture_device_values`
        captures (default: CUDA arrays through CuPy).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        plan: WritePlan,
        budget: ByteBudget,
        loop: asyncio.AbstractEventLoop,
        layout: GuardLayout | None = None,
        *,
        segment_bytes: int = SEGMENT_BYTES,
        pool: StagingPool | None = None,
        device_backend: Any = None,
    ) -> None:
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
        self._segment_bytes = segment_bytes
        self._pool = pool if pool is not None else staging_pool()
        self._sources = sources
        self._plan = plan
        self._budget = budget
        self._loop = loop
        self._layout = layout if layout is not None else GuardLayout(sources, plan)
        self._files = _FileStates(plan)
        self._remaining = list(self._layout.piece_counts)  # per holder: pieces not yet captured
        self._count_lock = threading.Lock()
        self._views: dict[int, memoryview | None] = {}
        self._views_lock = threading.Lock()
        self._array_pieces: dict[int, int] = {}
        self._removers: list[Callable[[], None]] = []
        self._single_hooks: dict[int, Callable[[Any], None]] = {}
        self._closed = False
        self.error: BaseException | None = None
        self.staging_seconds = 0.0
        self.bytes_staged_by_hooks = 0
        self.files_staged_by_hooks = 0
        self._hooked_files: set[int] = set()
        self._device_backend = device_backend
        self._captures: list[Any] = []  # the DeviceCaptures of this write's device values
        self._capture_slots: dict[int, tuple[int, int]] = {}  # item -> (capture index, byte offset)

    # ------------------------------------------------------------------ device values
    def capture_device_values(self, pinned_bytes: int) -> int:
        """Capture every holder whose value lives on a GPU; return how many were captured.

        Call in the saving thread before ``start_write`` returns. The copies are ordered after the
        work already enqueued on the current stream and before anything enqueued later, without
        the host waiting for the device (:mod:`asyncckpt._cuda`), so such a value needs no
        mutation guard: its file bytes are read from the capture's pinned buffers (``pinned_bytes``
        at most) as they arrive. The capture plan -- small arrays gathered by one kernel -- is
        kept in the layout and reused while the holders keep the same array objects, so a repeat
        save of thousands of device variables costs little more than one identity check each.
        """
        layout = self._layout
        items = layout.device_items
        if not items:
            return 0
        arrays = [holder._snapshot_array() for holder in layout.device_holders]
        cache = layout.device_cache
        if cache is None or not cache.matches(arrays):
            cache = layout.device_cache = self._plan_device_capture(items, arrays)
        if not cache.items:
            return 0
        captures, slots = cache.plan.capture(pinned_bytes)
        self._captures = captures
        self._capture_slots = cache.slots if slots is cache.plan.slots else dict(zip(cache.items, slots))
        self._remaining = list(cache.remaining)  # captured: no guard needed, their bytes cannot change
        return len(cache.items)

    @property
    def captures_device_values(self) -> bool:
        """Whether some values of this write come from device captures."""
        return bool(self._captures)

    def start_device_copies(self) -> None:
        """Start the copies of captured values to the host, to overlap the write's setup."""
        for capture in self._captures:  # a pack and the large arrays: a handful of captures
            capture.prefetch()

    def _plan_device_capture(self, items: Sequence[int], arrays: Sequence[Any]) -> DeviceCaptureCache:
        backend = self._device_backend
        captured = []
        for item in items:
            array = self._sources[item].live_array()  # checks dtype and shape against the plan
            if _arrays.is_device_array(array, backend):
                captured.append((item, array))
        chosen = tuple(item for item, _ in captured)
        plan = _arrays.plan_device_capture([array for _, array in captured],
                                           [self._sources[item].key for item in chosen], backend) if captured else None
        remaining = list(self._layout.piece_counts)
        for item in chosen:
            remaining[self._layout.item_holders[item]] = 0
        return DeviceCaptureCache(
            arrays=tuple(arrays),
            plan=plan,
            items=chosen,
            remaining=tuple(remaining),
            slots=dict(zip(chosen, plan.slots)) if plan is not None else {},
        )

    def _open_capture(self, state: _FileState, item: int, begin: int, length: int) -> memoryview:
        """A view of up to ``length`` bytes of a captured value, held until :meth:`_close_views`.

        A pinned chunk is acquired once, up to its end, for all the pieces of a batch it holds:
        packed small values lie one after another in both the pack and the data file, so a batch
        of thousands of them costs a few acquisitions, not one each.
        """
        index, base = self._capture_slots[item]
        captures = self._captures
        if self._closed or index >= len(captures):
            raise WriteAbortedError("the write was aborted")
        capture = captures[index]
        offset = base + begin
        views = state.open_views
        if views:
            last = views[-1]
            if last[0] is capture and last[1] + last[3] == offset and last[3] < len(last[2]):
                taken = min(length, len(last[2]) - last[3])
                last[3] += taken
                return last[2][offset - last[1] : offset - last[1] + taken]
        try:
            view = capture.acquire(offset, capture.nbytes - offset)  # to the chunk's end
        except _cuda.DeviceCopyError as exc:  # name the key: a pack's label names only a few
            raise _cuda.DeviceCopyError(f"copying {self._sources[item].key!r} from the device failed: {exc}") from exc
        except RuntimeError:
            if self._closed:  # closed under us: the capture is gone
                raise WriteAbortedError("the write was aborted") from None
            raise
        taken = min(length, len(view))
        views.append([capture, offset, view, taken])
        return view[:taken]

    def _wait_for_device(self, index: int, state: _FileState, limit: int) -> None:
        """Before locking file ``index``: wait until the device bytes of its next batch are on the host.

        Otherwise the writer would wait for the device while holding the lock, and a host value's
        mutation hook queued on that lock would wait for GPU work too. Only the file's own writer
        moves ``state.piece``/``state.offset``, so reading them unlocked here is safe.
        """
        slots = self._capture_slots
        if not slots:
            return
        captures = self._captures
        if not captures:  # closed
            return
        pieces = self._plan.files[index].pieces
        current, first, budget = state.piece, state.offset, limit
        run: list = []  # [capture, start, stop] of consecutive bytes of one capture
        while current < len(pieces) and budget > 0:
            piece = pieces[current]
            length = min(piece.length - first, budget)
            slot = slots.get(piece.item)
            if slot is not None and current not in state.staged:
                capture, start = captures[slot[0]], slot[1] + piece.item_offset + first
                if run and run[0] is capture and run[2] == start:
                    run[2] += length
                else:
                    if run:
                        run[0].wait(run[1], run[2] - run[1])
                    run = [capture, start, start + length]
            budget -= length
            current, first = current + 1, 0
        if run:
            run[0].wait(run[1], run[2] - run[1])

    @staticmethod
    def _close_views(state: _FileState) -> None:
        """The batch is out (or abandoned): let its pinned buffers go back to the pool."""
        views, state.open_views = state.open_views, []
        for capture, offset, _view, used in views:
            capture.release(offset, used)

    # ------------------------------------------------------------------ guards
    def install_guards(self) -> None:
        """Register the mutation hooks (call before returning from ``start_write``)."""
        layout = self._layout
        for add_many, table in layout.bulk_tables:
            self._removers.append(add_many(table, self._stage_holder))
        for index in layout.single:
            if not self._remaining[index]:
                continue  # captured from the device
            holder = layout.holders[index]
            hook = self._single_hook(index)
            holder._add_mutation_hook(hook)
            self._single_hooks[index] = hook

    def _single_hook(self, index: int) -> Callable[[Any], None]:
        def before_mutation(_holder: Any) -> None:
            self._stage_holder(index)

        return before_mutation

    def _stage_holder(self, holder_index: int) -> None:
        """The hook: copy every byte of the holder not yet written, before it changes."""
        if self._closed or not self._remaining[holder_index]:
            return
        in_loop = running_loop() is self._loop
        for file_index, piece_indices in self._layout.holder_pieces[holder_index]:
            state = self._files[file_index]
            pieces = self._plan.files[file_index].pieces
            cursor = state.cursor
            need = sum(
                pieces[p].length - max(0, cursor - pieces[p].file_offset)
                for p in piece_indices
                if not state.captured[p] and cursor < pieces[p].file_offset + pieces[p].length
            )
            if not need:
                continue
            # Budget first, file lock second, never the other way round: nobody waits for budget
            # while holding a file lock, and budget is freed by the writer once a file is durable,
            # which needs no budget. So this wait always ends (each file fits the budget).
            try:
                if in_loop:
                    self._budget.force_acquire(need)  # cannot block the loop that frees budget
                else:
                    self._budget.acquire_from_thread(need, self._loop)
            except BudgetClosedError:
                return  # the write is over; the mutation no longer needs protecting
            copied = 0
            try:
                copied = self._copy_pieces(file_index, piece_indices)
            except BaseException as exc:
                self._fail(exc)
                return
            finally:
                if need > copied:
                    self._release_threadsafe(need - copied)

    def _copy_pieces(self, file_index: int, piece_indices: Sequence[int]) -> int:
        state = self._files[file_index]
        pieces = self._plan.files[file_index].pieces
        started = time.perf_counter()
        copied = 0
        newly: list[int] = []
        with state.gate:
            state.waiting += 1
        with state.lock:
            with state.gate:
                state.waiting -= 1
            state.turn.notify_all()
            if self._closed:
                return 0
            for p in piece_indices:
                if state.captured[p]:
                    continue
                piece = pieces[p]
                first = max(0, state.cursor - piece.file_offset)
                if first >= piece.length:
                    continue
                blocks = []
                for start in range(first, piece.length, STAGING_BLOCK_BYTES):
                    length = min(STAGING_BLOCK_BYTES, piece.length - start)
                    block = self._pool.take(length)
                    state.buffers.append(block)
                    copy_bytes(memoryview(block), self._item_bytes(piece.item, piece.item_offset + start, length))
                    blocks.append(block)
                state.staged[p] = (first, blocks)
                state.captured[p] = 1
                copied += piece.length - first
                newly.append(p)
            state.staged_bytes += copied
        if copied:
            with self._count_lock:
                self.staging_seconds += time.perf_counter() - started
                self.bytes_staged_by_hooks += copied
                if file_index not in self._hooked_files:
                    self._hooked_files.add(file_index)
                    self.files_staged_by_hooks += 1
        self._captured(file_index, newly)
        return copied

    def _captured(self, file_index: int, piece_indices: Sequence[int]) -> None:
        """Count pieces written or copied; a holder with none left loses its guard."""
        if not piece_indices:
            return
        owners = self._layout.piece_holders[file_index]
        spent = []
        with self._count_lock:
            remaining = self._remaining
            for p in piece_indices:
                owner = owners[p]
                if owner >= 0 and remaining[owner] > 0:
                    remaining[owner] -= 1
                    if not remaining[owner]:
                        spent.append(owner)
        for owner in spent:
            hook = self._single_hooks.pop(owner, None)
            if hook is not None:
                self._layout.holders[owner]._remove_mutation_hook(hook)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def _release_threadsafe(self, nbytes: int) -> None:
        if running_loop() is self._loop:
            self._budget.release(nbytes)
            return
        with contextlib.suppress(RuntimeError):  # the loop has shut down: nobody is listening
            self._loop.call_soon_threadsafe(self._budget.release, nbytes)

    # ------------------------------------------------------------------ serving files
    def content(self, index: int) -> FileContent:
        """The bytes of file ``index`` as a :class:`~asyncckpt.io.storage.StreamedValue`."""
        return FileContent(self, index)

    def crcs(self, index: int) -> tuple[int, ...]:
        """The CRC-32C of each piece of file ``index`` (complete once its content was consumed)."""
        return tuple(self._files[index].crcs)

    def _view(self, item: int) -> memoryview | None:
        """The flat view of a source, taken once per write (a holder's array is asked for once)."""
        try:
            return self._views[item]
        except KeyError:
            pass
        with self._views_lock:
            if item not in self._views:
                self._views[item] = self._sources[item].flat_view()
            return self._views[item]

    def _item_bytes(self, item: int, begin: int, length: int) -> memoryview:
        view = self._view(item)
        if view is None:  # a device or strided array: only this range is copied to the host
            return self._sources[item].byte_view(begin, begin + length)
        return view[begin : begin + length]

    def _piece_bytes(self, state: _FileState, piece_index: int, piece, first: int, length: int) -> memoryview:
        """Up to ``length`` bytes of a piece from byte ``first`` (fewer at the end of a staging block)."""
        staged = state.staged.get(piece_index)
        if staged is not None:
            start, blocks = staged
            block, offset = divmod(first - start, STAGING_BLOCK_BYTES)
            return memoryview(blocks[block])[offset : offset + length]
        if piece.item in self._capture_slots:
            return self._open_capture(state, piece.item, piece.item_offset + first, length)
        return self._item_bytes(piece.item, piece.item_offset + first, length)

    def _await_turn(self, state: _FileState) -> None:
        """With ``state.lock`` held: let queued hooks go first, then fail if the write is over."""
        while state.waiting:  # hooks first: they wait for at most one batch
            state.turn.wait()
        if self.error is not None:
            raise self.error
        if self._closed:
            raise WriteAbortedError("the write was aborted")

    def _take(self, index: int, state: _FileState, limit: int) -> tuple[list[memoryview], list[int], int, int]:
        """With ``state.lock`` held: views of the next ``limit`` bytes at most, their CRCs counted.

        Returns ``(views, pieces completed, next piece, its first byte)``; :meth:`_advance` makes
        that position current once the views have been consumed.
        """
        pieces = self._plan.files[index].pieces
        count = len(pieces)
        crcs = state.crcs
        checksum = crc32c.crc32c
        current, first = state.piece, state.offset
        batch: list[memoryview] = []
        done: list[int] = []
        nbytes = 0
        while current < count and nbytes < limit and len(batch) < _BATCH_BUFFERS:
            piece = pieces[current]
            view = self._piece_bytes(state, current, piece, first, min(piece.length - first, limit - nbytes))
            length = len(view)
            crcs[current] = checksum(view, crcs[current])
            batch.append(view)
            nbytes += length
            first += length
            if first == piece.length:
                done.append(current)
                current += 1
                first = 0
        return batch, done, current, first

    def _advance(self, index: int, state: _FileState, done: list[int], current: int, first: int) -> list[int]:
        """With ``state.lock`` held: the bytes up to ``(current, first)`` are out; return newly captured pieces."""
        file = self._plan.files[index]
        state.piece, state.offset = current, first
        state.cursor = file.size if current == len(file.pieces) else file.pieces[current].file_offset + first
        captured = [p for p in done if not state.captured[p]]
        for p in captured:
            state.captured[p] = 1
        return captured

    def _segments(self, index: int) -> Iterator[list[memoryview]]:
        """Batches of file ``index``; each holds its file's lock until the consumer moves on."""
        state = self._files[index]
        count = len(self._plan.files[index].pieces)
        while True:
            self._wait_for_device(index, state, self._segment_bytes)
            with state.lock:
                self._await_turn(state)
                if state.piece == count:
                    return
                try:
                    batch, done, current, first = self._take(index, state, self._segment_bytes)
                    yield batch  # the consumer writes the batch while we hold the lock
                finally:
                    self._close_views(state)
                captured = self._advance(index, state, done, current, first)
            self._captured(index, captured)
            self._drop_spent_sources(index, done)

    def _fill(self, index: int, buffer: memoryview) -> int:
        """Copy the next bytes of file ``index`` into ``buffer``; 0 at the end.

        The lock is held only while copying, so a consumer writing the copy (a direct write)
        never makes a mutation wait for its device.
        """
        state = self._files[index]
        self._wait_for_device(index, state, min(len(buffer), self._segment_bytes))
        with state.lock:
            self._await_turn(state)
            if state.piece == len(self._plan.files[index].pieces):
                return 0
            try:
                batch, done, current, first = self._take(index, state, min(len(buffer), self._segment_bytes))
                position = 0
                for view in batch:
                    copy_bytes(buffer[position : position + len(view)], view)
                    position += len(view)
            finally:
                self._close_views(state)
            captured = self._advance(index, state, done, current, first)
        self._captured(index, captured)
        self._drop_spent_sources(index, done)
        return position

    def _drop_spent_sources(self, file_index: int, done: list[int]) -> None:
        """Forget owned copies of plain arrays once all their bytes are written (frees them early)."""
        pieces = self._plan.files[file_index].pieces
        for p in done:
            item = pieces[p].item
            source = self._sources[item]
            if source.kind is not SourceKind.ARRAY:
                continue
            with self._count_lock:
                left = self._array_pieces.get(item, len(self._plan.extents[item])) - 1
                self._array_pieces[item] = left
            if not left:
                self._views.pop(item, None)
                source.value = None

    def file_written(self, index: int) -> None:
        """File ``index`` is durable: drop its staging copies and return their budget (on the loop)."""
        state = self._files[index]
        with state.lock:
            staged, state.staged_bytes = state.staged_bytes, 0
            buffers, state.buffers = state.buffers, []
            state.staged = {}
        for buffer in buffers:
            self._pool.give(buffer, self._loop)
        if staged:
            self._release_threadsafe(staged)

    def close(self) -> None:
        """End the snapshot: remove every guard and wake anyone waiting for budget."""
        self._closed = True
        if running_loop() is self._loop:
            self._budget.close()
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._budget.close)
        removers, self._removers = self._removers, []
        for remove in removers:
            remove()
        hooks, self._single_hooks = self._single_hooks, {}
        for index, hook in hooks.items():
            self._layout.holders[index]._remove_mutation_hook(hook)
        captures, self._captures = self._captures, []
        for capture in captures:  # pinned buffers and device copies go back now
            capture.close()
