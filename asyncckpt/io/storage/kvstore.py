"""Checkpoints in any TensorStore kvstore: :class:`KvStoreStorage` (``memory`` in tests, object stores).

This is the only module that imports :mod:`tensorstore`, and ``asyncckpt.io.storage`` imports it
only when :class:`KvStoreStorage` is first asked for, so code that only uses files never pays for
loading TensorStore. A single ``write`` of ``P.index`` is the commit here, and write locks are
in-process only (a lock table per storage). TensorStore reports failures as ``ValueError``
statuses; they are translated to :class:`StorageError` (with the errno when the status carries one)
and :class:`TruncatedError` at this seam.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import threading
import time
from typing import Any

import tensorstore as ts

from asyncckpt.io.storage.base import (
    Backend,
    CommitConflictError,
    Lock,
    Storage,
    StorageError,
    StreamedValue,
    TruncatedError,
    storage_error,
)

__all__ = ["KvStoreStorage"]


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _translate(exc: ValueError, what: str) -> StorageError:
    """A TensorStore error status (raised as ``ValueError``) as a :class:`StorageError` naming ``what``."""
    message = str(exc)
    if message.startswith("OUT_OF_RANGE"):
        return TruncatedError(f"{what}: {message}")
    code = _OS_ERROR_CODE.search(message)
    if code:
        number = int(code.group(1))
        return storage_error(what, f"{message} ({os.strerror(number)})", number)
    return storage_error(what, message)


class _LockTable:
    """The write locks held in this process on one storage's keys (thread-safe)."""

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._guard = threading.Lock()

    def scoped(self, location: str) -> _ScopedLocks:
        return _ScopedLocks(self, location)

    def add(self, key: str) -> bool:
        with self._guard:
            if key in self._held:
                return False
            self._held.add(key)
            return True

    def discard(self, key: str) -> None:
        with self._guard:
            self._held.discard(key)


class _ScopedLocks:
    def __init__(self, table: _LockTable, location: str) -> None:
        self._table, self._location = table, location

    def add(self, name: str) -> bool:
        return self._table.add(self._location + name)

    def discard(self, name: str) -> None:
        self._table.discard(self._location + name)


class _ProcessLock(Lock):
    def __init__(self, backend: _KvStoreBackend, name: str) -> None:
        self._backend: _KvStoreBackend | None = backend
        self._name = name

    async def release(self) -> None:
        backend, self._backend = self._backend, None
        if backend is None:
            return
        try:
            await backend.delete_marker(self._name)
        finally:
            backend.locks.discard(self._name)

    async def renew(self) -> bool:
        return self._backend is not None and await self._backend.renew_lease(self._name)


#: TensorStore's generation of "no value": a write conditioned on it succeeds only where the key is absent.
NO_VALUE = b"\x02"


