"""The write and read executors: the I/O side's entry points for the object model.

Write pipeline, one :class:`WriteHandle` per ``start_write``::

    start_write (caller's thread)      validate entries and plan files (or take a PreparedWrite),
                                       copy bytes/plain arrays, guard live sources   -> returns at once
    background (runtime loop)
      open      open the folder's backend, create + lock  P.data-<nonce>/, clean debris
      write     up to max_concurrent_writes files in flight; each file streams from the sources'
                memory (snapshot.FileContent), CRC-32C computed per piece as the bytes go out;
                a mutation hook first copies its holder's unwritten bytes (staging budget)
      commit    wait for the previous in-process write to the same path (FIFO), then publish
                P.index atomically (the commit), then delete the replaced data directory
      callbacks on_commit callbacks in order, in a worker thread
      report    on_stats (WriteStats), in a worker thread
      resolve   the handle: the path, or the first exception of any step

Nothing is committed unless every data file was written; an uncommitted data directory is
removed (best effort) or left as debris that the next write into the folder removes.

Read pipeline: :func:`open_reader` parses and validates ``P.index``; reads coalesce nearby
extents into byte-range reads, run up to ``max_concurrent_reads`` at a time straight into the
destination arrays, and verify every extent's CRC-32C and each value's whole CRC-32C before
returning. A device destination is filled window by window (the stager's chunk size): each window
is read into a pinned buffer, checksummed, and uploaded asynchronously while the next one is read.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np

from asyncckpt import _arrays, _cuda
from asyncckpt.io import coordination
from asyncckpt._runtime import Runtime, get_runtime, running_loop
from asyncckpt.io.coordination import MultiWorker
from asyncckpt.errors import CheckpointTimeoutError, CorruptCheckpointError, NotFoundError
from asyncckpt.format import (
    BYTES_DTYPE,
    OBJECT_GRAPH_KEY,
    Extent,
    Manifest,
    TensorRecord,
    TensorSpec,
    crc32c_combine,
    data_dir_name,
    MAX_INDEX_BYTES,
    index_name,
    index_tmp_name,
    lock_name,
    object_graph_bytes,
    parse_data_dir_name,
    parse_index_tmp_name,
    parse_lock_name,
    parse_manifest,
    parse_section,
    read_data_dirs,
    Section,
)
from asyncckpt.io.plan import PlanItem, ReadRange, WritePlan, plan_read, plan_write
from asyncckpt.io.snapshot import (
    ByteBudget,
    GuardLayout,
    SaveEntry,
    Snapshot,
    Source,
    prepare_source,
    prepare_sources,
)
from asyncckpt.io.storage import Backend, Storage, TruncatedError, default_storage

__all__ = [
    "MultiWorker",
    "SaveEntry",
    "TensorSpec",
    "WriteSettings",
    "ReadSettings",
    "WriteMetrics",
    "WriteStats",
    "WriteHandle",
    "PreparedWrite",
    "prepare_write",
    "CheckpointReader",
    "start_write",
    "open_reader",
    "aopen_reader",
    "checkpoint_exists",
    "delete_checkpoint",
    "wait_for_pending_writes",
    "await_pending_writes",
    "has_pending_writes",
    "VerifyReport",
]

logger = logging.getLogger("asyncckpt")

MiB = 1 << 20


def _require_positive_int(owner: str, name: str, value: Any) -> None:
    if type(value) is not int or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class WriteSettings:
    """Knobs of one write.

    Parameters
    ----------
    staging_budget_bytes:
        Most bytes copied by mutation hooks (values changed while the write runs) and not yet
        durable at any time, and the most page-locked host memory that values on a GPU are copied
        through (see :mod:`asyncckpt.io.snapshot` for the full memory bound). Must be at least
        ``chunk_bytes`` and ``pack_bytes``.
    chunk_bytes:
        Largest data file a big array is split into.
    pack_bytes:
        Target size of a file of packed small arrays.
    small_array_bytes:
        Arrays smaller than this are packed; at most ``pack_bytes``.
    max_concurrent_writes:
        Data files in flight at once.
    storage:
        Where to write (default: :func:`~asyncckpt.io.storage.default_storage`, the filesystem).
    runtime:
        The loop to run on (default: the process-wide runtime).
    device_backend:
        The :class:`~asyncckpt._cuda.DeviceBackend` whose arrays are captured on the device at
        ``start_write`` (default: CUDA arrays, through CuPy).
    multi_worker:
        A :class:`~asyncckpt.io.coordination.MultiWorker`: this write is one worker's part of a
        save by several workers to a shared filesystem (each writes its share of the bytes; the
        chief merges and commits). ``None`` or ``count == 1``: a single writer.
    """

    staging_budget_bytes: int = 256 * MiB
    chunk_bytes: int = 64 * MiB
    pack_bytes: int = 16 * MiB
    small_array_bytes: int = 1 * MiB
    max_concurrent_writes: int = 4
    storage: Storage | None = None
    runtime: Runtime | None = None
    device_backend: Any = None
    multi_worker: MultiWorker | None = None

    def __post_init__(self) -> None:
        if self.multi_worker is not None and not isinstance(self.multi_worker, MultiWorker):
            raise TypeError(
                f"WriteSettings.multi_worker must be an asyncckpt.MultiWorker or None, got {self.multi_worker!r}"
            )
        for name in ("staging_budget_bytes", "chunk_bytes", "pack_bytes", "small_array_bytes", "max_concurrent_writes"):
            _require_positive_int("WriteSettings", name, getattr(self, name))
        if self.staging_budget_bytes < max(self.chunk_bytes, self.pack_bytes):
            raise ValueError(
                f"WriteSettings.staging_budget_bytes ({self.staging_budget_bytes}) must be at least "
                f"chunk_bytes ({self.chunk_bytes}) and pack_bytes ({self.pack_bytes}): one data file "
                "must fit in the budget"
            )
        if self.small_array_bytes > self.pack_bytes:
            raise ValueError(
                f"WriteSettings.small_array_bytes ({self.small_array_bytes}) must not exceed "
                f"pack_bytes ({self.pack_bytes})"
            )


@dataclass(frozen=True)
class ReadSettings:
    """Knobs of reads.

    Parameters
    ----------
    max_concurrent_reads:
        Byte-range reads in flight at once.
    coalesce_gap_bytes:
        Extents of one file at most this far apart are fetched by one read.
    max_read_bytes:
        Upper bound of a coalesced read (a single larger extent is still read whole).
    storage, runtime:
        As in :class:`WriteSettings`.
    """

    max_concurrent_reads: int = 8
    coalesce_gap_bytes: int = 1 * MiB
    max_read_bytes: int = 64 * MiB
    storage: Storage | None = None
    runtime: Runtime | None = None

    def __post_init__(self) -> None:
        _require_positive_int("ReadSettings", "max_concurrent_reads", self.max_concurrent_reads)
        _require_positive_int("ReadSettings", "max_read_bytes", self.max_read_bytes)
        if type(self.coalesce_gap_bytes) is not int or self.coalesce_gap_bytes < 0:
            raise ValueError(f"ReadSettings.coalesce_gap_bytes must be a non-negative int, got {self.coalesce_gap_bytes!r}")


@dataclass
class WriteMetrics:
    """What one write did, filled in as it runs. Seconds are wall-clock.

    ``snapshot_seconds`` is the time ``start_write`` took (the caller's stall); ``staging_seconds``
    and the ``*_staged_by_hooks`` counts cover copies mutation hooks made of values about to change.
    """

    bytes_written: int = 0
    files_written: int = 0
    files_staged_by_hooks: int = 0
    bytes_staged_by_hooks: int = 0
    snapshot_seconds: float = 0.0
    staging_seconds: float = 0.0
    writing_seconds: float = 0.0
    commit_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass(frozen=True)
class WriteStats:
    """What one finished write did, per stage: handed to ``start_write(on_stats=...)``.

    Attributes
    ----------
    path:
        The checkpoint path.
    tensors, bytes_written, files_written:
        Values saved, data bytes written and data files written.
    bytes_staged_by_hooks:
        Bytes copied because their value was changed while the write ran.
    snapshot_seconds:
        The ``start_write`` call: validation, layout and guards (how long the caller stalled).
    write_seconds:
        From the first data file's write starting to the last one durable.
    commit_seconds:
        Writing and publishing ``P.index`` durably.
    total_seconds:
        From ``start_write`` being called to the write ending.
    error:
        The exception that failed the write, or ``None`` if it committed.
    """

    path: str
    tensors: int
    bytes_written: int
    files_written: int
    bytes_staged_by_hooks: int
    snapshot_seconds: float
    write_seconds: float
    commit_seconds: float
    total_seconds: float
    error: Exception | None = None

    @property
    def write_bandwidth(self) -> float:
        """Data bytes per second of :attr:`write_seconds` (0 when nothing was written)."""
        return self.bytes_written / self.write_seconds if self.write_seconds > 0 else 0.0


class WriteHandle:
    """A write in progress. Resolves to the checkpoint path once committed and called back."""

    def __init__(self, path: str, key: str) -> None:
        self.path = path
        self.metrics = WriteMetrics()
        self._key = key
        self._worker: int | None = None  # this write's worker number in a multi-worker save
        self._future: concurrent.futures.Future = concurrent.futures.Future()

    def done(self) -> bool:
        """True once the write has committed and run its callbacks, or failed."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> str:
        """Block until the write finishes; return the path or re-raise the write's exception."""
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block until the write finishes; return its exception, or ``None`` on success."""
        return self._future.exception(timeout)

    async def wait(self) -> str:
        """Await the write from any event loop without blocking it; same outcome as :meth:`result`.

        Cancelling the awaiting task does not cancel the write.
        """
        return await asyncio.shield(asyncio.wrap_future(self._future))

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<WriteHandle {self.path!r} {state}>"


# ---------------------------------------------------------------------------------------------
# The registry of in-process pending writes


class _Registry:
    """Pending writes by canonical path, in start order."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._pending: dict[str, list[WriteHandle]] = {}
        self._calling_back = threading.local()

    def add(self, handle: WriteHandle) -> list[WriteHandle]:
        """Register ``handle``; return the earlier pending writes to the same path it must follow.

        Writes of different workers of a multi-worker save (threads playing several workers) do
        not wait for each other: each worker's writes to a path are ordered among themselves. A
        single-writer write and any multi-worker write to one path are ordered both ways.
        """
        mine = handle._worker
        with self._guard:
            queue = self._pending.setdefault(handle._key, [])
            previous = [h for h in queue if mine is None or h._worker is None or h._worker == mine]
            queue.append(handle)
        handle._future.add_done_callback(lambda _: self._remove(handle))
        return previous

    def _remove(self, handle: WriteHandle) -> None:
        with self._guard:
            queue = self._pending.get(handle._key, [])
            if handle in queue:
                queue.remove(handle)
            if not queue:
                self._pending.pop(handle._key, None)

    def under(self, key: str) -> list[WriteHandle]:
        """Pending writes to ``key`` or below folder ``key``, minus those the caller cannot wait for.

        A callback of write W runs before W resolves, and later writes to W's path wait for W;
        waiting for any of those from inside the callback would deadlock, so they are skipped.
        So are writes of a multi-worker save made for another worker than the calling thread's
        last one (threads of one process playing several workers): such a write may wait for
        something the calling thread has yet to do (a thread about to play worker 1 must not
        wait for the chief's commit that needs worker 1's section).
        """
        folder = key.rstrip("/") + "/"
        current = getattr(self._calling_back, "handle", None)
        worker = getattr(_thread_worker, "index", None)
        found = []
        with self._guard:
            for path, queue in self._pending.items():
                if path != key and not path.startswith(folder):
                    continue
                if current is not None and current in queue:
                    queue = queue[: queue.index(current)]
                found.extend(h for h in queue if h._worker is None or h._worker == worker)
        return found

    def all(self) -> list[WriteHandle]:
        """Every pending write."""
        with self._guard:
            return [handle for queue in self._pending.values() for handle in queue]

    @contextlib.contextmanager
    def calling_back(self, handle: WriteHandle):
        self._calling_back.handle = handle
        try:
            yield
        finally:
            self._calling_back.handle = None


_registry = _Registry()
# The worker (MultiWorker.index) of the last multi-worker write each thread started.
_thread_worker = threading.local()


def _finish_pending_writes_at_exit() -> None:
    """Let writes still in flight at interpreter exit finish instead of dying with the loop thread.

    Runs twice: from ``threading._register_atexit`` where available (before non-daemon threads are
    joined) and from ``atexit`` (after, for saves those threads started meanwhile). Errors stay
    with the handles' owners.
    """
    for handle in _registry.all():
        with contextlib.suppress(BaseException):
            handle._future.result()


def _forget_after_fork() -> None:
    # The child inherits the parent's pending handles but not the threads completing them.
    global _registry
    _registry = _Registry()


# The thread pool registers its own exit hook when its module is first imported; import it now so
# that hook is registered first and therefore runs after ours (they run in reverse order).
importlib.import_module("concurrent.futures.thread")
getattr(threading, "_register_atexit", atexit.register)(_finish_pending_writes_at_exit)
# And once more after the non-daemon threads have been joined: a save one of them started while the
# program was ending is finished too (the runtime's own pool still serves it then).
atexit.register(_finish_pending_writes_at_exit)
os.register_at_fork(after_in_child=_forget_after_fork)


def _storage_of(settings) -> Storage:
    return settings.storage if settings.storage is not None else default_storage()


def _runtime_of(settings) -> Runtime:
    return settings.runtime if settings.runtime is not None else get_runtime()


def _unwrap(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _unwrap(first) if isinstance(first, BaseExceptionGroup) else first


async def _quietly_wait(handle: WriteHandle) -> None:
    with contextlib.suppress(BaseException):
        await handle.wait()


def wait_for_pending_writes(path, *, storage: Storage | None = None) -> None:
    """Block until every in-process write to ``path``, or to a checkpoint under folder ``path``, ends.

    Does not raise the writes' errors: those belong to whoever holds their handles.
    """
    key = (storage or default_storage()).canonical(path)
    for handle in _registry.under(key):
        with contextlib.suppress(BaseException):
            handle._future.result()


def has_pending_writes(path, *, storage: Storage | None = None) -> bool:
    """Whether an in-process write to ``path`` (or below folder ``path``) has not finished yet."""
    key = (storage or default_storage()).canonical(path)
    return any(not handle.done() for handle in _registry.under(key))


async def await_pending_writes(path, *, storage: Storage | None = None) -> None:
    """The ``async`` twin of :func:`wait_for_pending_writes`, usable from any event loop."""
    key = (storage or default_storage()).canonical(path)
    for handle in _registry.under(key):
        await _quietly_wait(handle)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class PreparedWrite:
    """Validated entries, their file layout and their guard layout: a write minus its values' bytes.

    Built by :func:`prepare_write`; :meth:`with_values` swaps in new values for some entries and
    keeps the layout when their sizes did not change, so a program that saves the same objects
    again and again pays for validation and planning once. Pass it to :func:`start_write` in place
    of the entries.
    """

    sources: tuple[Source, ...]
    plan: WritePlan
    layout: GuardLayout
    object_graph: dict
    plan_settings: tuple[int, int, int]  # small_array_bytes, pack_bytes, chunk_bytes
    array_items: tuple[int, ...]  # sources that are owned copies (copied again for every write)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(source.key for source in self.sources)

    def with_values(self, values: Mapping[int, Any]) -> PreparedWrite:
        """A copy whose entries ``index`` take ``values[index]`` (taken now, like ``start_write``).

        Keys stay; layout and guards are rebuilt only when a size or a snapshot source changed.
        """
        sources = list(self.sources)
        resized = regarded = False
        arrays = set(self.array_items)
        for index, value in values.items():
            old = sources[index]
            new = prepare_source(old.key, value)
            resized = resized or new.nbytes != old.nbytes
            if "holder" in (old.kind, new.kind) and (old.kind != new.kind or old.value is not new.value):
                regarded = True
            if new.kind == "array":
                arrays.add(index)
            else:
                arrays.discard(index)
            sources[index] = new
        plan = _plan(sources, self.plan_settings) if resized else self.plan
        layout = GuardLayout(sources, plan) if resized or regarded else self.layout
        return PreparedWrite(tuple(sources), plan, layout, self.object_graph, self.plan_settings,
                             tuple(sorted(arrays)))


def _plan_settings(settings: WriteSettings) -> tuple[int, int, int]:
    return settings.small_array_bytes, settings.pack_bytes, settings.chunk_bytes


def _plan(sources: Sequence[Source], plan_settings: tuple[int, int, int]) -> WritePlan:
    small, pack, chunk = plan_settings
    return plan_write(
        [PlanItem(source.key, source.nbytes) for source in sources],
        small_array_bytes=small,
        pack_bytes=pack,
        chunk_bytes=chunk,
    )


def _check_settings(settings: WriteSettings | None) -> WriteSettings:
    settings = settings if settings is not None else WriteSettings()
    if not isinstance(settings, WriteSettings):
        raise TypeError(f"settings must be a WriteSettings, got {type(settings).__name__}")
    return settings


def prepare_write(
    entries: Sequence[SaveEntry], object_graph: dict, *, settings: WriteSettings | None = None
) -> PreparedWrite:
    """Validate ``entries`` and ``object_graph`` and lay the entries out into data files.

    ``bytes`` values are taken and plain arrays copied now; snapshot sources are only inspected.
    Raises ``ValueError``/``TypeError`` as :func:`start_write` does.
    """
    settings = _check_settings(settings)
    if not isinstance(object_graph, dict):
        raise TypeError(f"object_graph must be a dict, got {type(object_graph).__name__}")
    try:
        json.dumps(object_graph, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"object_graph is not JSON-serialisable: {exc}") from None
    sources = prepare_sources(entries)
    plan_settings = _plan_settings(settings)
    plan = _plan(sources, plan_settings)
    arrays = tuple(index for index, source in enumerate(sources) if source.kind == "array")
    return PreparedWrite(tuple(sources), plan, GuardLayout(sources, plan), object_graph, plan_settings, arrays)


def start_write(
    prefix,
    entries: Sequence[SaveEntry] | PreparedWrite,
    object_graph: dict | None = None,
    *,
    settings: WriteSettings | None = None,
    on_commit: Sequence[Callable[[], None]] = (),
    on_stats: Callable[[WriteStats], None] | None = None,
) -> WriteHandle:
    """Start writing a checkpoint at ``prefix``; return once its contents are fixed.

    Parameters
    ----------
    prefix:
        The checkpoint path ``P`` (``str`` or ``os.PathLike``). Data goes to ``P.data-<nonce>/``;
        ``P.index`` is written last and is the commit marker. An existing checkpoint at ``P`` stays
        readable until the new one is committed, then its data directory is deleted.
    entries:
        One :class:`SaveEntry` per key, or a :class:`PreparedWrite` (which holds its object graph).
    object_graph:
        A JSON-serialisable dict stored in the manifest (``None`` with a :class:`PreparedWrite`).
    settings:
        :class:`WriteSettings`.
    on_commit:
        Callables run in order, in a worker thread, after ``P.index`` is durable. An exception
        from one of them fails the handle (the checkpoint stays committed).
    on_stats:
        Called once the write has ended (committed and called back, or failed), in a worker
        thread, with its :class:`WriteStats`. Its exceptions are logged, never raised.

    Returns
    -------
    WriteHandle
        Whose ``result()`` is the path once committed and called back.

    Raises
    ------
    ValueError, TypeError
        Bad entries (duplicate or reserved key, unsupported value or dtype), a non-JSON object
        graph, a path naming a folder. Errors of the background write surface through the handle.
    """
    started = time.perf_counter()
    settings = _check_settings(settings)
    storage = _storage_of(settings)
    folder, stem = storage.split(prefix)
    if isinstance(entries, PreparedWrite):
        if object_graph is not None:
            raise TypeError("pass object_graph to prepare_write, not with a PreparedWrite")
        prepared = entries
        if prepared.plan_settings != _plan_settings(settings):
            prepared = prepare_write([SaveEntry(s.key, s.value) for s in prepared.sources], prepared.object_graph,
                                     settings=settings)
    else:
        prepared = prepare_write(entries, object_graph, settings=settings)
    team = None
    worker = settings.multi_worker
    if worker is not None and worker.count > 1:
        team, prepared = _share_of(prepared, worker, stem)
    callbacks = tuple(on_commit)
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"on_commit callbacks must be callable, got {callback!r}")
    if on_stats is not None and not callable(on_stats):
        raise TypeError(f"on_stats must be callable, got {on_stats!r}")
    sources = prepared.sources
    if prepared.array_items:  # owned copies are dropped as they are written: give this write its own
        sources = list(sources)
        for index in prepared.array_items:
            sources[index] = dataclasses.replace(sources[index])
    runtime = _runtime_of(settings)
    handle = WriteHandle(os.fspath(prefix), storage.canonical(prefix))
    job = _WriteJob(handle, storage, folder, stem, sources, prepared, callbacks, on_stats, settings, runtime.loop)
    job.team = team
    if team is not None:
        handle._worker = _thread_worker.index = team.worker.index
    try:
        job.snapshot.capture_device_values(settings.staging_budget_bytes)
        job.snapshot.install_guards()
    except BaseException:
        job.snapshot.close()
        raise
    previous = _registry.add(handle)
    job.snapshot_seconds = time.perf_counter() - started
    try:
        future = runtime.submit(job.run(previous, started))
    except BaseException as exc:
        job.snapshot.close()
        handle._future.set_exception(exc)
        raise
    _chain(future, handle._future)
    return handle


@dataclass(frozen=True)
class _Team:
    """What one worker of a multi-worker save knows about the whole save."""

    worker: MultiWorker
    order: tuple[str, ...]  # every key, in the save's order
    owners: Mapping[str, int]  # key -> worker writing it
    specs: Mapping[str, TensorRecord]  # key -> dtype, shape and size (no extents)

    def share(self, worker: int) -> dict[str, TensorRecord]:
        return {key: self.specs[key] for key in self.order if self.owners[key] == worker}

    def spec_items(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        return [(key, self.specs[key].dtype, self.specs[key].shape, self.specs[key].nbytes) for key in self.order]


def _share_of(prepared: PreparedWrite, worker: MultiWorker, stem: str) -> tuple[_Team, PreparedWrite]:
    """The save as a whole, and the part of it this worker writes (its sources, laid out alone)."""
    sources = prepared.sources
    owners = coordination.assign([(source.key, source.nbytes) for source in sources], worker.count)
    specs = {source.key: TensorRecord(source.dtype, source.shape, source.nbytes, 0, ()) for source in sources}
    team = _Team(worker, prepared.keys, owners, specs)
    mine = [index for index, source in enumerate(sources) if owners[source.key] == worker.index]
    own = tuple(sources[index] for index in mine)
    plan = _plan(own, prepared.plan_settings)
    arrays = set(prepared.array_items)
    own_arrays = tuple(position for position, index in enumerate(mine) if index in arrays)
    return team, PreparedWrite(own, plan, GuardLayout(own, plan), prepared.object_graph, prepared.plan_settings,
                               own_arrays)


def _chain(source: concurrent.futures.Future, target: concurrent.futures.Future) -> None:
    def copy(done: concurrent.futures.Future) -> None:
        if done.cancelled():
            target.set_exception(concurrent.futures.CancelledError("the write was cancelled"))
        elif done.exception() is not None:
            target.set_exception(done.exception())
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)


class _WriteJob:
    """The background half of one ``start_write``."""

    def __init__(self, handle, storage, folder, stem, sources, prepared, callbacks, on_stats, settings, loop):
        self.handle = handle
        self.storage: Storage = storage
        self.folder = folder
        self.stem = stem
        self.sources = sources
        self.plan: WritePlan = prepared.plan
        self.object_graph = prepared.object_graph
        self.callbacks = callbacks
        self.on_stats = on_stats
        self.settings: WriteSettings = settings
        self.budget = ByteBudget(settings.staging_budget_bytes)
        self.snapshot = Snapshot(sources, prepared.plan, self.budget, loop, prepared.layout,
                                 device_backend=settings.device_backend)
        self.snapshot_seconds = 0.0
        self._write_span = [float("inf"), 0.0]
        self.team: _Team | None = None
        self.save_id = ""
        self.claims: list[str] = []  # sections this chief renamed to its own claim names

    async def run(self, previous: list[WriteHandle], started: float) -> str:
        metrics = self.handle.metrics
        error: BaseException | None = None
        try:
            if self.snapshot.captures_device_values:
                await asyncio.to_thread(self.snapshot.start_device_copies)
            backend = await self.storage.open(self.folder)
            await backend.prepare()
            nonce, lock = await _create_data_dir(backend, self.stem)
            data_dir = data_dir_name(self.stem, nonce)
            committed = False
            try:
                if backend.cleans_debris:
                    await _clean_debris(backend, exclude=data_dir)
                await self._write_files(backend, data_dir)
                manifest = self._manifest(data_dir)
                for earlier in previous:
                    await _quietly_wait(earlier)
                if self.team is not None:
                    self.save_id = coordination.save_id(self.stem, self.team.worker.count, self.team.spec_items(),
                                                        await _index_token(backend, self.stem))
                if self.team is not None and not self.team.worker.is_chief:
                    # Once published, the section may be merged at any moment: from here on the
                    # data directory is left to the chief's commit or, failing that, to cleanup.
                    committed = True
                    await self._publish_and_wait(backend, data_dir, nonce, manifest)
                else:
                    if self.team is not None:
                        manifest = await self._gather(backend, nonce, manifest)
                    replaced = await _referenced_data_dirs(backend, self.stem)
                    commit_started = time.perf_counter()
                    await backend.commit(index_name(self.stem), index_tmp_name(self.stem, nonce), manifest.to_json())
                    committed = True
                    metrics.commit_seconds = time.perf_counter() - commit_started
                    for old in replaced:
                        if old in manifest.all_data_dirs:
                            continue
                        try:
                            await backend.delete_tree(old)
                        except OSError as exc:
                            logger.warning("could not delete replaced data directory %s: %s", backend.describe(old), exc)
            except BaseException:
                self.snapshot.close()
                with contextlib.suppress(Exception):
                    # A commit can fail after its rename (e.g. the directory fsync): then P.index
                    # already names the new data, which must stay.
                    if not committed and data_dir not in await _referenced_data_dirs(backend, self.stem):
                        await backend.delete_tree(data_dir)
                raise
            finally:
                for claim in self.claims:  # the commit (or its failure) settles them: drop before unlocking
                    with contextlib.suppress(Exception):
                        await backend.delete(claim)
                with contextlib.suppress(Exception):
                    await lock.release()
            for callback in self.callbacks:
                await asyncio.to_thread(self._call_back, callback)
            return self.handle.path
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.snapshot.close()
            metrics.staging_seconds = self.snapshot.staging_seconds
            metrics.files_staged_by_hooks = self.snapshot.files_staged_by_hooks
            metrics.bytes_staged_by_hooks = self.snapshot.bytes_staged_by_hooks
            metrics.snapshot_seconds = self.snapshot_seconds
            if metrics.files_written:
                metrics.writing_seconds = self._write_span[1] - self._write_span[0]
            metrics.total_seconds = time.perf_counter() - started
            if self.on_stats is not None:
                await self._report(error)

    async def _gather(self, backend: Backend, nonce: str, own: Manifest) -> Manifest:
        """The chief's part: claim every other worker's section of this save, check, merge, verify."""
        team = self.team
        count = team.worker.count
        found: dict[int, Section] = {}
        replaced = await _referenced_data_dirs(backend, self.stem)

        async def look() -> bool | None:
            names = await backend.list_names()
            for name in sorted(names):
                parsed = coordination.parse_section_name(name)
                if parsed is None or parsed[0] != self.stem or parsed[2] != count:
                    continue
                if not 0 < parsed[1] < count or parsed[1] in found:
                    continue
                section = await self._claim(backend, nonce, name, parsed, own, replaced, found)
                if section is not None:
                    found[parsed[1]] = section
            return True if len(found) == count - 1 else None

        if await coordination.poll(look, team.worker.timeout_seconds) is None:
            missing = [worker for worker in range(1, count) if worker not in found]
            names = ", ".join(
                f"worker {w} ({backend.describe(coordination.section_name(self.stem, w, count, '<nonce>'))})"
                for w in missing
            )
            raise CheckpointTimeoutError(
                f"checkpoint {self.handle.path} was not committed: after {team.worker.timeout_seconds:g} s "
                f"the section(s) of {len(missing)} of {count - 1} other worker(s) had not been published: {names}"
            )
        merged = coordination.merge(own, [found[worker] for worker in range(1, count)], team.order)
        # What is about to be committed must read back, and every byte it names must be there.
        parse_manifest(merged.to_json(), source=backend.describe(index_name(self.stem)))
        problem = await _missing_bytes(backend, merged.all_data_dirs, merged.tensors.values())
        if problem is not None:
            raise CorruptCheckpointError(f"checkpoint {self.handle.path} was not committed: {problem}")
        return merged

    async def _claim(self, backend, nonce, name, parsed, own, replaced, found) -> Section | None:
        """Worker ``parsed[1]``'s section ``name``, checked and claimed; ``None`` to wait past it.

        A section of another save (another ``save_id``) or one whose writer no longer holds its
        data directory's lock is an earlier save's leftover: not merged, waited past. A section
        that passes is renamed to this chief's claim name (at most one renamer wins it: a worker
        withdrawing it, a cleaner deleting it, or this chief); only then are its bytes checked, and
        from then on cleanup leaves its data directory alone while this chief holds its lock.
        """
        team = self.team
        _, worker, count, section_nonce = parsed
        data = await _read_index(backend, name)
        if data is None:
            return None
        source = backend.describe(name)
        section = parse_section(data, source=source)
        if section.save_id != self.save_id or section.count != count:
            return None
        taken = {own.data_dir, *replaced, *(other.data_dir for other in found.values())}
        coordination.check_section(section, source=source, worker=worker, stem=self.stem,
                                   expected=team.share(worker), nonce=section_nonce, taken=taken)
        if backend.cleans_debris and not await _held(backend, section.data_dir):
            return None
        await backend.check_data_dir(section.data_dir)
        claim = coordination.claim_name(self.stem, nonce, section_nonce)
        if not await backend.rename(name, claim):
            return None
        self.claims.append(claim)
        if await _missing_bytes(backend, (section.data_dir,), section.tensors.values()) is not None:
            self.claims.remove(claim)
            await backend.delete(claim)  # its writer is gone and so are its bytes: wait for another
            return None
        return section

    async def _publish_and_wait(self, backend: Backend, data_dir: str, nonce: str, own: Manifest) -> None:
        """A non-chief's part: publish the section, then wait until ``P.index`` references it."""
        team = self.team
        worker = team.worker
        name = coordination.section_name(self.stem, worker.index, worker.count, nonce)
        section = Section(worker.index, worker.count, self.save_id, data_dir, own.tensors)
        await backend.commit(name, index_tmp_name(self.stem, nonce), section.to_json())

        async def committed() -> bool | None:
            return True if data_dir in await _referenced_data_dirs(backend, self.stem) else None

        async def settled() -> bool | None:  # committed, or no live chief holds a claim on it any more
            if await committed():
                return True
            return None if await _claimed(backend, self.stem, nonce) else True

        done = await coordination.poll(committed, worker.timeout_seconds)
        if done is None:
            # Withdraw the section; if a chief claimed it first, that chief decides: wait for it.
            withdrawn = await backend.rename(name, index_tmp_name(self.stem, nonce))
            if withdrawn:
                with contextlib.suppress(Exception):
                    await backend.delete(index_tmp_name(self.stem, nonce))
            else:
                await coordination.poll(settled, worker.timeout_seconds)
        if done is None and await committed() is None:  # the chief may have committed just now
            raise CheckpointTimeoutError(
                f"checkpoint {self.handle.path} was not committed: worker {worker.index} of {worker.count} "
                f"published its section, but after {worker.timeout_seconds:g} s the chief (worker 0) had "
                f"not committed {backend.describe(index_name(self.stem))} referencing {data_dir}"
            )

    async def _report(self, error: BaseException | None) -> None:
        metrics = self.handle.metrics
        stats = WriteStats(
            path=self.handle.path,
            tensors=len(self.sources),
            bytes_written=metrics.bytes_written,
            files_written=metrics.files_written,
            bytes_staged_by_hooks=metrics.bytes_staged_by_hooks,
            snapshot_seconds=metrics.snapshot_seconds,
            write_seconds=metrics.writing_seconds,
            commit_seconds=metrics.commit_seconds,
            total_seconds=metrics.total_seconds,
            error=error if isinstance(error, Exception) else None,
        )
        try:
            await asyncio.to_thread(self.on_stats, stats)
        except Exception:  # noqa: BLE001 - observing a write must never change its outcome
            logger.exception("the write-statistics callback for %s failed", self.handle.path)

    def _call_back(self, callback: Callable[[], None]) -> None:
        with _registry.calling_back(self.handle):
            callback()

    async def _write_files(self, backend: Backend, data_dir: str) -> None:
        semaphore = asyncio.Semaphore(self.settings.max_concurrent_writes)
        try:
            async with asyncio.TaskGroup() as group:
                for index in range(len(self.plan.files)):
                    await semaphore.acquire()
                    group.create_task(self._write_one(backend, data_dir, index, semaphore))
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        if self.snapshot.error is not None:  # a hook could not copy a value about to change
            raise self.snapshot.error

    async def _write_one(self, backend: Backend, data_dir: str, index: int, semaphore) -> None:
        file = self.plan.files[index]
        try:
            started = time.perf_counter()
            self._write_span[0] = min(self._write_span[0], started)
            await backend.write(f"{data_dir}/{file.name}", self.snapshot.content(index))
            self._write_span[1] = max(self._write_span[1], time.perf_counter())
            self.handle.metrics.bytes_written += file.size
            self.handle.metrics.files_written += 1
        finally:
            self.snapshot.file_written(index)
            semaphore.release()

    def _manifest(self, data_dir: str) -> Manifest:
        files = self.plan.files
        crcs = [self.snapshot.crcs(index) for index in range(len(files))]
        tensors = {}
        for item, source in enumerate(self.sources):
            runs = self.plan.extents[item]
            extents = []
            crc = 0  # CRC-32C of no bytes
            for file_index, piece_index in runs:
                file = files[file_index]
                piece = file.pieces[piece_index]
                piece_crc = crcs[file_index][piece_index]
                extents.append(Extent(file.name, piece.file_offset, piece.length, piece_crc))
                # Combining with the CRC of nothing is the identity: skip the work for one extent.
                crc = piece_crc if len(runs) == 1 else crc32c_combine(crc, piece_crc, piece.length)
            tensors[source.key] = TensorRecord(source.dtype, source.shape, source.nbytes, crc, tuple(extents))
        return Manifest(data_dir, self.object_graph, tensors)


async def _create_data_dir(backend: Backend, stem: str):
    """Lock and create a fresh ``stem.data-<nonce>``; the lock exists before the directory does."""
    for _ in range(8):
        nonce = secrets.token_hex(8)
        lock = await backend.lock_new(lock_name(stem, nonce))
        if lock is None:
            continue  # a cleaner took the brand-new marker; try another name
        try:
            await backend.create_data_dir(data_dir_name(stem, nonce))
        except BaseException:
            await lock.release()
            raise
        return nonce, lock
    raise RuntimeError(f"could not lock a new data directory for {backend.describe(stem)}")


async def _read_index(backend: Backend, name: str) -> bytes | None:
    """The manifest ``name``, or ``None`` if it does not exist.

    Raises ``CorruptCheckpointError`` for one larger than ``MAX_INDEX_BYTES``, before reading it.
    """
    if await backend.holds(name, MAX_INDEX_BYTES + 1):
        raise CorruptCheckpointError(
            f"the checkpoint index {backend.describe(name)} is larger than {MAX_INDEX_BYTES} bytes: "
            "not a manifest this library wrote; refusing to read it"
        )
    return await backend.read(name)


async def _referenced_data_dirs(backend: Backend, stem: str) -> tuple[str, ...]:
    """The data directories ``stem.index`` names; () when there is none or it cannot be read."""
    try:
        data = await _read_index(backend, index_name(stem))
    except CorruptCheckpointError:
        return ()  # an unreadable old index: its data directories are left alone
    return () if data is None else (read_data_dirs(data) or ())


async def _index_token(backend: Backend, stem: str) -> str:
    """What ``stem.index`` holds now, hashed: the part of a save's identifier that changes per write."""
    try:
        data = await _read_index(backend, index_name(stem))
    except CorruptCheckpointError:
        return "oversized"
    return "absent" if data is None else hashlib.sha256(data).hexdigest()


async def _missing_bytes(backend: Backend, data_dirs, records) -> str | None:
    """What of ``records``' extents (in ``data_dirs``) is not on storage; ``None`` when all is."""
    ends: dict[tuple[int, str], int] = {}
    for record in records:
        for extent in record.extents:
            key = (extent.dir, extent.file)
            ends[key] = max(ends.get(key, 0), extent.offset + extent.length)
    for (directory, file), end in sorted(ends.items()):
        location = f"{data_dirs[directory]}/{file}"
        if not await backend.holds(location, end):
            return f"{backend.describe(location)} does not hold the {end} bytes the manifest names"
    return None


async def _claimed(backend: Backend, stem: str, nonce: str) -> bool:
    """Whether a chief still holding its lock has claimed the section of ``stem.data-<nonce>``."""
    for name in sorted(await backend.list_names()):
        parsed = coordination.parse_claim_name(name)
        if parsed is not None and parsed[0] == stem and parsed[2] == nonce:
            if await _held(backend, data_dir_name(stem, parsed[1])):
                return True
    return False


async def _held(backend: Backend, data_dir: str) -> bool:
    """Whether a writer still holds the lock of ``data_dir`` (its write or section is live).

    Taking a free lock to find out removes its stale marker, as debris cleanup would.
    """
    parsed = parse_data_dir_name(data_dir)
    if parsed is None:
        return False
    marker = lock_name(*parsed)
    taken = await backend.try_lock(marker)
    if taken is not None:
        await taken.release()
        return False
    return await backend.holds(marker, 0) is not None


_UNREADABLE = object()


async def _clean_debris(backend: Backend, *, exclude: str) -> None:
    """Delete what crashed writes left in the folder; never fails the write that calls it.

    A data directory is debris when no writer holds its lock, no manifest in the folder names it
    and no live chief has claimed its section. Temporary manifests, sections and stale lock
    markers go with their data directory; claims go once their chief no longer holds its lock.
    """
    try:
        names = await backend.list_names()
        groups: dict[tuple[str, str], set[str]] = {}
        sections: dict[tuple[str, str], str] = {}
        claims = []
        for name in names:
            section = coordination.parse_section_name(name)
            if section is not None:
                key = (section[0], section[3])
                groups.setdefault(key, set()).add("section")
                sections[key] = name
                continue
            claim = coordination.parse_claim_name(name)
            if claim is not None:
                claims.append((name, claim))
                continue
            for kind, parse in (("dir", parse_data_dir_name), ("lock", parse_lock_name), ("tmp", parse_index_tmp_name)):
                parsed = parse(name)
                if parsed is not None:
                    groups.setdefault(parsed, set()).add(kind)
                    break
        data_dirs_per_stem: dict[str, int] = {}
        for (stem, _), kinds in groups.items():
            if "dir" in kinds:
                data_dirs_per_stem[stem] = data_dirs_per_stem.get(stem, 0) + 1
        references: dict[str, Any] = {}

        async def referenced_by(index: str) -> Any:
            if index not in references:
                try:
                    data = await _read_index(backend, index)
                except (OSError, CorruptCheckpointError):
                    data = b""
                references[index] = None if data is None else (read_data_dirs(data) or _UNREADABLE)
            return references[index]

        for (stem, nonce), kinds in sorted(groups.items()):
            name = data_dir_name(stem, nonce)
            if name == exclude:
                continue
            own_index = index_name(stem)
            if kinds == {"dir"} and data_dirs_per_stem.get(stem) == 1 and own_index in names:
                continue  # the one finished data directory of a committed checkpoint
            if "lock" in kinds:
                lock = await backend.try_lock(lock_name(stem, nonce))
            elif "section" in kinds:  # a live writer always has a marker: make sure by creating it
                lock = await backend.lock_new(lock_name(stem, nonce))
            else:
                lock = _NO_LOCK
            if lock is None:
                continue  # still being written
            try:
                if "section" in kinds:
                    # Take the section away first: a chief that claims it later finds nothing; a
                    # chief that claimed it already has a claim the check below finds.
                    if await backend.rename(sections[(stem, nonce)], index_tmp_name(stem, nonce)):
                        kinds.add("tmp")
                        logger.info("removed the section of an unfinished multi-worker save: %s",
                                    backend.describe(sections[(stem, nonce)]))
                if "dir" in kinds:
                    if await _is_referenced(name, own_index, names, referenced_by):
                        continue
                    if await _claimed(backend, stem, nonce):  # listed after taking the lock
                        continue
                    await backend.delete_tree(name)
                if "tmp" in kinds:
                    await backend.delete(index_tmp_name(stem, nonce))
                logger.info("removed debris of an unfinished write: %s", backend.describe(name))
            finally:
                if lock is not _NO_LOCK:
                    await lock.release()

        for name, (stem, chief, _) in sorted(claims):
            if data_dir_name(stem, chief) != exclude and not await _held(backend, data_dir_name(stem, chief)):
                await backend.delete(name)
    except Exception as exc:  # cleanup is best effort: the write itself must not fail for it
        logger.warning("could not clean up after earlier unfinished writes: %s", exc)


_NO_LOCK = object()


async def _is_referenced(name: str, own_index: str, names: set[str], referenced_by) -> bool:
    own = await referenced_by(own_index)
    if own is _UNREADABLE or (own is not None and name in own):
        return True
    # A checkpoint renamed by hand keeps naming its data directory: look at every manifest.
    for other in sorted(names):
        if other.endswith(".index") and other != own_index:
            found = await referenced_by(other)
            if found is not None and found is not _UNREADABLE and name in found:
                return True
    return False


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`CheckpointReader.verify` checked: how many values and bytes."""

    tensors: int
    bytes: int


class CheckpointReader:
    """Read access to one committed checkpoint. Obtain it from :func:`open_reader`."""

    def __init__(self, path: str, manifest: Manifest, backend: Backend, settings: ReadSettings, runtime: Runtime):
        self.path = path
        self._manifest = manifest
        if manifest.data_dirs:
            # Several data directories (a multi-worker save): each extent's file is named with
            # its directory, so reads and messages need no other change.
            self._prefix = ""
            self._tensors = {key: _located(record, manifest.data_dirs) for key, record in manifest.tensors.items()}
        else:
            self._prefix = f"{manifest.data_dir}/"
            self._tensors = manifest.tensors
        self._backend = backend
        self._settings = settings
        self._runtime = runtime

    @property
    def object_graph(self) -> dict:
        """The object graph stored with the checkpoint (a fresh copy)."""
        return json.loads(object_graph_bytes(self._manifest.object_graph))

    @property
    def data_dir(self) -> str:
        """Name of the data directory the manifest points at."""
        return self._manifest.data_dir

    @property
    def data_dirs(self) -> tuple[str, ...]:
        """Every data directory the manifest points at (several for a multi-worker save)."""
        return self._manifest.all_data_dirs

    def keys(self) -> list[str]:
        """Every key, including the object-graph key, sorted bytewise (UTF-8)."""
        return sorted(
            [OBJECT_GRAPH_KEY, *self._tensors], key=lambda key: key.encode("utf-8", "surrogatepass")
        )

    def __contains__(self, key: object) -> bool:
        return key == OBJECT_GRAPH_KEY or key in self._tensors

    def spec(self, key: str) -> TensorSpec:
        """dtype and shape of ``key``; ``KeyError`` naming the key when absent."""
        if key == OBJECT_GRAPH_KEY:
            return TensorSpec(BYTES_DTYPE, ())
        return self._record(key).spec

    def _record(self, key: str) -> TensorRecord:
        try:
            return self._tensors[key]
        except (KeyError, TypeError):
            raise KeyError(f"key {key!r} not found in checkpoint {self.path}") from None

    def read(self, key: str):
        """The value of ``key``: a writable NumPy array, or ``bytes``. Checksums are verified."""
        return self.read_many([key])[key]

    def read_many(
        self,
        keys: Iterable[str],
        *,
        out: Mapping[str, Any] | None = None,
        stager: _cuda.Stager | None = None,
    ) -> dict[str, Any]:
        """Values of several keys, read concurrently and verified.

        Parameters
        ----------
        keys:
            The keys to read.
        out:
            Optional destinations: ``{key: array}`` with a writable, C-contiguous NumPy array of
            the key's exact dtype and shape, into which the bytes are read directly (no
            intermediate copy); the result maps that key to the same array. A destination may
            also be a C-contiguous device array (CuPy, or a GPU array of another framework): its
            bytes are read window by window into pinned buffers and uploaded asynchronously on
            the stager's upload stream, ordered after the work pending on the calling thread's
            current stream; later work on that stream waits for the uploads (on the device:
            ``read_many`` does not wait for them). A destination that does not fit raises
            ``ValueError`` before anything is read. If a checksum then fails, the destinations
            read so far (host or device) hold unverified bytes.
        stager:
            The :class:`~asyncckpt._cuda.Stager` uploading into the device destinations (its
            pinned pool, chunk size and upload stream; its backend owns the arrays). By default
            :func:`~asyncckpt._cuda.stager_for` the CuPy backend of each array's device; tests
            pass one of a :class:`~asyncckpt._cuda.FakeDeviceBackend`.
        """
        keys = list(keys)
        with self._device_uploads(out, stager) as uploads:
            return self._runtime.run(self._read(keys, assemble=True, out=out, devices=uploads.targets))

    async def aread_many(
        self,
        keys: Iterable[str],
        *,
        out: Mapping[str, Any] | None = None,
        stager: _cuda.Stager | None = None,
    ) -> dict[str, Any]:
        """The ``async`` twin of :meth:`read_many`, usable from any event loop without blocking it.

        Uploads into device destinations are ordered on the current stream of the thread that
        awaits it.
        """
        keys = list(keys)
        with self._device_uploads(out, stager) as uploads:
            return await self._on_runtime(self._read(keys, assemble=True, out=out, devices=uploads.targets))

    async def aread(self, key: str):
        """The ``async`` twin of :meth:`read`."""
        return (await self.aread_many([key]))[key]

    def verify(self) -> VerifyReport:
        """Check every checksum of the checkpoint without keeping the data.

        Raises ``CorruptCheckpointError`` naming the key and the file of the first problem found.
        """
        tensors = self._tensors
        self._runtime.run(self._read(list(tensors), assemble=False))
        return VerifyReport(len(tensors), sum(record.nbytes for record in tensors.values()))

    async def _on_runtime(self, coro):
        if running_loop() is self._runtime.loop:
            return await coro
        return await asyncio.wrap_future(self._runtime.submit(coro))

    def _device_uploads(self, out: Mapping[str, Any] | None, stager: _cuda.Stager | None) -> _DeviceUploads:
        """Check the device destinations in ``out`` (before anything is read) and order their uploads.

        Runs in the caller's thread: its current stream is the one the uploads are ordered on.
        Host destinations are checked later, by :meth:`_destination`.
        """
        targets: dict[str, _DeviceTarget] = {}
        for key, given in (out or {}).items():
            if isinstance(given, np.ndarray) or key not in self._tensors:
                continue  # host destinations and unknown keys are refused by _read
            found = _arrays.device_target(given, None if stager is None else stager.backend)
            if found is None:
                continue
            backend, array = found
            record = self._tensors[key]
            if record.dtype == BYTES_DTYPE:
                raise ValueError(f"key {key!r} holds a byte string; it cannot be read into an array")
            dtype, shape = np.dtype(array.dtype), tuple(int(d) for d in array.shape)
            if dtype.str != record.dtype or shape != record.shape or not backend.is_c_contiguous(array):
                layout = "" if backend.is_c_contiguous(array) else " non-contiguous"
                raise ValueError(
                    f"cannot read key {key!r} ({record.dtype}{list(record.shape)}) into a{layout} "
                    f"{dtype.str}{list(shape)} device array: a destination must be a C-contiguous array "
                    "of the same dtype and shape"
                )
            targets[key] = _DeviceTarget(stager or _cuda.stager_for(backend), array)
        return _DeviceUploads(targets)

    def _destination(self, key: str, record: TensorRecord, given: Any) -> tuple[Any, memoryview]:
        """``(value, flat writable byte view)`` of the buffer ``key`` is read into."""
        if given is not None:
            if record.dtype == BYTES_DTYPE:
                raise ValueError(f"key {key!r} holds a byte string; it cannot be read into an array")
            if (
                not isinstance(given, np.ndarray)
                or given.dtype.str != record.dtype
                or given.shape != record.shape
                or not given.flags.c_contiguous
                or not given.flags.writeable
            ):
                described = (
                    f"a {given.dtype.str}{list(given.shape)} array" if isinstance(given, np.ndarray)
                    else f"a {type(given).__name__}"
                )
                raise ValueError(
                    f"cannot read key {key!r} ({record.dtype}{list(record.shape)}) into {described}: a "
                    "destination must be a writable C-contiguous NumPy (or device) array of the same "
                    "dtype and shape"
                )
            return given, memoryview(given.reshape(-1).view(np.uint8))
        if record.dtype == BYTES_DTYPE:
            buffer = bytearray(record.nbytes)
            return buffer, memoryview(buffer)
        array = np.empty(record.shape, dtype=record.dtype)
        return array, memoryview(array.reshape(-1).view(np.uint8))

    async def _read(
        self,
        keys: list[str],
        *,
        assemble: bool,
        out: Mapping[str, Any] | None = None,
        devices: Mapping[str, _DeviceTarget] | None = None,
    ) -> dict[str, Any]:
        results: dict[str, Any] = {}
        records: dict[str, TensorRecord] = {}
        for key in keys:
            if key == OBJECT_GRAPH_KEY:
                results[key] = object_graph_bytes(self._manifest.object_graph)
            else:
                records[key] = self._record(key)
        out = out or {}
        devices = devices or {}
        unknown = [key for key in out if key not in records]
        if unknown:
            raise KeyError(f"destinations given for keys that are not being read: {sorted(unknown)[:5]}")
        ranges = plan_read(
            records,
            coalesce_gap_bytes=self._settings.coalesce_gap_bytes,
            max_range_bytes=self._settings.max_read_bytes,
        )
        await self._check_lengths(ranges)  # before allocating what a crafted manifest claims
        values: dict[str, Any] = {}
        views: dict[str, memoryview] = {}
        if assemble:
            for key, record in records.items():
                if key in devices:  # filled through pinned buffers; the result is the caller's array
                    values[key] = out[key]
                else:
                    values[key], views[key] = self._destination(key, record, out.get(key))
        crcs = {key: [None] * len(record.extents) for key, record in records.items()}
        semaphore = asyncio.Semaphore(self._settings.max_concurrent_reads)

        async def fetch(read_range: ReadRange) -> None:
            async with semaphore:
                checked = await self._fetch_range(read_range, views, devices)
            for target, crc in zip(read_range.targets, checked):
                crcs[target.key][target.extent_index] = crc

        try:
            if len(ranges) == 1:
                await fetch(ranges[0])
            else:
                async with asyncio.TaskGroup() as group:
                    for read_range in ranges:
                        group.create_task(fetch(read_range))
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        for key, record in records.items():
            self._check_whole(key, record, crcs[key])
            if assemble:
                value = values[key]
                results[key] = bytes(value) if isinstance(value, bytearray) else value
        return results

    async def _check_lengths(self, ranges: Sequence[ReadRange]) -> None:
        """Raise ``CorruptCheckpointError`` for a data file that is missing or too short."""
        last: dict[str, ReadRange] = {}
        for read_range in ranges:  # ranges come grouped by file, in offset order
            if read_range.file not in last or read_range.stop >= last[read_range.file].stop:
                last[read_range.file] = read_range
        for file, read_range in last.items():
            found = await self._backend.holds(f"{self._prefix}{file}", read_range.stop)
            if found is None:
                raise self._corrupt(read_range.targets[0].key, file, "is missing")
            if not found:
                for earlier in ranges:
                    if earlier.file == file:
                        error = await self._truncation(earlier, definite=False)
                        if error is not None:
                            raise error
                raise await self._truncation(read_range)

    def _file_location(self, file: str) -> str:
        return self._backend.describe(f"{self._prefix}{file}")

    def _corrupt(self, key: str, file: str, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"corrupt checkpoint {self.path}: key {key!r}: data file {self._file_location(file)} {problem}"
        )

    async def _fetch_range(
        self, read_range: ReadRange, views: dict[str, memoryview], devices: Mapping[str, _DeviceTarget] | None = None
    ) -> list[int]:
        """Read one range straight into the targets' buffers; return each target's verified CRC."""
        if devices and any(target.key in devices for target in read_range.targets):
            if _ordered(read_range.targets):
                return await self._fetch_windows(read_range, views, devices)
            return await self._fetch_overlapping(read_range, views, devices)
        buffers, pieces, copies = _scatter(read_range, views)
        await self._read_into(read_range, 0, buffers)
        if read_range.stop - read_range.start >= MiB:
            return await asyncio.to_thread(self._verify, read_range, pieces, copies)
        return self._verify(read_range, pieces, copies)

    async def _read_into(self, read_range: ReadRange, offset: int, buffers: list[Any]) -> None:
        """Fill ``buffers`` from the range's file at ``offset`` bytes into the range."""
        try:
            found = await self._backend.read_into(
                f"{self._prefix}{read_range.file}", read_range.start + offset, buffers
            )
        except TruncatedError:
            raise await self._truncation(read_range) from None
        if not found:
            raise self._corrupt(read_range.targets[0].key, read_range.file, "is missing")

    async def _fetch_windows(
        self, read_range: ReadRange, views: dict[str, memoryview], devices: Mapping[str, _DeviceTarget]
    ) -> list[int]:
        """Read a range with device targets window by window; return each target's verified CRC.

        A window is one storage read: its device bytes (at most one pinned buffer, of one device)
        go into a pinned buffer, host bytes straight into their destinations, gaps into scratch
        space. Once read, the window's pieces extend their targets' running CRC-32C (a target
        whose last byte is in the window is checked), then its uploads are enqueued and the
        buffer goes back to the pool; the next window is read while they run.
        """
        targets = read_range.targets
        total = read_range.stop - read_range.start
        gaps = [b.range_offset - (a.range_offset + a.length) for a, b in zip(targets, targets[1:])]
        gaps.append(total - (targets[-1].range_offset + targets[-1].length))
        scratch = memoryview(bytearray(max(gaps)))
        crcs = [0] * len(targets)
        index = within = position = 0  # next target, bytes of it already read, offset in the range
        while index < len(targets):
            start = position
            buffers: list[Any] = []
            parts: list[tuple[int, memoryview, bool]] = []  # (target index, piece, target complete)
            pieces: list[tuple[int, int, Any, int]] = []  # uploads: (buffer offset, nbytes, array, offset)
            stager = pinned = window = None
            used = 0
            try:
                while index < len(targets):
                    target = targets[index]
                    if target.range_offset > position:  # a gap between extents: bytes nobody needs
                        buffers.append(scratch[: target.range_offset - position])
                        position = target.range_offset
                        continue
                    remaining = target.length - within
                    device = devices.get(target.key)
                    if device is None:
                        offset = target.tensor_offset + within
                        piece = views[target.key][offset : offset + remaining]
                    else:
                        if stager is None:
                            stager = device.stager
                            pinned, window = await self._window_buffer(stager, total - position)
                        elif device.stager is not stager or used == len(window):
                            break  # the window's buffer is full, or belongs to another device
                        size = min(remaining, len(window) - used)
                        piece = memoryview(window)[used : used + size]
                        pieces.append((used, size, device.array, target.tensor_offset + within))
                        used += size
                    buffers.append(piece)
                    within += len(piece)
                    position += len(piece)
                    parts.append((index, piece, within == target.length))
                    if within == target.length:
                        index, within = index + 1, 0
                if index == len(targets) and position < total:
                    buffers.append(scratch[: total - position])
                    position = total
                await _finish_even_if_cancelled(self._read_into(read_range, start, buffers))
                if position - start >= MiB:
                    await asyncio.to_thread(self._verify_window, read_range, parts, crcs)
                else:
                    self._verify_window(read_range, parts, crcs)
            except BaseException:
                if pinned is not None:
                    stager.upload_window(pinned, ())  # nothing uploaded from it: just give it back
                raise
            if pinned is not None:
                stager.upload_window(pinned, pieces)  # asynchronous copies from page-locked memory
            elif stager is not None:  # from pageable memory a copy may block: not on the loop
                await asyncio.to_thread(stager.upload_window, window, pieces)
        return crcs

    async def _window_buffer(self, stager: _cuda.Stager, most: int) -> tuple[_cuda.PinnedBuffer | None, np.ndarray]:
        """``(pinned buffer, its bytes)`` to read a window into, or ``(None, private bytes)``.

        Never waits for a free buffer (the pool may be held by captures or other windows): with
        none free the window goes through a private pageable buffer of at most ``most`` bytes.
        A buffer whose last upload still runs is waited for in a worker thread.
        """
        pinned = stager.take_upload_buffer()
        if pinned is None:
            return None, np.empty(min(stager.chunk_bytes, most), dtype=np.uint8)
        try:
            if not stager.buffer_idle(pinned):
                await asyncio.to_thread(stager.wait_for_buffer, pinned)
            pinned.pending = None
        except BaseException:
            stager.upload_window(pinned, ())
            raise
        return pinned, pinned.array

    async def _fetch_overlapping(
        self, read_range: ReadRange, views: dict[str, memoryview], devices: Mapping[str, _DeviceTarget]
    ) -> list[int]:
        """A range whose extents overlap (only a crafted manifest has them): read whole, verify, copy."""
        buffers, pieces, copies = _scatter(read_range, views)
        await self._read_into(read_range, 0, buffers)
        checked = await asyncio.to_thread(self._verify, read_range, pieces, copies)
        for target, piece in zip(read_range.targets, pieces):
            device = devices.get(target.key)
            if device is not None:
                private = np.frombuffer(piece, dtype=np.uint8).copy()
                await asyncio.to_thread(
                    device.stager.upload_window, private, [(0, target.length, device.array, target.tensor_offset)]
                )
        return checked

    async def _truncation(self, read_range: ReadRange, *, definite: bool = True) -> CorruptCheckpointError | None:
        """Name the first key of ``read_range`` whose bytes lie past the end of the file.

        ``None`` when none does and ``definite`` is false (the caller looks at further ranges).
        """
        key = f"{self._prefix}{read_range.file}"
        for target in read_range.targets:
            end = read_range.start + target.range_offset + target.length
            try:
                await self._backend.read(key, end - 1, end)
            except TruncatedError:
                return self._corrupt(
                    target.key, read_range.file, f"is truncated: the key's bytes [{end - target.length}, {end}) are past its end"
                )
        return self._corrupt(read_range.targets[0].key, read_range.file, "is truncated") if definite else None

    def _verify(self, read_range: ReadRange, pieces: list[memoryview], copies: list) -> list[int]:
        checked = []
        checksum = crc32c.crc32c
        for target, piece in zip(read_range.targets, pieces):
            crc = checksum(piece)
            if crc != target.crc32c:
                raise self._checksum_mismatch(read_range, target, crc)
            checked.append(crc)
        for destination, piece in copies:
            destination[:] = piece
        return checked

    def _verify_window(self, read_range: ReadRange, parts: list[tuple[int, memoryview, bool]], crcs: list[int]) -> None:
        """Extend the targets' running CRC-32C by the window's pieces; check the completed ones."""
        checksum = crc32c.crc32c
        for index, piece, complete in parts:
            crcs[index] = checksum(piece, crcs[index])
            target = read_range.targets[index]
            if complete and crcs[index] != target.crc32c:
                raise self._checksum_mismatch(read_range, target, crcs[index])

    def _checksum_mismatch(self, read_range: ReadRange, target, crc: int) -> CorruptCheckpointError:
        return self._corrupt(
            target.key,
            read_range.file,
            f"fails its checksum at bytes [{read_range.start + target.range_offset}, "
            f"{read_range.start + target.range_offset + target.length}) "
            f"(crc32c {crc:#010x}, manifest says {target.crc32c:#010x})",
        )

    def _check_whole(self, key: str, record: TensorRecord, crcs: list) -> None:
        if len(crcs) == 1:  # combining one extent's CRC with nothing is the identity
            crc = crcs[0]
        else:
            crc = 0
            for extent, extent_crc in zip(record.extents, crcs):
                crc = crc32c_combine(crc, extent_crc, extent.length)
        if crc != record.crc32c:
            file = record.extents[0].file if record.extents else "(none)"
            raise self._corrupt(
                key, file, f"holds extents whose combined crc32c {crc:#010x} differs from the value's {record.crc32c:#010x}"
            )


