"""The ``checkpoint`` state file of a directory in object storage (an ``s3://`` prefix): its primitives.

An object store has no rename and no ``flock``, but a single write of an object is atomic and a
conditional write creates an object only where none is. So in a bucket the state file is one
object replaced by each update, and the lock that serialises a manager's read-modify-write is a
*lease* object (``.<latest_filename>.lock``, created by a conditional write, recording until when
it is held; one left by a crashed holder is taken over once that time has passed). Everything
else -- the text format, what is stored, the pending-deletions file -- is `asyncckpt.state_file`'s.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from asyncckpt import io as ckio
from asyncckpt._runtime import get_runtime
from asyncckpt.io.storage import StorageError

__all__ = ["read_bytes", "write_bytes", "delete", "lease_lock"]

#: How long a manager waits for another's lock on the state object before giving up.
LOCK_WAIT_SECONDS = 120.0
#: How long the lock's lease lasts: it is held for a few small reads and writes, so a holder that
#: died leaves the state object locked for no longer than this.
LOCK_LEASE_SECONDS = 60.0


def _backend_and_name(url: str):
    storage = ckio.storage_for_path(url)
    folder, name = storage.split(url)
    return storage, folder, name


def read_bytes(url: str, limit: int) -> bytes | None:
    """The object's bytes (at most ``limit + 1``), or ``None`` when it does not exist."""
    storage, folder, name = _backend_and_name(url)

    async def read() -> bytes | None:
        backend = await storage.open(folder)
        if not await backend.holds(name, 0):
            return None
        found = await backend.holds(name, limit + 1)
        return await backend.read(name, 0, limit + 1 if found else None)

    return get_runtime().run(read())


def write_bytes(url: str, data: bytes) -> None:
    """Replace the object with ``data`` (one atomic write)."""
    storage, folder, name = _backend_and_name(url)

    async def write() -> None:
        backend = await storage.open(folder)
        await backend.write(name, data)

    get_runtime().run(write())


def delete(url: str) -> None:
    storage, folder, name = _backend_and_name(url)

    async def remove() -> None:
        backend = await storage.open(folder)
        await backend.delete(name)

    get_runtime().run(remove())


@contextlib.contextmanager
def lease_lock(url: str) -> Iterator[None]:
    """Hold the lease object ``url`` (waiting for another holder up to `LOCK_WAIT_SECONDS`)."""
    storage, folder, name = _backend_and_name(url)
    runtime = get_runtime()
    backend = runtime.run(storage.open(folder))
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    delay = 0.01
    while True:
        lock = runtime.run(backend.lock_new(name, lease_seconds=LOCK_LEASE_SECONDS)) or runtime.run(backend.try_lock(name))
        if lock is not None:
            break
        if time.monotonic() > deadline:
            raise StorageError(f"the state-file lock {url} has been held by another process for "
                               f"{LOCK_WAIT_SECONDS:g} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    try:
        yield
    finally:
        runtime.run(lock.release())
