"""Writes in flight: their handles, and the process's registry of them (ordering and waits by path)."""

from __future__ import annotations

import os
import asyncio
import concurrent.futures
import contextlib
import logging
import threading


from asyncckpt._runtime import process_state
from asyncckpt.io.storage import Storage, storage_for_path

from asyncckpt.io.settings import WriteMetrics

logger = logging.getLogger("asyncckpt")


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


class PendingWrites:
    """The process's writes in flight, by canonical path, in start order.

    Owned by the process state (:func:`pending_writes`): writes to one path are ordered, readers
    wait for the writes under a folder, and at exit every write still in flight is finished.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._pending: dict[str, list[WriteHandle]] = {}
        self._calling_back = threading.local()
        #: The worker (``MultiWorker.index``) of the last multi-worker write each thread started.
        self.thread_worker = threading.local()

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
        worker = getattr(self.thread_worker, "index", None)
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

    def at_exit(self, final: bool) -> None:
        """Let writes still in flight at exit finish instead of dying with the loop thread.

        Called before non-daemon threads are joined and again after (for saves those threads
        started meanwhile). Errors stay with the handles' owners.
        """
        for handle in self.all():
            with contextlib.suppress(BaseException):
                handle._future.result()


def pending_writes() -> PendingWrites:
    """This process's :class:`PendingWrites`."""
    return process_state().owned(PendingWrites)



async def quietly_wait(handle: WriteHandle) -> None:
    with contextlib.suppress(BaseException):
        await handle.wait()


def wait_for_pending_writes(path, *, storage: Storage | None = None) -> None:
    """Block until every in-process write to ``path``, or to a checkpoint under folder ``path``, ends.

    Does not raise the writes' errors: those belong to whoever holds their handles.
    """
    key = (storage or storage_for_path(os.fspath(path))).canonical(path)
    for handle in pending_writes().under(key):
        with contextlib.suppress(BaseException):
            handle._future.result()


def has_pending_writes(path, *, storage: Storage | None = None) -> bool:
    """Whether an in-process write to ``path`` (or below folder ``path``) has not finished yet."""
    key = (storage or storage_for_path(os.fspath(path))).canonical(path)
    return any(not handle.done() for handle in pending_writes().under(key))


async def await_pending_writes(path, *, storage: Storage | None = None) -> None:
    """The ``async`` twin of :func:`wait_for_pending_writes`, usable from any event loop."""
    key = (storage or storage_for_path(os.fspath(path))).canonical(path)
    for handle in pending_writes().under(key):
        await quietly_wait(handle)