def _located(record: TensorRecord, data_dirs: Sequence[str]) -> TensorRecord:
    """``record`` with each extent's file named ``<its data directory>/<file>``."""
    extents = tuple(
        Extent(f"{data_dirs[e.dir]}/{e.file}", e.offset, e.length, e.crc32c) for e in record.extents
    )
    return dataclasses.replace(record, extents=extents)


@dataclass(frozen=True)
class _DeviceTarget:
    """A device destination: the stager uploading into it and the backend's own array viewing it."""

    stager: _cuda.Stager
    array: Any


class _DeviceUploads:
    """The device destinations of one read; as a context manager, the ordering of their uploads.

    Entered in the caller's thread: each device's uploads run after the work pending on that
    thread's current stream; on exit (error or not) that stream waits, on the device, for them.
    """

    def __init__(self, targets: dict[str, _DeviceTarget]) -> None:
        self.targets = targets
        self._streams: list[tuple[_cuda.Stager, Any]] = []

    def __enter__(self) -> _DeviceUploads:
        try:
            for stager in {id(t.stager): t.stager for t in self.targets.values()}.values():
                self._streams.append((stager, stager.begin_uploads()))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for stager, stream in self._streams:
            stager.end_uploads(stream)


def _ordered(targets: Sequence[Any]) -> bool:
    """Whether the targets follow each other without overlapping (always, but for crafted manifests)."""
    return all(a.range_offset + a.length <= b.range_offset for a, b in zip(targets, targets[1:]))


