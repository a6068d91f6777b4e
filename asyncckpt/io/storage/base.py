"""The storage interface: what the pipeline asks of a place that holds checkpoint bytes.

A :class:`Storage` (chosen through ``WriteSettings.storage`` / ``ReadSettings.storage``) maps
checkpoint paths to folders and opens one :class:`Backend` per checkpoint folder; a backend sees
names and bytes, never arrays. Every backend reports failures as :class:`StorageError` (an
``OSError`` carrying the errno when one is known) naming the path, a byte range past the end of a
value as :class:`TruncatedError`, and a missing value as ``None``; the helpers here build those
errors so every backend words them alike.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from asyncckpt.errors import CorruptCheckpointError

__all__ = [
    "StorageError",
    "TruncatedError",
    "CommitConflictError",
    "NotRegularFileError",
    "StreamedValue",
    "Lock",
    "Backend",
    "BackendWrapper",
    "Storage",
    "CAPABILITIES",
    "as_storage_error",
    "byte_views",
    "from_os_error",
    "not_a_regular_file",
    "storage_error",
]


class StorageError(OSError):
    """A storage operation failed (disk full, permission denied, I/O error, ...)."""


class TruncatedError(StorageError):
    """A byte range was requested past the end of a stored value."""


class CommitConflictError(StorageError):
    """A conditional commit was refused: another writer committed the same name since this write began."""


class NotRegularFileError(StorageError, CorruptCheckpointError):
    """Where a stored value should be, something else is: a FIFO, a device, a directory, a link.

    Backends raise it without reading from the thing (a FIFO would block the reader for ever).
    No checkpoint file is ever anything but a regular file, so it is also a
    ``CorruptCheckpointError``; readers catch it to name what they expected there (a manifest,
    a key's data file). ``path`` is the location and ``problem`` what was found, worded to
    follow the path.
    """

    path: str
    problem: str


def not_a_regular_file(path: str, problem: str, code: int | None = None) -> NotRegularFileError:
    """A :class:`NotRegularFileError` saying ``path`` ``problem`` (e.g. "is a FIFO, not a regular file")."""
    error = NotRegularFileError(f"{path} {problem}") if code is None else NotRegularFileError(code, f"{path} {problem}")
    error.path = path
    error.problem = problem
    return error


def as_storage_error(error: NotRegularFileError, consequence: str) -> StorageError:
    """``error`` as a plain :class:`StorageError`, for files that are not checkpoint files (locks, writes)."""
    message = f"{error.path} {error.problem}; {consequence}"
    return StorageError(message) if error.errno is None else StorageError(error.errno, message)


def storage_error(what: str, detail: str, code: int | None = None) -> StorageError:
    """A :class:`StorageError` saying ``what`` failed (the operation and its path), with ``code`` as errno."""
    if code is None:
        return StorageError(f"{what}: {detail}")
    return StorageError(code, f"{what}: {detail}")


def from_os_error(exc: OSError, what: str) -> StorageError:
    """``exc`` as a :class:`StorageError` naming ``what`` failed, keeping its errno."""
    if isinstance(exc, StorageError):
        return exc
    if exc.errno is not None:
        return storage_error(what, exc.strerror or str(exc), exc.errno)
    return storage_error(what, str(exc))


class StreamedValue(abc.ABC):
    """A value for :meth:`Backend.write` that is produced while it is being written.

    The filesystem backend consumes :meth:`segments` batch by batch, so the value never exists as
    one buffer; other backends call :meth:`to_bytearray`. The producer (the write pipeline) serves
    bytes straight from live arrays and keeps each batch's bytes unchanged only until the consumer
    asks for the next batch (or closes the iterator), so a consumer must be done with a batch --
    written it, or copied it -- before it advances.
    """

    #: Total number of bytes the segments add up to.
    size: int

    @abc.abstractmethod
    def segments(self) -> Iterator[Sequence[memoryview]]:
        """Yield batches of flat byte buffers which, concatenated in order, are the value."""

    def to_bytearray(self) -> bytearray:
        """The whole value as one buffer (for backends that need one), gathered on first use."""
        gathered = getattr(self, "_gathered", None)
        if gathered is not None:
            return gathered
        buffer = bytearray(self.size)
        view = memoryview(buffer)
        position = 0
        with contextlib.closing(self.segments()) as batches:
            for batch in batches:
                for piece in batch:
                    view[position : position + len(piece)] = piece
                    position += len(piece)
        if position != self.size:
            raise ValueError(f"a streamed value produced {position} bytes instead of {self.size}")
        self._gathered = buffer
        return buffer

    def readinto(self, buffer: Any) -> int:
        """Copy the next bytes into ``buffer``; return how many, 0 at the end.

        For consumers that copy anyway (direct I/O through a bounce buffer): the producer need not
        keep the bytes stable while the copy is written. Do not mix with :meth:`segments`.
        """
        view = memoryview(buffer).cast("B")
        if getattr(self, "_reading", None) is None:
            self._reading = iter(self.segments())
            self._rest: list[memoryview] = []
        filled = 0
        while filled < len(view):
            if not self._rest:
                batch = next(self._reading, None)
                if batch is None:
                    break
                self._rest = byte_views(batch)
                continue
            piece = self._rest[0]
            take = min(len(piece), len(view) - filled)
            view[filled : filled + take] = piece[:take]
            filled += take
            if take == len(piece):
                self._rest.pop(0)
            else:
                self._rest[0] = piece[take:]
        return filled

    # Byte-string conveniences for code written against plain buffers (wrappers, fault injectors).
    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return bytes(self.to_bytearray())

    def __getitem__(self, index):
        return self.to_bytearray()[index]


def byte_views(buffers: Sequence[Any]) -> list[memoryview]:
    """Flat byte views of ``buffers`` (any buffer-protocol objects), empty ones left out."""
    views = []
    for buffer in buffers:
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes:
            views.append(view)
    return views


class Lock(abc.ABC):
    """A held write lock on a data directory; released (and its marker removed) by :meth:`release`."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Remove the lock marker, then drop the lock. Idempotent."""

    async def renew(self) -> bool:
        """Whether the lock is still this writer's, extending it when it is a lease (object storage).

        A write asks just before it commits: a lease that ran out and was taken over by another
        process's cleanup means the data may be gone, and the write must fail instead. Locks that
        cannot be lost (``flock``, in-process locks) are always still held.
        """
        return True


class Backend(abc.ABC):
    """Storage for the entries of one folder (the directory holding ``P.index``).

    Names are relative to the folder; data files are ``"<data_dir>/<file>"``.
    """

    #: Whether a write into this folder may delete debris left by crashed writes. Only safe when
    #: :meth:`lock_new`/:meth:`try_lock` exclude every writer that can reach the folder.
    cleans_debris: bool = True

    @abc.abstractmethod
    def describe(self, name: str) -> str:
        """A human-readable location of ``name`` (a path or URL), for messages."""

    @abc.abstractmethod
    async def prepare(self) -> None:
        """Create the folder (and its parents) if missing, durably."""

    @abc.abstractmethod
    async def create_data_dir(self, name: str) -> None:
        """Create the (empty) data directory ``name``, durably."""

    @abc.abstractmethod
    async def write(self, key: str, value: bytes | bytearray | memoryview | StreamedValue) -> None:
        """Store ``value`` under ``key``, durably, replacing any old value.

        A :class:`StreamedValue` must be consumed completely (or the write must fail).
        """

    @abc.abstractmethod
    async def read(self, key: str, start: int = 0, stop: int | None = None) -> bytes | None:
        """Bytes ``[start, stop)`` of ``key``; ``None`` if it does not exist.

        Raises :class:`TruncatedError` when the range extends past the end of the value.
        """

    async def holds(self, key: str, end: int) -> bool | None:
        """Whether ``key`` holds at least ``end`` bytes; ``None`` if it does not exist.

        Lets a reader refuse a value a crafted manifest claims past the end of its file before
        allocating room for it. This default probes the last byte through :meth:`read`.
        """
        if end <= 0:
            return True if await self.read(key, 0, 0) is not None else None
        try:
            return await self.read(key, end - 1, end) is not None or None
        except TruncatedError:
            return False

    async def read_into(self, key: str, start: int, buffers: Sequence[Any]) -> bool:
        """Fill ``buffers`` (writable buffers, in order) from ``key`` starting at byte ``start``.

        Returns ``False`` if ``key`` does not exist; raises :class:`TruncatedError` when the value
        ends before the buffers are full. This default reads through :meth:`read` and copies, so a
        wrapper overriding :meth:`read` sees every read; backends that can scatter a read into the
        buffers directly override it.
        """
        views = byte_views(buffers)
        total = sum(view.nbytes for view in views)
        data = await self.read(key, start, start + total)
        if data is None:
            return False
        if len(data) != total:
            raise TruncatedError(f"reading {self.describe(key)}: got {len(data)} of {total} bytes")
        source = memoryview(data)
        position = 0
        for view in views:
            view[:] = source[position : position + view.nbytes]
            position += view.nbytes
        return True

    @abc.abstractmethod
    async def commit(self, name: str, tmp_name: str, value: bytes) -> None:
        """Atomically and durably publish ``value`` as ``name``.

        Afterwards ``name`` holds either its old value or ``value`` even across a crash; ``tmp_name``
        is where a backend that needs a temporary stages it (and deletes it on failure).
        """

    @abc.abstractmethod
    async def list_names(self) -> set[str]:
        """Names directly in the folder (files and directories)."""

    @abc.abstractmethod
    async def delete(self, name: str) -> None:
        """Remove ``name`` durably; a missing name is not an error."""

    @abc.abstractmethod
    async def delete_tree(self, name: str) -> None:
        """Remove the directory ``name`` and everything in it; missing is not an error."""

    async def rename(self, name: str, new_name: str) -> bool:
        """Move ``name`` to the (unused) ``new_name``; ``False`` if ``name`` does not exist.

        Of several renames of one name, at most one succeeds where the backend can rename
        atomically (files, and in-process stores). This default copies then deletes: it is
        atomic only against other calls in this process made through the same backend class.
        """
        data = await self.read(name)
        if data is None:
            return False
        await self.commit(new_name, new_name + ".tmp", data)
        await self.delete(name)
        return True

    @abc.abstractmethod
    async def lock_new(self, name: str) -> Lock | None:
        """Create the lock marker ``name`` and hold it; ``None`` if that raced with a cleaner."""

    @abc.abstractmethod
    async def try_lock(self, name: str) -> Lock | None:
        """Take the existing lock marker ``name`` if nobody holds it; else ``None``."""

    async def check_data_dir(self, name: str) -> None:
        """Raise ``CorruptCheckpointError`` if data directory ``name`` resolves outside the folder."""

    async def observe(self, name: str) -> None:
        """Note what ``name`` holds now: a backend that commits conditionally (object storage) then
        commits ``name`` only if nobody has changed it since, raising :class:`CommitConflictError`
        otherwise. By default nothing is noted and a commit replaces whatever is there."""


class BackendWrapper(Backend):
    """A backend forwarding everything to ``inner``; subclass it to inject faults or gates."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.cleans_debris = inner.cleans_debris

    def describe(self, name):
        return self.inner.describe(name)

    async def prepare(self):
        await self.inner.prepare()

    async def create_data_dir(self, name):
        await self.inner.create_data_dir(name)

    async def write(self, key, value):
        await self.inner.write(key, value)

    async def read(self, key, start=0, stop=None):
        return await self.inner.read(key, start, stop)

    async def commit(self, name, tmp_name, value):
        await self.inner.commit(name, tmp_name, value)

    async def list_names(self):
        return await self.inner.list_names()

    async def delete(self, name):
        await self.inner.delete(name)

    async def delete_tree(self, name):
        await self.inner.delete_tree(name)

    async def rename(self, name, new_name):
        return await self.inner.rename(name, new_name)

    async def lock_new(self, name):
        return await self.inner.lock_new(name)

    async def try_lock(self, name):
        return await self.inner.try_lock(name)

    async def check_data_dir(self, name):
        await self.inner.check_data_dir(name)

    async def observe(self, name):
        await self.inner.observe(name)


#: The names of the capability flags of :class:`Storage`.
CAPABILITIES = ("durable", "hierarchical", "keeps_empty_folders", "locks_across_processes")


class Storage(abc.ABC):
    """Maps checkpoint paths to backends. Injected through the read/write settings.

    Every storage keeps the promises of :class:`Backend`. The capability flags say which further
    promises it makes, where storages legitimately differ; each is ``False`` unless a storage
    claims it, and the backend contract suite (``asyncckpt.testing.storage_contract``) checks
    what is claimed.
    """

    #: What is written outlives the process: a storage made afresh over the same location sees it.
    durable: bool = False
    #: Names are paths in a directory tree: a value's name cannot also be a folder, and writing
    #: below it fails with a :class:`StorageError`.
    hierarchical: bool = False
    #: ``create_data_dir`` makes a real directory, listed while still empty.
    keeps_empty_folders: bool = False
    #: Write locks exclude writers in other processes, not only in this one.
    locks_across_processes: bool = False

    @abc.abstractmethod
    def split(self, path: str) -> tuple[str, str]:
        """``(folder, stem)`` of checkpoint path ``path``; ``ValueError`` if it names no file."""

    @abc.abstractmethod
    async def open(self, folder: str) -> Backend:
        """A backend for ``folder`` (one open per checkpoint operation)."""

    @abc.abstractmethod
    def canonical(self, path: str) -> str:
        """The canonical spelling of a checkpoint or folder path (to match pending writes)."""
