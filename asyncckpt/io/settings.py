"""Knobs and figures of the I/O side: what a write or a read may use, and what it did."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any


from asyncckpt._runtime import Runtime, get_runtime
from asyncckpt.io.coordinator import check_timeout
from asyncckpt.format import MAX_DATA_DIRS
from asyncckpt.io.storage import Storage, default_storage, storage_for_path

logger = logging.getLogger("asyncckpt")


MiB = 1 << 20


def require_positive_int(owner: str, name: str, value: Any) -> None:
    if type(value) is not int or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class MultiWorker:
    """This process's place in a multi-worker save: worker ``index`` of ``count``.

    Every worker runs the same program (same objects, same values, same saves) and saves to the
    same path on a filesystem all of them see. Worker 0 is the chief: it writes the object graph,
    merges the sections and commits the checkpoint, and only its ``checkpoint`` state file and
    deletions of old checkpoints happen. ``count == 1`` is an ordinary single-writer save.

    Parameters
    ----------
    index:
        This worker's number, ``0 <= index < count``.
    count:
        How many workers save together (at least 1).
    timeout_seconds:
        How long the chief waits for the other workers' sections, and a non-chief for the chief's
        commit, before the save fails with :class:`~asyncckpt.errors.CheckpointTimeoutError`.
    coordinator:
        An :class:`~asyncckpt.io.coordinator.Coordinator` (``torch.distributed``, in-process) the
        workers save through: sections and outcomes travel by its collectives, with no section
        files, claims, cross-host locks or polling. Build it with :meth:`of`. Without one, the
        workers coordinate through files on the shared filesystem.
    check_locks:
        Without a coordinator: whether each save first checks that the chief's lock keeps the
        other workers out (where ``flock`` is local to each host, every save fails at once with an
        error that says so, instead of waiting out its timeout). ``False`` skips the check on a
        filesystem known to lock across hosts.
    check_replicas:
        With a coordinator: every rank checksums all of its values at ``save()`` (not only the
        share it writes), and the chief refuses the save, naming ranks and keys, where replicas
        differ -- a pass over the whole state on every rank, so off by default. Values on a
        device are not compared.
    """

    index: int
    count: int
    timeout_seconds: float = 600.0
    coordinator: Any = field(default=None, compare=False, repr=False)
    check_locks: bool = True
    check_replicas: bool = False

    @classmethod
    def of(cls, coordinator: Any, *, check_replicas: bool = False) -> "MultiWorker":
        """This process's place in a save through ``coordinator`` (its rank, count and timeout)."""
        return cls(coordinator.rank, coordinator.count, coordinator.timeout_seconds, coordinator=coordinator,
                   check_replicas=check_replicas)

    def __post_init__(self) -> None:
        if type(self.count) is not int or not 1 <= self.count <= MAX_DATA_DIRS:
            raise ValueError(f"MultiWorker.count must be an int in [1, {MAX_DATA_DIRS}], got {self.count!r}")
        if type(self.index) is not int or not 0 <= self.index < self.count:
            raise ValueError(
                f"MultiWorker.index must be an int with 0 <= index < count ({self.count}), got {self.index!r}"
            )
        check_timeout(self.timeout_seconds, "MultiWorker.timeout_seconds")
        if self.coordinator is not None and (self.coordinator.rank, self.coordinator.count) != (self.index, self.count):
            raise ValueError(
                f"MultiWorker is worker {self.index} of {self.count}, but its coordinator is rank "
                f"{self.coordinator.rank} of {self.coordinator.count}; use MultiWorker.of(coordinator)"
            )

    @property
    def is_chief(self) -> bool:
        """Whether this worker merges and commits (worker 0)."""
        return self.index == 0



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
        A :class:`MultiWorker`: this write is one worker's part of a
        save by several workers to a shared filesystem (each writes its share of the bytes; the
        chief merges and commits). ``None`` or ``count == 1``: a single writer.
    on_progress:
        Called as ``on_progress(bytes written, bytes in all)`` as each data file is durable, on the
        background loop (keep it quick: ``asyncckpt.progress.Progress`` draws a progress line).
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
    on_progress: Any = None

    def __post_init__(self) -> None:
        if self.on_progress is not None and not callable(self.on_progress):
            raise TypeError(f"WriteSettings.on_progress must be callable or None, got {self.on_progress!r}")
        if self.multi_worker is not None and not isinstance(self.multi_worker, MultiWorker):
            raise TypeError(
                f"WriteSettings.multi_worker must be an asyncckpt.MultiWorker or None, got {self.multi_worker!r}"
            )
        for name in ("staging_budget_bytes", "chunk_bytes", "pack_bytes", "small_array_bytes", "max_concurrent_writes"):
            require_positive_int("WriteSettings", name, getattr(self, name))
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
        Byte-range reads in flight at once: one per core, 4 to 8 (a read out of the page cache
        is a copy on a core, and more of them than cores keep the program's own threads waiting
        for one; a cold read wants a few in flight for the disk's queue).
    coalesce_gap_bytes:
        Extents of one file at most this far apart are fetched by one read.
    max_read_bytes:
        Upper bound of a coalesced read (a single larger extent is still read whole).
    storage, runtime:
        As in :class:`WriteSettings`.
    """

    max_concurrent_reads: int = min(8, max(4, os.cpu_count() or 4))
    coalesce_gap_bytes: int = 1 * MiB
    max_read_bytes: int = 64 * MiB
    storage: Storage | None = None
    runtime: Runtime | None = None

    def __post_init__(self) -> None:
        require_positive_int("ReadSettings", "max_concurrent_reads", self.max_concurrent_reads)
        require_positive_int("ReadSettings", "max_read_bytes", self.max_read_bytes)
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
class ReadStats:
    """What one restore read, per stage: handed to ``CheckpointOptions.experimental_metrics_callback``.

    Attributes
    ----------
    path:
        The checkpoint path.
    tensors, bytes_read, files_read:
        Values read, bytes read from data files (every one verified) and data files read from.
    open_seconds:
        Reading and checking ``P.index``.
    read_seconds:
        Reading and verifying values (every batch of the restore together).
    total_seconds:
        From the restore's start to its end.
    error:
        The exception that failed the restore, or ``None``.
    """

    path: str
    tensors: int
    bytes_read: int
    files_read: int
    open_seconds: float
    read_seconds: float
    total_seconds: float
    error: Exception | None = None


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

def storage_of(settings, path=None) -> Storage:
    """The settings' storage; without one, where ``path`` is (an ``s3://`` bucket, else the filesystem)."""
    if settings.storage is not None:
        return settings.storage
    return storage_for_path(os.fspath(path)) if path is not None else default_storage()


def runtime_of(settings) -> Runtime:
    return settings.runtime if settings.runtime is not None else get_runtime()


@dataclass(frozen=True)
class PlanSettings:
    """The part of :class:`WriteSettings` that decides the layout of data files (see ``plan``)."""

    small_array_bytes: int
    pack_bytes: int
    chunk_bytes: int

    @classmethod
    def of(cls, settings: WriteSettings) -> PlanSettings:
        return cls(settings.small_array_bytes, settings.pack_bytes, settings.chunk_bytes)


def check_write_settings(settings: WriteSettings | None) -> WriteSettings:
    settings = settings if settings is not None else WriteSettings()
    if not isinstance(settings, WriteSettings):
        raise TypeError(f"settings must be a WriteSettings, got {type(settings).__name__}")
    return settings


def check_read_settings(settings: ReadSettings | None) -> ReadSettings:
    settings = settings if settings is not None else ReadSettings()
    if not isinstance(settings, ReadSettings):
        raise TypeError(f"settings must be a ReadSettings, got {type(settings).__name__}")
    return settings