async def _finish_even_if_cancelled(coro) -> None:
    """Await ``coro``; if the caller is cancelled meanwhile, let it finish first, then re-raise.

    A read into a pinned buffer runs in a worker thread that cancellation does not stop: the buffer
    must not go back to the pool (and to the next copy) while that thread still writes into it.
    """
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


def _scatter(read_range: ReadRange, views: dict[str, memoryview]) -> tuple[list[Any], list[memoryview], list]:
    """How to read ``read_range``: ``(buffers, pieces, copies)``.

    ``buffers`` are what the read fills, in file order; ``pieces`` the bytes of each target among
    them; ``copies`` ``(destination, piece)`` pairs to copy once the pieces are verified. Targets
    are normally read straight into their destinations, with gaps going to scratch space. Without
    destinations (verification), or with overlapping extents (only a crafted manifest has them),
    the whole range is read into scratch space and sliced.
    """
    targets = read_range.targets
    if not _ordered(targets) or not views:
        scratch = memoryview(bytearray(read_range.stop - read_range.start))
        pieces = [scratch[t.range_offset : t.range_offset + t.length] for t in targets]
        copies = [
            (views[t.key][t.tensor_offset : t.tensor_offset + t.length], piece)
            for t, piece in zip(targets, pieces)
            if t.key in views
        ]
        return [scratch], pieces, copies
    pieces = [views[t.key][t.tensor_offset : t.tensor_offset + t.length] for t in targets]
    buffers: list[memoryview] = []
    gaps: list[int] = []
    position = 0
    for target, piece in zip(targets, pieces):
        if target.range_offset > position:
            gaps.append(len(buffers))
            buffers.append(target.range_offset - position)
        buffers.append(piece)
        position = target.range_offset + target.length
    if read_range.stop - read_range.start > position:
        gaps.append(len(buffers))
        buffers.append(read_range.stop - read_range.start - position)
    if gaps:  # one scratch buffer serves every gap: their bytes are not needed
        scratch = memoryview(bytearray(max(buffers[index] for index in gaps)))
        for index in gaps:
            buffers[index] = scratch[: buffers[index]]
    return buffers, pieces, []


