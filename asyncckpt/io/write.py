"""The write executor: snapshot -> data files -> commit, one :class:`WriteHandle` per ``start_write``.

::

    start_write (caller's thread)      validate entries and plan files (or take a PreparedWrite),
                                       copy bytes/plain arrays, guard live sources, capture device
                                       values on the caller's current stream    -> returns at once
    background (runtime loop)
      open      open the folder's backend, create + lock  P.data-<nonce>/, clean debris (commit)
      write     up to max_concurrent_writes files in flight; each file streams from the sources'
                memory (snapshot.FileContent), CRC-32C computed per piece as the bytes go out;
                a mutation hook first copies its holder's unwritten bytes (staging budget)
      commit    wait for the previous in-process write to the same path (FIFO), then publish
                P.index atomically (commit), then delete the replaced data directory; a worker of
                a multi-worker save publishes a section instead, merged by the chief (coordination)
      callbacks on_commit callbacks in order, in a worker thread
      report    on_stats (WriteStats), in a worker thread
      resolve   the handle: the path, or the first exception of any step

Nothing is committed unless every data file was written; an uncommitted data directory is
removed (best effort) or left as debris that the next write into the folder removes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


from asyncckpt.checksums import crc32c_combine
from asyncckpt._runtime import gc_paused
from asyncckpt.format import (
    Extent,
    Manifest,
    TensorRecord,
    TensorsJson,
    checksums_of,
    json_text,
)
from asyncckpt.naming import data_dir_name, index_name
from asyncckpt.io import coordination
from asyncckpt.io.coordinated import CoordinatedWrite, replica_checksums
from asyncckpt.io.settings import MultiWorker
from asyncckpt.io.plan import PlanItem, WritePlan, plan_write
from asyncckpt.io.guard_layout import GuardLayout
from asyncckpt.io.snapshot import Snapshot
from asyncckpt.io.sources import SaveEntry, Source, SourceKind, prepare_source, prepare_sources
from asyncckpt.shards import SHARD_EXTENT_BYTES, SHARD_SEPARATOR, is_shard_item
from asyncckpt.io.staging import ByteBudget
from asyncckpt.io.storage import Backend, Storage, StorageError

from asyncckpt.io.commit import clean_debris, create_data_dir, discard_uncommitted, publish
from asyncckpt.io.pending import WriteHandle, pending_writes, quietly_wait
from asyncckpt.io.settings import WriteSettings, WriteStats, PlanSettings, check_write_settings, runtime_of, storage_of
from asyncckpt.io.tasks import first_error

logger = logging.getLogger("asyncckpt")



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
    plan_settings: PlanSettings
    array_items: tuple[int, ...]  # sources that are owned copies (copied again for every write)
    object_graph_json: str = ""  # the object graph as the manifest writes it, encoded once
    #: The manifest's ``tensors`` member with holes for the checksums (:class:`TensorsJson`), made
    #: by the first write of this layout and shared by later ones: one slot, filled on first use.
    tensors_json: list = field(default_factory=lambda: [None], compare=False)
    #: The entries, kept when a sharded value made more sources than entries (so sources no
    #: longer line up with entries, and a layout is prepared afresh from these).
    sharded_entries: tuple[SaveEntry, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(source.key for source in self.sources)

    def released(self, items: Any) -> PreparedWrite:
        """A copy that no longer holds the values of ``items`` which exist for one write only.

        Bytes, owned copies and single-use snapshot sources (``_single_use``: a JAX array's host
        view) are dropped, so a layout kept between saves keeps no copy of the state alive; a
        later :meth:`with_values` must give those items again. Live holders (variables, tensors)
        stay: they are the same objects next time.
        """
        held = self.sources
        holder = SourceKind.HOLDER
        dropped = [index for index in items
                   if held[index].kind is not holder or getattr(held[index].value, "_single_use", False)]
        if not dropped:
            return self  # live holders only (a module's tensors): nothing to let go of
        sources = list(held)
        for index in dropped:
            source = sources[index]
            # (not dataclasses.replace: a tenth of its cost, and a save may release 1,000 of them)
            sources[index] = Source(source.key, source.kind, None, source.dtype, source.shape, source.nbytes,
                                    source.off_host)
        return dataclasses.replace(self, sources=tuple(sources))

    def with_values(self, values: Mapping[int, Any]) -> PreparedWrite:
        """A copy whose entries ``index`` take ``values[index]`` (taken now, like ``start_write``).

        Keys stay; layout and guards are rebuilt only when a size or a snapshot source changed.
        """
        sources = list(self.sources)
        resized = regarded = respecified = False
        arrays = set(self.array_items)
        for index, value in values.items():
            old = sources[index]
            if value is old.value and getattr(type(value), "_fixed_array", False):
                continue  # the same source over the same array as last time: nothing to inspect again
            new = prepare_source(old.key, value)
            resized = resized or new.nbytes != old.nbytes
            respecified = respecified or new.dtype != old.dtype or new.shape != old.shape
            if SourceKind.HOLDER in (old.kind, new.kind) and (old.kind != new.kind or old.value is not new.value):
                regarded = True
            if new.kind is SourceKind.ARRAY:
                arrays.add(index)
            else:
                arrays.discard(index)
            sources[index] = new
        plan = _plan(sources, self.plan_settings) if resized else self.plan
        layout = GuardLayout(sources, plan) if resized or regarded else self.layout
        tensors_json = [None] if resized or respecified else self.tensors_json
        return PreparedWrite(tuple(sources), plan, layout, self.object_graph, self.plan_settings,
                             tuple(sorted(arrays)), self.object_graph_json, tensors_json)



def _plan(sources: Sequence[Source], settings: PlanSettings) -> WritePlan:
    return plan_write(
        [PlanItem(source.key, source.nbytes, SHARD_EXTENT_BYTES if SHARD_SEPARATOR in source.key else None)
         for source in sources],
        small_array_bytes=settings.small_array_bytes,
        pack_bytes=settings.pack_bytes,
        chunk_bytes=settings.chunk_bytes,
    )


def prepare_write(
    entries: Sequence[SaveEntry], object_graph: dict, *, settings: WriteSettings | None = None
) -> PreparedWrite:
    """Validate ``entries`` and ``object_graph`` and lay the entries out into data files.

    ``bytes`` values are taken and plain arrays copied now; snapshot sources are only inspected.
    Raises ``ValueError``/``TypeError`` as :func:`start_write` does.
    """
    settings = check_write_settings(settings)
    if not isinstance(object_graph, dict):
        raise TypeError(f"object_graph must be a dict, got {type(object_graph).__name__}")
    try:
        object_graph_json = json_text(object_graph)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"object_graph is not JSON-serialisable: {exc}") from None
    sources = prepare_sources(entries)
    layout_settings = PlanSettings.of(settings)
    plan = _plan(sources, layout_settings)
    arrays = tuple(index for index, source in enumerate(sources) if source.kind is SourceKind.ARRAY)
    sharded = tuple(entries) if any(SHARD_SEPARATOR in source.key for source in sources) else ()
    return PreparedWrite(tuple(sources), plan, GuardLayout(sources, plan), object_graph, layout_settings, arrays,
                         object_graph_json, sharded_entries=sharded)


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
    settings = check_write_settings(settings)
    storage = storage_of(settings, prefix)
    folder, stem = storage.split(prefix)
    if isinstance(entries, PreparedWrite):
        if object_graph is not None:
            raise TypeError("pass object_graph to prepare_write, not with a PreparedWrite")
        prepared = entries
        if prepared.plan_settings != PlanSettings.of(settings):
            again = prepared.sharded_entries or [SaveEntry(s.key, s.value) for s in prepared.sources]
            prepared = prepare_write(again, prepared.object_graph, settings=settings)
    else:
        prepared = prepare_write(entries, object_graph, settings=settings)
    team = None
    worker = settings.multi_worker
    checksums = None
    if worker is not None and worker.count > 1:
        if worker.check_replicas and worker.coordinator is not None:
            # every replicated value, before the share is taken (a shard has no replica to compare)
            checksums = replica_checksums([s for s in prepared.sources if not is_shard_item(s.key)],
                                          prepared.sharded_entries)
        team, prepared = _share_of(prepared, worker)
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
            source = sources[index]
            sources[index] = Source(source.key, source.kind, source.value, source.dtype, source.shape, source.nbytes,
                                    source.off_host)
    runtime = runtime_of(settings)
    handle = WriteHandle(os.fspath(prefix), storage.canonical(prefix))
    job = _WriteJob(handle, storage, folder, stem, sources, prepared, callbacks, on_stats, settings, runtime.loop)
    if team is not None:
        if team.worker.coordinator is not None:
            job.coordinated = CoordinatedWrite(team, stem, handle.path, checksums)
        else:
            job.team = coordination.TeamWrite(team, stem, handle.path)
        handle._worker = pending_writes().thread_worker.index = team.worker.index
    try:
        job.snapshot.capture_device_values(settings.staging_budget_bytes)
        job.snapshot.install_guards()
    except BaseException:
        job.snapshot.close()
        raise
    previous = pending_writes().add(handle)
    job.snapshot_seconds = time.perf_counter() - started
    try:
        future = runtime.submit(job.run(previous, started))
    except BaseException as exc:
        job.snapshot.close()
        handle._future.set_exception(exc)
        raise
    _chain(future, handle._future)
    return handle


def _share_of(prepared: PreparedWrite, worker: MultiWorker) -> tuple[coordination.Team, PreparedWrite]:
    """The save as a whole, and the part of it this worker writes (its sources, laid out alone)."""
    sources = prepared.sources
    # Every worker holds every replicated value (and each sharded value's declaration): those are
    # shared out by size. A shard is written by the worker that holds it.
    shared = [source for source in sources if not is_shard_item(source.key)]
    owners = coordination.assign([(source.key, source.nbytes) for source in shared], worker.count)
    specs = {source.key: TensorRecord(source.dtype, source.shape, source.nbytes, 0, ()) for source in shared}
    team = coordination.Team(worker, tuple(source.key for source in shared), owners, specs)
    mine = [index for index, source in enumerate(sources) if owners.get(source.key, worker.index) == worker.index]
    own = tuple(sources[index] for index in mine)
    plan = _plan(own, prepared.plan_settings)
    arrays = set(prepared.array_items)
    own_arrays = tuple(position for position, index in enumerate(mine) if index in arrays)
    return team, PreparedWrite(own, plan, GuardLayout(own, plan), prepared.object_graph, prepared.plan_settings,
                               own_arrays, prepared.object_graph_json, sharded_entries=prepared.sharded_entries)


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
        self.prepared = prepared
        self.callbacks = callbacks
        self.on_stats = on_stats
        self.settings: WriteSettings = settings
        self.budget = ByteBudget(settings.staging_budget_bytes)
        self.snapshot = Snapshot(sources, prepared.plan, self.budget, loop, prepared.layout,
                                 device_backend=settings.device_backend)
        self.snapshot_seconds = 0.0
        self._write_span = [float("inf"), 0.0]
        self.team: coordination.TeamWrite | None = None  # set for one worker of a multi-worker save
        self.coordinated: CoordinatedWrite | None = None  # instead, for one rank of a coordinated save

    async def write_own_part(self, previous: list[WriteHandle], part: dict[str, Any], *, clean_first: bool = False) -> None:
        """This process's data: its directory written, its manifest built, earlier writes waited for.

        ``part`` gets ``backend``, ``nonce``, ``data_dir``, ``lock`` and ``manifest`` as each
        exists, so the caller can clean up after a failure half-way. With ``clean_first`` debris
        of crashed writes is removed before the data goes out (a writer alone in the folder).
        """
        if self.snapshot.captures_device_values:
            await asyncio.to_thread(self.snapshot.start_device_copies)
        backend = part["backend"] = await self.storage.open(self.folder)
        await backend.prepare()
        # On object storage the commit is a conditional write on what P.index holds now: a writer
        # elsewhere committing this path while this one writes makes this commit fail.
        await backend.observe(index_name(self.stem))
        nonce, part["lock"] = await create_data_dir(backend, self.stem)
        part["nonce"] = nonce
        data_dir = part["data_dir"] = data_dir_name(self.stem, nonce)
        if clean_first and backend.cleans_debris:
            await clean_debris(backend, exclude=data_dir)
        await self._write_files(backend, data_dir)
        with gc_paused():
            part["manifest"] = self._manifest(data_dir)
        for earlier in previous:
            await quietly_wait(earlier)
        if previous:  # this process's earlier writes to the path come first (FIFO): commit after theirs
            await backend.observe(index_name(self.stem))
        if not await part["lock"].renew():
            raise StorageError(f"{backend.describe(data_dir)} was not committed: its lease ran out and another "
                               "process took it over (its data may have been cleaned up); the save took longer "
                               "than the storage's lease_seconds")

    async def run(self, previous: list[WriteHandle], started: float) -> str:
        metrics = self.handle.metrics
        error: BaseException | None = None
        try:
            if self.coordinated is not None:
                await self.coordinated.run(self, previous)
            else:
                await self._write_and_commit(previous)
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
            logger.debug("save of %s: %d values, %d bytes in %d data files in %.3f s (stall %.3f s, data %.3f s, "
                         "commit %.3f s)%s", self.handle.path, len(self.sources), metrics.bytes_written,
                         metrics.files_written, metrics.total_seconds, metrics.snapshot_seconds,
                         metrics.writing_seconds, metrics.commit_seconds, f", failed: {error}" if error else "")
            if self.on_stats is not None:
                await self._report(error)

    async def _write_and_commit(self, previous: list[WriteHandle]) -> None:
        """A write alone, or one worker's part of the file protocol (:mod:`~asyncckpt.io.coordination`)."""
        metrics = self.handle.metrics
        part: dict[str, Any] = {}
        committed = False
        team = self.team
        try:
            await self.write_own_part(previous, part, clean_first=team is None)
            backend, nonce, data_dir, manifest = part["backend"], part["nonce"], part["data_dir"], part["manifest"]
            if team is not None:
                await team.start(backend)
                await team.check_locks(backend)
                if team.is_chief and backend.cleans_debris:
                    # Only once the locks are known to exclude: where they do not, a live
                    # worker's directory would look like debris (its lock free to this host).
                    await clean_debris(backend, exclude=data_dir)
            if team is not None and not team.is_chief:
                # Once published, the section may be merged at any moment: from here on the
                # data directory is left to the chief's commit or, failing that, to cleanup.
                committed = True
                await team.publish_and_wait(backend, data_dir, nonce, manifest)
            else:
                if team is not None:
                    manifest = await team.gather(backend, nonce, manifest)
                manifest = manifest.folded()
                commit_started = time.perf_counter()
                await publish(backend, self.stem, nonce, manifest, self._encoded(manifest) if team is None else None)
                committed = True
                metrics.commit_seconds = time.perf_counter() - commit_started
        except BaseException:
            self.snapshot.close()
            if not committed:
                await discard_uncommitted(part.get("backend"), self.stem, part.get("data_dir"))
            raise
        finally:
            if team is not None and "backend" in part:
                await team.drop_claims(part["backend"])
                await team.release_probe()
            if part.get("lock") is not None:
                with contextlib.suppress(Exception):
                    await part["lock"].release()

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
        with pending_writes().calling_back(self.handle):
            callback()

    async def _write_files(self, backend: Backend, data_dir: str) -> None:
        semaphore = asyncio.Semaphore(self.settings.max_concurrent_writes)
        try:
            async with asyncio.TaskGroup() as group:
                for index in range(len(self.plan.files)):
                    await semaphore.acquire()
                    group.create_task(self._write_one(backend, data_dir, index, semaphore))
        except BaseExceptionGroup as group:
            raise first_error(group) from None
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
            progress = self.settings.on_progress
            if progress is not None:
                try:
                    progress(self.handle.metrics.bytes_written, self.plan.total_bytes)
                except Exception:  # noqa: BLE001 - watching a write must never fail it
                    logger.exception("the progress callback of %s failed", self.handle.path)
        finally:
            self.snapshot.file_written(index)
            semaphore.release()

    def _encoded(self, manifest: Manifest) -> bytes:
        """``manifest.to_json()``, from the object graph encoded once and this layout's ``tensors`` template."""
        if manifest.sharded:
            return manifest.to_json(object_graph_json=self.prepared.object_graph_json or None)
        slot = self.prepared.tensors_json
        if slot[0] is None:
            slot[0] = TensorsJson(manifest.tensors)
        return manifest.to_json(object_graph_json=self.prepared.object_graph_json or None,
                                tensors_json=slot[0].text(checksums_of(manifest.tensors)))

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