class _KvStoreBackend(Backend):
    """One folder of a kvstore: the keys below ``<path>/<folder>/``.

    With ``conditional`` a commit of a name :meth:`observe` looked at is a conditional write
    (refused when another writer changed it since). With ``lease_seconds`` lock markers are
    leases that exclude other processes too: a marker records until when its writer holds it, and
    is taken over (by a conditional write) only once that time has passed.
    """

    def __init__(self, kvstore: ts.KvStore, location: str, locks: _LockTable, cleans_debris: bool, *,
                 conditional: bool = False, lease_seconds: float | None = None) -> None:
        self._kv = kvstore
        self._location = location
        self.locks = locks.scoped(location)
        self.cleans_debris = cleans_debris
        self._conditional = conditional
        self._lease_seconds = lease_seconds
        self._observed: dict[str, bytes] = {}  # name -> the generation observe() saw

    def describe(self, name: str) -> str:
        return f"{self._location}{name}"

    async def write(self, key: str, value: bytes | bytearray | memoryview | StreamedValue) -> None:
        # TensorStore copies a bytearray once and a bytes object twice on the way in (measured),
        # so a streamed value is gathered into a bytearray (off the loop: it copies every byte).
        if isinstance(value, StreamedValue):
            value = await asyncio.to_thread(value.to_bytearray)
        elif isinstance(value, memoryview):
            value = bytearray(value)
        try:
            await self._kv.write(key, value)
        except ValueError as exc:
            raise _translate(exc, f"writing {self.describe(key)}") from exc

    async def read(self, key: str, start: int = 0, stop: int | None = None) -> bytes | None:
        try:
            result = await self._kv.read(key, byte_range=slice(start, stop))
        except ValueError as exc:
            raise _translate(exc, f"reading {self.describe(key)}") from exc
        return result.value if result.state == "value" else None

    async def prepare(self) -> None:
        pass

    async def create_data_dir(self, name: str) -> None:
        pass

    async def observe(self, name: str) -> None:
        if not self._conditional:
            return
        try:
            result = await self._kv.read(name, byte_range=slice(0, 0))
        except ValueError as exc:
            raise _translate(exc, f"reading {self.describe(name)}") from exc
        self._observed[name] = result.stamp.generation

    async def commit(self, name: str, tmp_name: str, value: bytes) -> None:
        expected = self._observed.get(name)
        if expected is None:
            await self.write(name, value)  # a single kvstore write is atomic
            return
        if not await self._write_if(name, value, expected):
            raise CommitConflictError(
                f"committing {self.describe(name)}: another writer committed it since this write began "
                "(a conditional write was refused); this write's data is not committed"
            )

    async def _write_if(self, key: str, value: bytes | bytearray, generation: bytes) -> bool:
        """Write ``value`` if ``key`` still has ``generation``; whether it did (a refusal is no error)."""
        try:
            stamp = await self._kv.write(key, bytearray(value), if_equal=generation)
        except ValueError as exc:
            raise _translate(exc, f"writing {self.describe(key)}") from exc
        if stamp.generation:
            self._observed[key] = stamp.generation
        return bool(stamp.generation)  # TensorStore answers a refused write with an empty generation

    async def create_new(self, key: str, value: bytes) -> bool:
        """Write ``value`` only if ``key`` does not exist; whether it did."""
        return await self._write_if(key, value, NO_VALUE)

    async def list_names(self) -> set[str]:
        try:
            keys = await self._kv.list()
        except ValueError as exc:
            raise _translate(exc, f"listing {self.describe('')}") from exc
        return {key.decode("utf-8", "surrogateescape").split("/", 1)[0] for key in keys}

    async def delete(self, name: str) -> None:
        try:
            await self._kv.write(name, None)
        except ValueError as exc:
            raise _translate(exc, f"deleting {self.describe(name)}") from exc

    async def delete_tree(self, name: str) -> None:
        # "0" is the character after "/", so this range is every key below "name/".
        try:
            await self._kv.delete_range(ts.KvStore.KeyRange(f"{name}/", f"{name}0"))
        except ValueError as exc:
            raise _translate(exc, f"deleting {self.describe(name)}") from exc

    async def _holding(self, name: str, take) -> Lock | None:
        """The lock ``name`` if no one in this process holds it and ``await take()`` says it is ours."""
        if not self.locks.add(name):
            return None
        try:
            taken = await take()
        except BaseException:
            self.locks.discard(name)
            raise
        if not taken:
            self.locks.discard(name)
            return None
        return _ProcessLock(self, name)

    async def _create_marker(self, name: str) -> bool:
        await self.write(name, b"")
        return True

    async def _marker_exists(self, name: str) -> bool:
        return await self.read(name, 0, 0) is not None

    async def _lease_taken_over(self, name: str) -> bool:
        """Whether this process now holds the lease ``name``: it existed, had run out, and was renewed
        by a conditional write before anyone else's."""
        try:
            result = await self._kv.read(name)
        except ValueError as exc:
            raise _translate(exc, f"reading {self.describe(name)}") from exc
        if result.state != "value" or not _expired(result.value):
            return False
        return await self._write_if(name, self._lease(), result.stamp.generation)

    async def rename(self, name: str, new_name: str) -> bool:
        # Copy-then-delete under an in-process mutex on ``name``: atomic against every other
        # rename of ``name`` in this process (as safe as this storage's locks).
        mutex = "\0rename:" + name
        while not self.locks.add(mutex):
            await asyncio.sleep(0.001)
        try:
            data = await self.read(name)
            if data is None:
                return False
            await self.write(new_name, data)
            await self.delete(name)
            return True
        finally:
            self.locks.discard(mutex)

    async def lock_new(self, name: str, *, lease_seconds: float | None = None) -> Lock | None:
        """``lease_seconds`` overrides the backend's lease for this one lock (a short-held one)."""
        if self._lease_seconds is None:
            return await self._holding(name, lambda: self._create_marker(name))
        lease = self._lease(lease_seconds)
        return await self._holding(name, lambda: self.create_new(name, lease))

    async def try_lock(self, name: str) -> Lock | None:
        if self._lease_seconds is None:
            return await self._holding(name, lambda: self._marker_exists(name))
        return await self._holding(name, lambda: self._lease_taken_over(name))

    def _lease(self, seconds: float | None = None) -> bytes:
        """A lease marker's bytes: until when it is held (``seconds`` from now, the backend's lease by default)."""
        return json.dumps({"lease_until": time.time() + (self._lease_seconds if seconds is None else seconds)}).encode()

    async def renew_lease(self, name: str) -> bool:
        """Extend the lease ``name`` if it is still the one this backend wrote (no lease: always held)."""
        if self._lease_seconds is None:
            return True
        generation = self._observed.get(name)
        return generation is not None and await self._write_if(name, self._lease(), generation)

    async def delete_marker(self, name: str) -> None:
        """Delete lock marker ``name`` -- a lease only while it is still the one this backend wrote."""
        generation = self._observed.pop(name, None) if self._lease_seconds is not None else None
        if generation is None:
            if self._lease_seconds is None:
                await self.delete(name)
            return
        try:
            await self._kv.write(name, None, if_equal=generation)  # refused if another process took it over
        except ValueError as exc:
            raise _translate(exc, f"deleting {self.describe(name)}") from exc


