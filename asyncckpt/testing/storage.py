"""Storages for tests that wrap a real one to hold back or fail its writes.

They are injected where a storage is chosen, ``WriteSettings(storage=...)`` or
``ReadSettings(storage=...)``, so a test steers exactly the writes it means to and nothing is
monkeypatched. Every one forwards to a real storage (usually :class:`~asyncckpt.io.storage.FileStorage`)
for everything it does not change.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable, Iterator, Sequence

from asyncckpt._runtime import Runtime
from asyncckpt.io.storage import Backend, BackendWrapper, Storage, StreamedValue
from asyncckpt.io.storage.base import CAPABILITIES

__all__ = ["BatchedValue", "FailingStorage", "GatedStorage", "WrappingStorage"]


class WrappingStorage(Storage):
    """A storage whose backends are ``wrapper(backend)`` for the backends ``inner`` opens.

    Parameters
    ----------
    inner:
        The storage that does the work; paths are split and canonicalised by it.
    wrapper:
        Called with each backend ``inner`` opens; returns the backend to use instead, typically a
        :class:`~asyncckpt.io.storage.BackendWrapper` subclass overriding a few operations.

    The capability flags are those of ``inner``.
    """

    def __init__(self, inner: Storage, wrapper: Callable[[Backend], Backend]) -> None:
        self.inner = inner
        self.wrapper = wrapper
        for capability in CAPABILITIES:
            setattr(self, capability, getattr(inner, capability))

    def split(self, path):
        return self.inner.split(path)

    def canonical(self, path):
        return self.inner.canonical(path)

    async def open(self, folder) -> Backend:
        return self.wrapper(await self.inner.open(folder))


class GatedStorage(WrappingStorage):
    """Every data-file write waits until :meth:`open_gate` is called.

    Lets a test hold a save in flight for as long as it needs (to assign variables, start another
    save, fork) and tell for certain that the writer got that far.

    Parameters
    ----------
    inner:
        The storage that does the work once the gate is open.
    runtime:
        The runtime whose loop runs the writes; the gate is an ``asyncio.Event`` on that loop.

    Attributes
    ----------
    writes_waiting:
        How many writes reached the gate (counted on the loop thread).
    reached:
        A ``threading.Event`` set when the first write reaches the gate.
    """

    def __init__(self, inner: Storage, runtime: Runtime) -> None:
        super().__init__(inner, self._wrap)
        self.runtime = runtime
        self.gate = asyncio.Event()  # bound to the runtime loop on first wait
        self.writes_waiting = 0
        self.reached = threading.Event()

    def _wrap(self, backend: Backend) -> Backend:
        storage = self

        class Gated(BackendWrapper):
            async def write(self, key, value):
                storage.writes_waiting += 1
                storage.reached.set()
                await storage.gate.wait()
                await super().write(key, value)

        return Gated(backend)

    def open_gate(self) -> None:
        """Let every waiting and future write through (callable from any thread)."""
        self.runtime.call_soon(self.gate.set)


class FailingStorage(WrappingStorage):
    """One data-file write fails with ``ENOSPC``, as on a full disk.

    Parameters
    ----------
    inner:
        The storage that does every other write.
    fail_on:
        Which write fails, 1-based, counted over the storage's life (across every backend it opens).

    Attributes
    ----------
    writes:
        How many writes were attempted so far.
    """

    def __init__(self, inner: Storage, fail_on: int) -> None:
        super().__init__(inner, self._wrap)
        self.fail_on = fail_on
        self.writes = 0

    def _wrap(self, backend: Backend) -> Backend:
        storage = self

        class Failing(BackendWrapper):
            async def write(self, key, value):
                storage.writes += 1
                if storage.writes == storage.fail_on:
                    raise OSError(errno.ENOSPC, "No space left on device (injected)", key)
                await super().write(key, value)

        return Failing(backend)


class BatchedValue(StreamedValue):
    """A :class:`~asyncckpt.io.storage.StreamedValue` served in given batches, as a data file is.

    Parameters
    ----------
    *batches:
        Each a sequence of byte strings: one batch of :meth:`segments`. Empty pieces are allowed.
    size:
        The size the value claims; defaults to the bytes the batches hold. A different number makes
        a value whose producer disagrees with its size, which a backend must refuse.

    Attributes
    ----------
    served:
        How many batches were handed out so far.
    """

    def __init__(self, *batches: Sequence[bytes], size: int | None = None) -> None:
        self._batches = batches
        self.size = sum(len(piece) for batch in batches for piece in batch) if size is None else size
        self.served = 0

    def segments(self) -> Iterator[Sequence[memoryview]]:
        for batch in self._batches:
            self.served += 1
            yield [memoryview(piece) for piece in batch]
