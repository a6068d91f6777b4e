"""Checkpoints on a local or network filesystem: :class:`FileStorage`, the default storage.

Data files are written and read with plain system calls in worker threads: a write streams a
:class:`StreamedValue` straight from the caller's buffers into the file (``writev``, no
intermediate copy) and a read scatters a byte range straight into the caller's buffers
(``preadv``), both with the GIL released. Large writes can bypass the page cache (``O_DIRECT``
through small aligned bounce buffers). On top this adds what a local or network filesystem needs:
the atomic ``P.index`` commit (temporary file, fsync, rename, directory fsync), durable directory
creation, ``flock`` write locks that let any process tell in-progress writes from crash debris, and
symlink checks. (TensorStore's ``file`` kvstore would copy every value once on the way in and once
on the way out, which halved the bandwidth.)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import shutil
import stat
import threading
from collections.abc import Sequence
from typing import Any

from asyncckpt._runtime import process_state
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.io.storage.base import (
    Backend,
    Lock,
    NotRegularFileError,
    Storage,
    StreamedValue,
    TruncatedError,
    as_storage_error,
    byte_views,
    from_os_error,
    not_a_regular_file,
)

__all__ = ["BounceBuffers", "FileStorage", "default_storage", "open_regular_file"]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, fsyncing each parent whose entry list changed."""
    missing = []
    head = path
    while head and not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
        _fsync_dir(os.path.dirname(directory) or ".")


_LINK_PROBLEM = (
    "is a symbolic link; checkpoint files must be regular files, not links that may point outside "
    "the checkpoint folder"
)
_BELOW_A_FILE_PROBLEM = "cannot exist: a directory on its path is a file, not a directory"
_OPEN_PROBLEMS = {
    errno.ELOOP: _LINK_PROBLEM,
    errno.ENOTDIR: _BELOW_A_FILE_PROBLEM,
    errno.ENXIO: "is a FIFO or device without a reader, not a regular file",  # opened to write
    errno.EISDIR: "is a directory, not a regular file",  # opened to write
}