async def _open(path, settings: ReadSettings, runtime: Runtime) -> CheckpointReader:
    storage = _storage_of(settings)
    folder, stem = storage.split(path)
    backend = await storage.open(folder)
    index = index_name(stem)
    data = await _read_index(backend, index)
    if data is None:
        raise NotFoundError(
            f"Failed to find any matching files for {path}: the checkpoint index {backend.describe(index)} "
            "does not exist"
        )
    manifest = parse_manifest(data, source=backend.describe(index))
    for data_dir in manifest.all_data_dirs:
        await backend.check_data_dir(data_dir)
    return CheckpointReader(os.fspath(path), manifest, backend, settings, runtime)


def _read_settings(settings: ReadSettings | None) -> ReadSettings:
    settings = settings if settings is not None else ReadSettings()
    if not isinstance(settings, ReadSettings):
        raise TypeError(f"settings must be a ReadSettings, got {type(settings).__name__}")
    return settings


def open_reader(path, settings: ReadSettings | None = None) -> CheckpointReader:
    """Open the committed checkpoint at ``path``.

    Raises
    ------
    NotFoundError
        ``path.index`` does not exist (also a ``FileNotFoundError``).
    CorruptCheckpointError
        The manifest fails validation (``UnsupportedFormatError`` for an unknown version).
    """
    settings = _read_settings(settings)
    runtime = _runtime_of(settings)
    return runtime.run(_open(path, settings, runtime))


