"""The read executor: open a committed checkpoint, read values straight into their destinations, verify.

:func:`open_reader` parses and validates ``P.index``; reads coalesce nearby extents into
byte-range reads (``plan.plan_read``), run up to ``max_concurrent_reads`` at a time straight into
the destination arrays, and verify every extent's CRC-32C and each value's whole CRC-32C before
returning. Device destinations are filled through pinned windows (``read_device``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np

from asyncckpt import _arrays, _cuda
from asyncckpt._runtime import Runtime, gc_paused, running_loop
from asyncckpt.errors import CorruptCheckpointError, NotFoundError
from asyncckpt.checksums import crc32c_combine
from asyncckpt.dtypes import describe_dtype
from asyncckpt.format import (
    BYTES_DTYPE,
    OBJECT_GRAPH_KEY,
    Extent,
    Manifest,
    ShardedRecord,
    TensorRecord,
    TensorSpec,
    is_tensorflow_index,
    object_graph_bytes,
    parse_manifest,
)
from asyncckpt.naming import index_name
from asyncckpt.shards import Box, ShardedTarget
from asyncckpt.io.plan import ReadRange, plan_read
from asyncckpt.io.storage import Backend, NotRegularFileError, TruncatedError

from asyncckpt.io.commit import check_bound, read_index
from asyncckpt.io.read_boxes import BoxReads, whole_box
from asyncckpt.io.read_tensorflow import TensorFlowParts, string_tensor, tensorflow_parts
from asyncckpt.io.read_device import DeviceReads, DeviceTarget
from asyncckpt.io.plan import ordered, scatter
from asyncckpt.io.settings import MiB, ReadSettings, check_read_settings, runtime_of, storage_of
from asyncckpt.io.tasks import first_error

logger = logging.getLogger("asyncckpt")


@dataclass
class ReadCounts:
    """Running totals of a reader's reads (for ``ReadStats`` and the DEBUG log)."""

    tensors: int = 0
    bytes: int = 0
    files: set = dataclasses.field(default_factory=set)
    seconds: float = 0.0

    def add(self, tensors: int, ranges: Sequence[ReadRange]) -> None:
        self.tensors += tensors
        self.bytes += sum(read_range.stop - read_range.start for read_range in ranges)
        self.files.update(read_range.file for read_range in ranges)


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`CheckpointReader.verify` checked: how many values and bytes."""

    tensors: int
    bytes: int


class CheckpointReader(DeviceReads, BoxReads):
    """Read access to one committed checkpoint: its keys, specs and verified values.

    Obtain it from :func:`open_reader` (or ``asyncckpt.load_checkpoint``). Besides the batched
    :meth:`read_many`/:meth:`aread_many`, it offers ``tf.train.CheckpointReader``'s names
    (:meth:`get_tensor`, :meth:`has_tensor`, the shape and dtype maps), so ported code runs.
    """

    def __init__(self, path: str, manifest: Manifest, backend: Backend, settings: ReadSettings, runtime: Runtime):
        self.path = path
        self._manifest = manifest
        if manifest.data_dirs:
            # Several data directories (a multi-worker save): each extent's file is named with
            # its directory, so reads and messages need no other change.
            self._prefix = ""
            self._tensors = {key: located(record, manifest.data_dirs) for key, record in manifest.tensors.items()}
        else:
            self._prefix = f"{manifest.data_dir}/"
            self._tensors = manifest.tensors
        self._backend = backend
        self._settings = settings
        self._runtime = runtime
        #: What reads through this reader have read so far: values, data bytes, data files, seconds.
        self.counts = ReadCounts()
        #: Called as ``on_progress(bytes done, bytes in all)`` as each batch's byte ranges arrive
        #: (``asyncckpt.progress.Progress`` draws a progress line); ``None``: nobody watches.
        self.on_progress = None

    @property
    def object_graph(self) -> dict:
        """The object graph stored with the checkpoint (a fresh copy)."""
        return json.loads(object_graph_bytes(self._manifest.object_graph))

    def own_object_graph(self) -> dict:
        """The object graph itself, not a copy: for the one restore that opened this reader.

        Copying a graph of 10,000 nodes costs an encode and a decode of it; the restore engine
        only fills in absent empty lists, and nobody else sees the reader it opened.
        """
        return self._manifest.object_graph

    def key_set(self) -> Any:
        """Every key, the object-graph key included, as a set-like view (no sorting)."""
        return _KeySet(self._tensors)

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

    def stored_bytes(self, key: str) -> int:
        """How many bytes the value of ``key`` takes in the data files (every shard of a sharded one)."""
        return self._record(key).nbytes

    def has_tensor(self, key: str) -> bool:
        """True when ``key`` is saved in this checkpoint (``tf.train.CheckpointReader``'s name)."""
        return isinstance(key, str) and key in self

    def get_tensor(self, key: str) -> np.ndarray | bytes:
        """The saved value of ``key``: a NumPy array, or ``bytes`` for string values.

        Raises
        ------
        TypeError
            When ``key`` is not a ``str``.
        KeyError
            Naming the key and the checkpoint, when the key is not saved.
        asyncckpt.CorruptCheckpointError
            When the stored bytes do not match their checksum.
        """
        if not isinstance(key, str):
            raise TypeError(f"checkpoint keys are str, got {type(key).__name__}")
        return self.read(key)

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        """``{key: shape as a list of ints}`` for every saved key (``[]`` for scalars and bytes)."""
        return {key: list(self.spec(key).shape) for key in self.keys()}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
        """``{key: NumPy dtype}``; string values (such as the object graph) map to ``object``.

        ``object`` is what ``tf.string.as_numpy_dtype`` gives, so ported code comparing dtypes
        keeps working.
        """
        return {key: _numpy_dtype(self.spec(key).dtype) for key in self.keys()}

    def __repr__(self) -> str:
        return f"CheckpointReader({self.path!r}, {len(self._tensors) + 1} keys)"

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
        Each byte range is read in windows of at most ``ReadSettings.max_read_bytes``, so memory
        stays within ``max_concurrent_reads`` windows whatever sizes the manifest claims.
        """
        tensors = self._tensors
        self._runtime.run(self._read(list(tensors), assemble=False))
        return VerifyReport(len(tensors), sum(record.nbytes for record in tensors.values()))

    def read_boxes(self, key: str, boxes: Sequence[Box], *, out: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
        """The elements of ``key`` in each of ``boxes``: one array per box, checksums verified.

        The value may be whole or stored as shards of any other slicing: only the extents holding
        bytes of the boxes are read, each verified whole. ``out`` may give, per box, a writable
        C-contiguous NumPy array of the box's shape and the value's dtype to read into.
        """
        target = ShardedTarget(tuple(boxes), tuple(out))
        return self._runtime.run(self._read([key], assemble=True, out={key: target}))[key]

    async def aread_boxes(self, key: str, boxes: Sequence[Box], *, out: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
        """The ``async`` twin of :meth:`read_boxes`."""
        target = ShardedTarget(tuple(boxes), tuple(out))
        return (await self._on_runtime(self._read([key], assemble=True, out={key: target})))[key]

    async def _on_runtime(self, coro):
        if running_loop() is self._runtime.loop:
            return await coro
        return await asyncio.wrap_future(self._runtime.submit(coro))

    def _destination(self, key: str, record: TensorRecord, given: Any) -> tuple[Any, memoryview]:
        """``(value, flat writable byte view)`` of the buffer ``key`` is read into."""
        if given is not None:
            if record.dtype == BYTES_DTYPE:
                raise ValueError(f"key {key!r} holds a byte string; it cannot be read into an array")
            if (
                not isinstance(given, np.ndarray)
                or given.dtype != record.spec.dtype
                or given.shape != record.shape
                or not given.flags.c_contiguous
                or not given.flags.writeable
            ):
                described = (
                    f"a {describe_dtype(given.dtype)}{list(given.shape)} array" if isinstance(given, np.ndarray)
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
        array = np.empty(record.shape, dtype=record.spec.dtype)
        return array, memoryview(array.reshape(-1).view(np.uint8))

    async def _read(
        self,
        keys: list[str],
        *,
        assemble: bool,
        out: Mapping[str, Any] | None = None,
        devices: Mapping[str, DeviceTarget] | None = None,
    ) -> dict[str, Any]:
        results: dict[str, Any] = {}
        records: dict[str, TensorRecord] = {}
        out = out or {}
        boxes: dict[str, ShardedTarget] = {}  # keys read by boxes: a sharded value, or boxes asked for
        whole: dict[str, Any] = {}  # of those, keys asked for whole: their one box, into this destination
        for key in keys:
            if key == OBJECT_GRAPH_KEY:
                results[key] = object_graph_bytes(self._manifest.object_graph)
                continue
            record = self._record(key)
            given = out.get(key)
            if type(given) is ShardedTarget:
                boxes[key] = given
            elif type(record) is ShardedRecord:
                if not assemble:
                    records.update(shard_pieces(key, record))
                    continue
                host = given if given is None or isinstance(given, np.ndarray) else None  # a device array: via host
                boxes[key], whole[key] = whole_box(record.shape, host), given
            else:
                records[key] = record
        unknown = [key for key in out if key not in records and key not in boxes]
        if unknown:
            raise KeyError(f"destinations given for keys that are not being read: {sorted(unknown)[:5]}")
        if boxes:
            results.update(await self._read_boxes(boxes))
            for key, given in whole.items():
                results[key] = results[key][0]
                if given is not None and not isinstance(given, np.ndarray):
                    _arrays.copy_into(given, results[key])
                    results[key] = given
            out = {key: value for key, value in out.items() if key in records}
        results.update(await self._read_records(records, assemble=assemble, out=out, devices=devices))
        return results

    async def _read_records(
        self,
        records: dict[str, TensorRecord],
        *,
        assemble: bool,
        out: Mapping[str, Any] | None = None,
        devices: Mapping[str, DeviceTarget] | None = None,
    ) -> dict[str, Any]:
        """Read whole ``records`` (into ``out``'s destinations where given), every checksum verified."""
        results: dict[str, Any] = {}
        out = out or {}
        devices = devices or {}
        ranges = plan_read(
            records,
            coalesce_gap_bytes=self._settings.coalesce_gap_bytes,
            max_range_bytes=self._settings.max_read_bytes,
        )
        await self._check_lengths(ranges)  # before allocating what a crafted manifest claims
        started = time.perf_counter()
        self.counts.add(len(records), ranges)
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

        destined = set(out)
        touched: set[str] = set()  # keys whose destination a read has started to fill

        progress, total, done = self.on_progress, sum(r.stop - r.start for r in ranges), [0]

        async def fetch(read_range: ReadRange) -> None:
            async with semaphore:
                touched.update(target.key for target in read_range.targets if target.key in destined)
                if assemble:
                    checked = await self._fetch_range(read_range, views, devices)
                else:
                    checked = await self._verify_range(read_range)
            for target, crc in zip(read_range.targets, checked):
                crcs[target.key][target.extent_index] = crc
            if progress is not None:
                done[0] += read_range.stop - read_range.start
                progress(done[0], total)

        try:
            if len(ranges) == 1:
                await fetch(ranges[0])
            else:
                async with asyncio.TaskGroup() as group:
                    for read_range in ranges:
                        group.create_task(fetch(read_range))
        except BaseExceptionGroup as group:
            raise _naming_modified(first_error(group), touched) from None
        except CorruptCheckpointError as error:
            raise _naming_modified(error, touched) from None
        self.counts.seconds += time.perf_counter() - started
        for key, record in records.items():
            try:
                self._check_whole(key, record, crcs[key])
            except CorruptCheckpointError as error:
                raise _naming_modified(error, touched) from None
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
            try:
                found = await self._backend.holds(f"{self._prefix}{file}", read_range.stop)
            except NotRegularFileError as exc:
                raise self._corrupt(read_range.targets[0].key, file, exc.problem) from None
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
        self, read_range: ReadRange, views: dict[str, memoryview], devices: Mapping[str, DeviceTarget] | None = None
    ) -> list[int]:
        """Read one range straight into the targets' buffers; return each target's verified CRC."""
        if devices and any(target.key in devices for target in read_range.targets):
            if ordered(read_range.targets):
                return await self._fetch_windows(read_range, views, devices)
            return await self._fetch_overlapping(read_range, views, devices)
        buffers, pieces, copies = scatter(read_range, views)
        await self._read_into(read_range, 0, buffers)
        if read_range.stop - read_range.start >= MiB:
            return await asyncio.to_thread(self._verify, read_range, pieces, copies)
        return self._verify(read_range, pieces, copies)

    async def _verify_range(self, read_range: ReadRange) -> list[int]:
        """Each target's verified CRC, reading the range window by window (``max_read_bytes``).

        Verification keeps no bytes, so it needs one window per read in flight however large an
        extent a manifest claims: a sparse data file passes the length check at no cost in disk,
        and must not cost its claimed size in memory either.
        """
        length = read_range.stop - read_range.start
        window = memoryview(bytearray(min(length, self._settings.max_read_bytes)))
        crcs = [0] * len(read_range.targets)
        for position in range(0, length, len(window)):
            view = window[: min(len(window), length - position)]
            await self._read_into(read_range, position, [view])
            if len(view) >= MiB:
                await asyncio.to_thread(_fold_window, read_range.targets, position, view, crcs)
            else:
                _fold_window(read_range.targets, position, view, crcs)
        for target, crc in zip(read_range.targets, crcs):
            if crc != target.crc32c:
                raise self._checksum_mismatch(read_range, target, crc)
        return crcs

    async def _read_into(self, read_range: ReadRange, offset: int, buffers: list[Any]) -> None:
        """Fill ``buffers`` from the range's file at ``offset`` bytes into the range."""
        try:
            found = await self._backend.read_into(
                f"{self._prefix}{read_range.file}", read_range.start + offset, buffers
            )
        except TruncatedError:
            raise await self._truncation(read_range) from None
        except NotRegularFileError as exc:  # replaced by something else since it was looked at
            raise self._corrupt(read_range.targets[0].key, read_range.file, exc.problem) from None
        if not found:
            raise self._corrupt(read_range.targets[0].key, read_range.file, "is missing")

    async def _truncation(self, read_range: ReadRange, *, definite: bool = True) -> CorruptCheckpointError | None:
        """Name the first key of ``read_range`` whose bytes lie past the end of the file.

        ``None`` when none does and ``definite`` is false (the caller looks at further ranges).
        """
        key = f"{self._prefix}{read_range.file}"
        for target in read_range.targets:
            end = read_range.start + target.range_offset + target.length
            try:
                await self._backend.read(key, end - 1, end)
            except NotRegularFileError as exc:
                return self._corrupt(target.key, read_range.file, exc.problem)
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


def _fold_window(targets, position: int, view: memoryview, crcs: list[int]) -> None:
    """Fold the bytes of ``view`` (at ``position`` in its range) into each target's running CRC."""
    end = position + len(view)
    for index, target in enumerate(targets):
        start = max(target.range_offset, position)
        stop = min(target.range_offset + target.length, end)
        if start < stop:
            crcs[index] = crc32c.crc32c(view[start - position : stop - position], crcs[index])


def located(record: TensorRecord | ShardedRecord, data_dirs: Sequence[str]) -> TensorRecord | ShardedRecord:
    """``record`` with each extent's file named ``<its data directory>/<file>``."""
    if type(record) is ShardedRecord:
        return ShardedRecord(record.dtype, record.shape,
                             tuple((offset, located(shard, data_dirs)) for offset, shard in record.shards))
    extents = tuple(
        Extent(f"{data_dirs[e.dir]}/{e.file}", e.offset, e.length, e.crc32c) for e in record.extents
    )
    return dataclasses.replace(record, extents=extents)


class TensorFlowReader(CheckpointReader):
    """A TensorFlow checkpoint (TensorBundle), read through the same interface and executor as ours.

    Its tensors are records whose extents lie in ``P.data-NNNNN-of-NNNNN`` beside ``P.index``, a
    partitioned variable a sharded record of its slices; string tensors are read apart, in
    TensorFlow's framing (``read_tensorflow``). ``name_based`` is true for a TF1 checkpoint
    (``tf.compat.v1.train.Saver``), which has no object graph: its keys are variable names.
    """

    def __init__(self, path: str, parts: TensorFlowParts, backend: Backend, settings: ReadSettings, runtime: Runtime):
        super().__init__(path, parts.manifest, backend, settings, runtime)
        self._prefix = ""  # the data files lie beside P.index, not in a data directory
        self._parts = parts
        self.name_based = parts.name_based

    def __repr__(self) -> str:
        return f"TensorFlowReader({self.path!r}, {len(self.keys())} keys)"

    @property
    def data_dirs(self) -> tuple[str, ...]:
        return ()

    def own_object_graph(self) -> dict | None:
        """The object graph (TensorFlow's proto as asyncckpt's JSON); ``None`` for a name-based checkpoint."""
        return None if self.name_based else self._manifest.object_graph

    def keys(self) -> list[str]:
        keys = super().keys()
        return [key for key in keys if key != OBJECT_GRAPH_KEY] if self.name_based else keys

    def __contains__(self, key: object) -> bool:
        return not (self.name_based and key == OBJECT_GRAPH_KEY) and super().__contains__(key)

    async def _read(self, keys, *, assemble, out=None, devices=None):
        strings = [key for key in keys if key in self._parts.strings or key == OBJECT_GRAPH_KEY]
        if not strings:
            return await super()._read(keys, assemble=assemble, out=out, devices=devices)
        if out and any(key in out for key in strings):
            raise ValueError(f"key {strings[0]!r} holds strings; it cannot be read into an array")
        others = [key for key in keys if key not in strings]
        results = await super()._read(others, assemble=assemble, out=out, devices=devices) if others else {}
        stem = self._manifest.data_dir  # (a TensorFlow checkpoint's data files are named after its stem)
        for key in strings:
            if key == OBJECT_GRAPH_KEY:
                if self.name_based:
                    raise KeyError(f"key {key!r} not found in checkpoint {self.path} (a name-based checkpoint)")
                value = self._parts.graph_proto  # TensorFlow's own bytes, as its reader gives them
            else:
                value = await string_tensor(self._backend, self.path, key, self._parts.strings[key], stem,
                                            self._parts.shards)
            if assemble:
                results[key] = value
        return results


async def _open(path, settings: ReadSettings, runtime: Runtime) -> CheckpointReader:
    storage = storage_of(settings, path)
    folder, stem = storage.split(path)
    backend = await storage.open(folder)
    index = index_name(stem)
    data = await read_index(backend, index)
    if data is None:
        raise NotFoundError(
            f"Failed to find any matching files for {path}: the checkpoint index {backend.describe(index)} "
            "does not exist"
        )
    if is_tensorflow_index(data):  # TensorFlow's TensorBundle: read as ours, through its own index
        parts = await tensorflow_parts(os.fspath(path), data, backend, stem, backend.describe(index))
        return TensorFlowReader(os.fspath(path), parts, backend, settings, runtime)
    with gc_paused():  # a large manifest is hundreds of thousands of small objects
        manifest = parse_manifest(data, source=backend.describe(index))
    check_bound(backend, stem, manifest)
    for data_dir in manifest.all_data_dirs:
        await backend.check_data_dir(data_dir)
    return CheckpointReader(os.fspath(path), manifest, backend, settings, runtime)


def open_reader(path, settings: ReadSettings | None = None) -> CheckpointReader:
    """Open the committed checkpoint at ``path``.

    Raises
    ------
    NotFoundError
        ``path.index`` does not exist (also a ``FileNotFoundError``).
    CorruptCheckpointError
        The manifest fails validation (``UnsupportedFormatError`` for an unknown version).
    """
    settings = check_read_settings(settings)
    runtime = runtime_of(settings)
    return runtime.run(_open(path, settings, runtime))


async def aopen_reader(path, settings: ReadSettings | None = None) -> CheckpointReader:
    """The ``async`` twin of :func:`open_reader`, usable from any event loop."""
    settings = check_read_settings(settings)
    runtime = runtime_of(settings)
    if running_loop() is runtime.loop:
        return await _open(path, settings, runtime)
    return await asyncio.wrap_future(runtime.submit(_open(path, settings, runtime)))


def shard_pieces(key: str, record: ShardedRecord) -> dict[str, TensorRecord]:
    """Each shard of ``record`` as a whole record of its own, named after the key and its offset."""
    return {f"{key} (shard at {list(offset)})": shard for offset, shard in record.shards}


def _numpy_dtype(dtype: Any) -> np.dtype:
    return np.dtype(object) if dtype == BYTES_DTYPE else np.dtype(dtype)


def _naming_modified(error: BaseException, touched: set[str]) -> BaseException:
    """``error``, which a read into caller-given destinations met, naming what it may have changed.

    A failed read leaves the destinations it started to fill with unverified bytes; the error
    says exactly which (``modified_keys``; every other destination is untouched).
    """
    if not isinstance(error, CorruptCheckpointError) or not touched or hasattr(error, "modified_keys"):
        return error
    keys = sorted(touched)
    shown = ", ".join(repr(key) for key in keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
    wrapped = type(error)(f"{error}; the destinations of {len(keys)} key(s) were modified and hold unverified "
                          f"bytes: {shown}")
    wrapped.modified_keys = tuple(keys)
    return wrapped


class _KeySet:
    """Membership in a reader's keys without building or sorting a list of them."""

    __slots__ = ("_tensors",)

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self._tensors = tensors

    def __contains__(self, key: object) -> bool:
        return key == OBJECT_GRAPH_KEY or key in self._tensors