def _what_it_is(mode: int) -> str:
    """How a file that is not a regular one is described in messages."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a file"


def _not_regular(path: str, mode: int):
    return not_a_regular_file(path, f"is {_what_it_is(mode)}, not a regular file")


def open_regular_file(path: str, flags: int, mode: int = 0o644, *, follow_links: bool = False) -> int:
    """Open ``path`` without blocking, if it is a regular file; a final symbolic link is refused.

    ``O_NONBLOCK`` keeps a FIFO (or a device) from blocking the open; ``fstat`` then refuses
    anything that is not a regular file, and the flag is cleared again for the regular file.
    ``O_NOFOLLOW`` (unless ``follow_links``) keeps a planted link from leading the open, or a
    file it creates, out of the folder. Raises :class:`NotRegularFileError` (links, FIFOs,
    directories, devices, a path through a file) and ``OSError`` as ``os.open`` does otherwise.
    """
    nofollow = 0 if follow_links else os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | nofollow | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        problem = _OPEN_PROBLEMS.get(exc.errno)
        if problem is None:
            raise
        raise not_a_regular_file(path, problem, exc.errno) from None
    try:
        file_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(file_mode):
            raise _not_regular(path, file_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


class _FileLock(Lock):
    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self._path = path

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Unlink while still holding the lock: only a lock holder may remove the marker.
        try:
            await asyncio.to_thread(_unlink_and_close, self._path, fd)
        except BaseException:
            os.close(fd)
            raise


def _unlink_and_close(path: str, fd: int) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _lock_file(path: str, create: bool) -> _FileLock | None:
    """Open and ``flock`` ``path``; ``None`` if held elsewhere, missing, or replaced meanwhile.

    Also ``None`` for anything but a regular file (a planted symbolic link, FIFO or directory is
    no marker of ours): it is never followed, opened for I/O or locked.
    """
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = open_regular_file(path, flags)
    except (FileNotFoundError, FileExistsError, NotRegularFileError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Whoever removes a marker holds its lock first, so a marker still at `path` with our
        # inode cannot be removed while we hold it. Anything else means we locked a dead file.
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return _FileLock(fd, path)


try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (AttributeError, OSError, ValueError):
    _IOV_MAX = 1024


def _write_all(fd: int, views: list[memoryview]) -> int:
    """Write every byte of ``views`` in order (``writev``, resuming after short writes)."""
    total = 0
    index = 0
    while index < len(views):
        batch = views[index : index + _IOV_MAX]
        written = os.writev(fd, batch) if len(batch) > 1 else os.write(fd, batch[0])
        total += written
        index = _skip_transferred(views, index, index + len(batch), written)
    return total


def _skip_transferred(views: list[memoryview], index: int, end: int, count: int) -> int:
    """After a vectored transfer of ``count`` bytes from ``views[index:end]``: the index to resume at.

    Views wholly transferred (empty ones included) are passed; one transferred in part is replaced
    by its remainder.
    """
    while index < end:
        view = views[index]
        if count < view.nbytes:
            views[index] = view[count:]
            break
        count -= view.nbytes
        index += 1
    return index


_DIRECT_ALIGNMENT = 4096  # O_DIRECT needs addresses, sizes and offsets aligned to the device's blocks
_BOUNCE_BYTES = 4 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class BounceBuffers:
    """Page-aligned buffers for direct writes, kept for reuse (fresh pages fault on first touch).

    One per process (``process_state().owned(BounceBuffers)``), keeping ``keep`` buffers.
    """

    def __init__(self, keep: int = 4) -> None:
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, _BOUNCE_BYTES)  # anonymous mappings are page-aligned

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffer)
                return
        buffer.close()


def _write_direct(fd: int, value: StreamedValue) -> int:
    """Write ``value`` to ``fd`` (opened with ``O_DIRECT``) through an aligned bounce buffer.

    Whole buffers go out with ``O_DIRECT``; the unaligned tail, and everything if the filesystem
    turns out to refuse direct I/O for this file (``EINVAL``), goes through the page cache. The
    value is read with ``readinto``, so its producer holds nothing while the device writes.
    """
    bounce_buffers = process_state().owned(BounceBuffers)
    bounce = bounce_buffers.take()
    view = memoryview(bounce)
    direct = True
    position = fill = 0

    def flush(nbytes: int) -> None:
        nonlocal direct, position
        chunk = view[:nbytes]
        while chunk:
            try:
                written = os.pwrite(fd, chunk, position)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                direct = False  # e.g. a filesystem without direct I/O: use the page cache
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
                continue
            position += written
            chunk = chunk[written:]

    try:
        while True:
            got = value.readinto(view[fill:])
            if not got:
                break
            fill += got
            if fill == _BOUNCE_BYTES:
                flush(fill)
                fill = 0
        aligned = fill - fill % _DIRECT_ALIGNMENT
        if aligned:
            flush(aligned)
        if fill > aligned:
            if direct:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
                direct = False
            view[: fill - aligned] = view[aligned:fill]
            flush(fill - aligned)
    finally:
        view.release()
        bounce_buffers.give(bounce)
    return position


def _write_file(path: str, value: Any, sync: bool, direct: bool = False) -> None:
    """Create or replace ``path`` with ``value``; with ``sync``, fsync it and its directory.

    With ``direct``, a streamed value of at least one bounce buffer is written with ``O_DIRECT``
    (see :class:`FileStorage`).
    """
    direct = bool(direct and _O_DIRECT and isinstance(value, StreamedValue) and value.size >= _BOUNCE_BYTES)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = _open_for_writing(path, flags | (_O_DIRECT if direct else 0))
    except OSError as exc:
        if not direct or exc.errno != errno.EINVAL:
            raise
        direct = False  # the filesystem refuses O_DIRECT at open (tmpfs on older kernels)
        fd = _open_for_writing(path, flags)
    try:
        if direct:
            written = _write_direct(fd, value)
        elif isinstance(value, StreamedValue):
            written = 0
            with contextlib.closing(value.segments()) as batches:
                for batch in batches:
                    written += _write_all(fd, byte_views(batch))
        else:
            _write_all(fd, byte_views([value]))
            written = None
        if written is not None and written != value.size:
            raise ValueError(f"a streamed value produced {written} bytes instead of {value.size}")
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if sync:
        _fsync_dir(os.path.dirname(path))


def _open_for_writing(path: str, flags: int) -> int:
    """Open a file to write; a symbolic link (which may lead out of the folder) or FIFO is refused.

    The refusal is a plain :class:`StorageError`: what is wrong is the folder, not a checkpoint.
    """
    try:
        try:
            return open_regular_file(path, flags)
        except FileNotFoundError:
            _makedirs_durable(os.path.dirname(path))  # a kvstore creates missing parents: so do we
            return open_regular_file(path, flags)
    except NotRegularFileError as exc:
        raise as_storage_error(exc, "refusing to write it") from None


def _open_for_reading(path: str) -> int | None:
    """Open a checkpoint file, ``None`` when missing; anything but a regular file is refused.

    A symbolic link may point outside the folder, and a FIFO would block the reader for ever.
    """
    try:
        return open_regular_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def _check_range(path: str, size: int, start: int, stop: int) -> None:
    if start < 0 or stop < start:
        raise ValueError(f"invalid byte range [{start}, {stop}) of {path}")
    if stop > size:
        raise TruncatedError(f"reading {path}: bytes [{start}, {stop}) requested but the file has {size}")


def _read_file(path: str, start: int, stop: int | None) -> bytes | None:
    fd = _open_for_reading(path)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        stop = size if stop is None else stop
        _check_range(path, size, start, stop)
        parts = []
        position = start
        while position < stop:
            part = os.pread(fd, stop - position, position)
            if not part:
                raise TruncatedError(f"reading {path}: the file ended at byte {position}, before {stop}")
            parts.append(part)
            position += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


#: The most one read system call asks for. A read out of the page cache is a copy inside the
#: kernel; one of 32 MiB kept a core for ~10 ms, in which the program's own threads waited (on a
#: 2-core machine, a 1 ms timer of the caller's event loop fired 15-20 ms late). 4 MiB calls cost
#: nothing measurable in bandwidth.
READ_CALL_BYTES = 4 << 20


def _read_batch_end(views: list[memoryview], index: int) -> int:
    """The end of the next vectored read from ``views[index]``: at most ``READ_CALL_BYTES``, one view at least."""
    end, total = index + 1, views[index].nbytes
    limit = min(len(views), index + _IOV_MAX)
    while end < limit and total + views[end].nbytes <= READ_CALL_BYTES:
        total += views[end].nbytes
        end += 1
    return end


def _read_file_into(path: str, start: int, buffers: Sequence[Any]) -> bool:
    fd = _open_for_reading(path)
    if fd is None:
        return False
    try:
        views = [view[offset : offset + READ_CALL_BYTES] if view.nbytes > READ_CALL_BYTES else view
                 for view in byte_views(buffers) for offset in range(0, max(view.nbytes, 1), READ_CALL_BYTES)]
        stop = start + sum(view.nbytes for view in views)
        _check_range(path, os.fstat(fd).st_size, start, stop)
        position = start
        index = 0
        while index < len(views):
            batch = views[index : _read_batch_end(views, index)]
            count = os.preadv(fd, batch, position)
            if count == 0:
                raise TruncatedError(f"reading {path}: the file ended at byte {position}, before {stop}")
            position += count
            index = _skip_transferred(views, index, index + len(batch), count)
        return True
    finally:
        os.close(fd)


class _FileBackend(Backend):
    def __init__(self, folder: str, *, sync: bool, direct: bool = False) -> None:
        self._folder = folder
        self._sync = sync
        self._direct = direct

    def describe(self, name: str) -> str:
        return os.path.join(self._folder, *name.split("/"))

    async def write(self, key: str, value: bytes | bytearray | memoryview | StreamedValue) -> None:
        path = self.describe(key)
        try:
            await asyncio.to_thread(_write_file, path, value, self._sync, self._direct)
        except OSError as exc:
            raise from_os_error(exc, f"writing {path}") from exc

    async def read(self, key: str, start: int = 0, stop: int | None = None) -> bytes | None:
        path = self.describe(key)
        try:
            return await asyncio.to_thread(_read_file, path, start, stop)
        except OSError as exc:
            raise from_os_error(exc, f"reading {path}") from exc

    async def read_into(self, key: str, start: int, buffers: Sequence[Any]) -> bool:
        path = self.describe(key)
        try:
            return await asyncio.to_thread(_read_file_into, path, start, buffers)
        except OSError as exc:
            raise from_os_error(exc, f"reading {path}") from exc

    async def holds(self, key: str, end: int) -> bool | None:
        path = self.describe(key)

        def holds() -> bool | None:
            try:
                found = os.stat(path)
            except FileNotFoundError:
                return None
            except NotADirectoryError:
                raise not_a_regular_file(path, _BELOW_A_FILE_PROBLEM, errno.ENOTDIR) from None
            if not stat.S_ISREG(found.st_mode):
                raise _not_regular(path, found.st_mode)
            return found.st_size >= end

        try:
            return await asyncio.to_thread(holds)
        except OSError as exc:
            raise from_os_error(exc, f"reading {path}") from exc

    async def prepare(self) -> None:
        try:
            await asyncio.to_thread(_makedirs_durable, self._folder)
        except OSError as exc:
            raise from_os_error(exc, f"creating the folder {self._folder}") from exc

    async def create_data_dir(self, name: str) -> None:
        def create() -> None:
            os.mkdir(self.describe(name))
            _fsync_dir(self._folder)

        try:
            await asyncio.to_thread(create)
        except OSError as exc:
            raise from_os_error(exc, f"creating the data directory {self.describe(name)}") from exc

    async def commit(self, name: str, tmp_name: str, value: bytes) -> None:
        try:
            await asyncio.to_thread(self._commit, name, tmp_name, value)
        except OSError as exc:
            raise from_os_error(
                exc, f"committing {self.describe(name)} (through {self.describe(tmp_name)})"
            ) from exc

    def _commit(self, name: str, tmp_name: str, value: bytes) -> None:
        tmp_path = self.describe(tmp_name)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(value)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp_path, self.describe(name))
        except BaseException:
            _remove(tmp_path)
            raise
        _fsync_dir(self._folder)

    async def list_names(self) -> set[str]:
        def names() -> set[str]:
            try:
                return set(os.listdir(self._folder))
            except FileNotFoundError:
                return set()

        return await asyncio.to_thread(names)

    async def delete(self, name: str) -> None:
        def delete() -> None:
            try:
                os.unlink(self.describe(name))
            except FileNotFoundError:
                return
            _fsync_dir(self._folder)

        await asyncio.to_thread(delete)

    async def delete_tree(self, name: str) -> None:
        await asyncio.to_thread(_remove, self.describe(name))

    async def rename(self, name: str, new_name: str) -> bool:
        def rename() -> bool:
            try:
                os.rename(self.describe(name), self.describe(new_name))
            except FileNotFoundError:
                return False
            _fsync_dir(self._folder)
            return True

        return await asyncio.to_thread(rename)

    async def lock_new(self, name: str) -> Lock | None:
        return await asyncio.to_thread(_lock_file, self.describe(name), True)

    async def try_lock(self, name: str) -> Lock | None:
        return await asyncio.to_thread(_lock_file, self.describe(name), False)

    async def check_data_dir(self, name: str) -> None:
        def check() -> None:
            path = self.describe(name)
            if not os.path.islink(path):
                return
            root = os.path.realpath(self._folder)
            target = os.path.realpath(path)
            if os.path.commonpath([root, target]) != root or target == root:
                raise CorruptCheckpointError(
                    f"data directory {path} is a symbolic link to {target}, outside the checkpoint's "
                    f"folder {root}; refusing to read it"
                )

        await asyncio.to_thread(check)


class FileStorage(Storage):
    """Checkpoints on a local or network filesystem (the default).

    Parameters
    ----------
    sync:
        Whether each data file and its directory are fsynced once written. Turning it off trades
        the crash guarantee of ``docs/format.md`` for speed (e.g. on tmpfs); the manifest commit
        is always fsynced.
    direct_io:
        Write data files of 4 MiB or more with ``O_DIRECT`` (Linux), through small page-aligned
        bounce buffers: the bytes go from the process to the device without a copy into the page
        cache. Measured on a 2-core virtual machine, buffered writes of 256 MiB cost 0.1-0.7 s of
        CPU (page-cache allocation) and slowed a training loop running beside them several-fold;
        direct writes cost about 0.04 s and finished sooner. Filesystems that refuse direct I/O
        fall back to the page cache by themselves; turn it off to keep checkpoints just written
        in the page cache (reading them back at once is then faster).
    """

    durable = True
    hierarchical = True
    keeps_empty_folders = True
    locks_across_processes = True  # flock

    def __init__(self, *, sync: bool = True, direct_io: bool = True) -> None:
        self._sync = bool(sync)
        self._direct = bool(direct_io) and bool(_O_DIRECT)

    def split(self, path: str) -> tuple[str, str]:
        path = os.fspath(path)
        if not isinstance(path, str) or not path:
            raise ValueError(f"checkpoint path must be a non-empty string, got {path!r}")
        folder, stem = os.path.split(os.path.abspath(path))
        if not stem or path.endswith(os.sep) or "\0" in path:
            raise ValueError(f"checkpoint path {path!r} must name a file prefix, not a directory")
        return folder, stem

    def canonical(self, path: str) -> str:
        return os.path.abspath(os.fspath(path))

    async def open(self, folder: str) -> Backend:
        return _FileBackend(folder, sync=self._sync, direct=self._direct)


def default_storage() -> FileStorage:
    """The process's :class:`FileStorage`, used when settings name none."""
    return process_state().owned(FileStorage)