def _expired(marker: bytes) -> bool:
    """Whether a lease marker's time has passed (a marker without one -- an in-process lock's -- has)."""
    try:
        until = json.loads(marker)["lease_until"]
        return not isinstance(until, (int, float)) or until < time.time()
    except (ValueError, TypeError, KeyError):
        return True


class KvStoreStorage(Storage):
    """Checkpoints in any TensorStore kvstore, e.g. ``{"driver": "memory"}``.

    Checkpoint paths are ``/``-separated keys below the spec's ``path``.

    Parameters
    ----------
    spec:
        A kvstore spec (JSON dict). Opened once per checkpoint operation with ``path`` extended by
        the checkpoint's folder.
    context:
        The ``tensorstore.Context`` shared by every open; for the ``memory`` driver it *is* the
        store, so all backends of one ``KvStoreStorage`` see the same data.
    clean_debris:
        Whether writes delete data left by crashed writes. Write locks of this storage are
        in-process only, so this is safe only when no other process writes into the same
        folders; it defaults to ``True`` for the ``memory`` driver and ``False`` otherwise.

    The capability flags follow the driver: durable unless it is ``memory``, hierarchical for ``file``.
    """

    def __init__(self, spec: dict, *, context: ts.Context | None = None, clean_debris: bool | None = None) -> None:
        if not isinstance(spec, dict) or "driver" not in spec:
            raise ValueError(f"a kvstore spec must be a dict with a 'driver', got {spec!r}")
        self._spec = dict(spec)
        self._context = context if context is not None else ts.Context()
        self._clean_debris = spec["driver"] == "memory" if clean_debris is None else clean_debris
        self._locks = _LockTable()
        self.durable = spec["driver"] != "memory"  # the memory driver's data lives in the context
        self.hierarchical = spec["driver"] == "file"

    def split(self, path: str) -> tuple[str, str]:
        path = os.fspath(path)
        if not isinstance(path, str) or not path or path.endswith("/") or "\0" in path:
            raise ValueError(f"checkpoint path {path!r} must name a key prefix, not a folder")
        folder, stem = posixpath.split(posixpath.normpath(path).lstrip("/"))
        if stem in ("", ".", ".."):
            raise ValueError(f"checkpoint path {path!r} must name a key prefix, not a folder")
        return folder, stem

    def canonical(self, path: str) -> str:
        return posixpath.normpath(os.fspath(path)).lstrip("/")

    async def open(self, folder: str) -> Backend:
        base = self._spec.get("path", "")
        path = posixpath.join(base, folder) if folder else base
        if path and not path.endswith("/"):
            path += "/"
        spec: dict[str, Any] = {**self._spec, "path": path}
        try:
            kvstore = await ts.KvStore.open(spec, context=self._context)
        except ValueError as exc:
            raise _translate(exc, f"opening kvstore {spec}") from exc
        return _KvStoreBackend(kvstore, self._describe(path), self._locks, self._clean_debris, **self._backend_options())

    def _backend_options(self) -> dict[str, Any]:
        """Options of every backend this storage opens (object storage: conditional commits, leases)."""
        return {}

    def _describe(self, path: str) -> str:
        return f"{self._spec['driver']}://{path}"