async def aopen_reader(path, settings: ReadSettings | None = None) -> CheckpointReader:
    """The ``async`` twin of :func:`open_reader`, usable from any event loop."""
    settings = _read_settings(settings)
    runtime = _runtime_of(settings)
    if running_loop() is runtime.loop:
        return await _open(path, settings, runtime)
    return await asyncio.wrap_future(runtime.submit(_open(path, settings, runtime)))


def checkpoint_exists(prefix, *, storage: Storage | None = None, runtime: Runtime | None = None) -> bool:
    """True when a committed asyncckpt checkpoint exists at ``prefix`` (its ``P.index`` parses)."""
    storage = storage or default_storage()
    try:
        folder, stem = storage.split(prefix)
    except ValueError:
        return False

    async def exists() -> bool:
        backend = await storage.open(folder)
        try:
            data = await _read_index(backend, index_name(stem))
        except CorruptCheckpointError:
            return False
        if data is None:
            return False
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return False
        return isinstance(document, dict) and document.get("format") == "asyncckpt"

    return (runtime or get_runtime()).run(exists())


def delete_checkpoint(prefix, *, storage: Storage | None = None, runtime: Runtime | None = None) -> None:
    """Delete the checkpoint at ``prefix``: un-commit it (remove ``P.index``), then its data.

    Missing pieces are not an error. Does not wait for pending writes to ``prefix``.
    """
    storage = storage or default_storage()
    folder, stem = storage.split(prefix)

    async def delete() -> None:
        backend = await storage.open(folder)
        try:
            data = await _read_index(backend, index_name(stem))
        except CorruptCheckpointError:
            data = None
        data_dirs = () if data is None else (read_data_dirs(data) or ())
        await backend.delete(index_name(stem))
        for data_dir in data_dirs:
            await backend.delete_tree(data_dir)

    (runtime or get_runtime()).run(delete())
