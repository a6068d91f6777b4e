"""The one owner of process state: the background event loop and everything kept per process.

:class:`ProcessState` holds what asyncckpt keeps for the life of a process: the default
:class:`Runtime` (one daemon thread running one asyncio loop, with its worker pool) and one
instance each of the components that must be shared by every save and restore -- the registry of
pending writes, the staging pool, the direct-I/O bounce buffers, the default storage, the device
stagers, the asynchronous writes nobody has synced yet. Components ask for theirs with
``process_state().owned(Factory)``; nothing else in the package keeps module-global state.

Increasing number series (the object graphs' structure version, restore uids, variable ids) are
kept here too, with :meth:`ProcessState.next_number`. There is one fork reset (a forked child
starts with an empty state: it has the parent's objects but not the threads serving them; only
the number series carry over, so no number repeats) and one exit sequence: components with an ``at_exit(final)``
method are called in the order they were created, once before the interpreter joins non-daemon
threads (``final=False``) and once after (``final=True``), so a write such a thread started while
the program ended is still finished.

The synchronous API blocks on ``runtime.run(coro)``; background work is started with
``runtime.submit(coro)``. Calling ``run`` from the loop thread itself would deadlock, so it raises
``RuntimeError`` instead and points to the ``async`` API. Every entry point accepts another
runtime through its settings, which is how tests isolate themselves.

Blocking calls (file I/O, checksums) run through ``asyncio.to_thread`` on the loop's default
executor, which the runtime replaces with its own pool (:class:`_WorkerPool`) whose worker threads
all start together with the loop. Python 3.12 refuses to start threads once the interpreter begins
to exit, and ``concurrent.futures`` stops its own pools before non-daemon threads are joined, so
either kind of pool could not finish a write still pending, or started, at exit; this one can.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import gc
import importlib
import itertools
import os
import queue
import sys
import threading
from collections.abc import Coroutine
from typing import Any, Callable, TypeVar

__all__ = ["BACKGROUND_NICE", "GcPause", "ProcessState", "Runtime", "WORKER_THREADS", "gc_paused", "get_runtime", "process_state",
           "running_loop"]

T = TypeVar("T")

#: Worker threads of each runtime's pool for blocking calls (enough for the default write and
#: read concurrency to run at once; more work queues).
WORKER_THREADS = max(8, min(32, (os.cpu_count() or 1) + 4))

#: How much lower than the program's own threads a runtime's threads run (a Linux ``nice``
#: increment, per thread). Copies out of the page cache and checksums are CPU work; at the same
#: priority, a save or restore running on every core kept the program's own event loop waiting
#: 10-25 ms for a core on a 2-core machine. Lower, they take the CPU the program leaves.
BACKGROUND_NICE = 10


def _lower_priority(increment: int) -> None:
    """Run the calling thread ``increment`` nice levels below where it is (Linux; elsewhere nothing).

    On Linux the nice value is per thread, so this touches no other thread; elsewhere
    ``setpriority`` would lower the whole process, so it is left alone. Nothing is raised: a
    priority that cannot change costs responsiveness, never a checkpoint.
    """
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + increment))
    except OSError:
        pass


class _WorkerPool(concurrent.futures.ThreadPoolExecutor):
    """``max_workers`` daemon threads, all started by the constructor, serving one queue.

    A ``ThreadPoolExecutor`` in type only (asyncio accepts nothing else as a default executor):
    it runs its own threads, which ``concurrent.futures`` does not know about. That module stops
    every pool it knows from an exit hook that runs *before* the interpreter joins non-daemon
    threads, so a save such a thread starts while the program ends could not run one blocking
    call on such a pool. Starting every worker up front also means submitting work never starts
    a thread (Python 3.12 refuses to once exit begins).
    """

    def __init__(self, max_workers: int, thread_name_prefix: str, nice: int = 0) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)  # starts nothing
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._shutdown = False
        self._nice = nice
        self._threads = [
            threading.Thread(target=self._work, name=f"{thread_name_prefix}_{index}", daemon=True)
            for index in range(max_workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:  # noqa: D102 - Executor.submit
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after the pool was shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        _lower_priority(self._nice)
        while True:
            task = self._queue.get()
            if task is None:
                return
            future, fn, args, kwargs = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # delivered to whoever awaits the future
                future.set_exception(exc)
            else:
                future.set_result(result)
            del task, future, fn, args, kwargs  # drop references before blocking again

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    task = self._queue.get_nowait()
                except queue.Empty:
                    break
                if task is not None:
                    task[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()


class Runtime:
    """An asyncio loop on a daemon thread, started on first use.

    Parameters
    ----------
    name:
        Name of the loop thread (shows in stack dumps and debuggers).
    nice:
        How many nice levels below the creating thread the loop and worker threads run
        (Linux; :data:`BACKGROUND_NICE` by default, ``0`` for the same priority).
    """

    def __init__(self, name: str = "asyncckpt-runtime", *, nice: int = BACKGROUND_NICE) -> None:
        if type(nice) is not int or not 0 <= nice <= 39:
            raise ValueError(f"Runtime nice must be an int in [0, 39], got {nice!r}")
        self._name = name
        self._nice = nice
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, starting the thread if needed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this asyncckpt Runtime has been closed")
            if self._loop is None:
                ready = threading.Event()
                loop = asyncio.new_event_loop()
                loop.set_default_executor(_WorkerPool(WORKER_THREADS, f"{self._name}-worker", self._nice))
                thread = threading.Thread(target=self._serve, args=(loop, ready, self._nice), name=self._name,
                                          daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event, nice: int) -> None:
        _lower_priority(nice)
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def in_loop_thread(self) -> bool:
        """True when called from this runtime's loop thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop and return a thread-safe future of its result."""
        try:
            loop = self.loop
        except RuntimeError:
            coro.close()
            raise
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block until it finishes; re-raise its exception.

        Raises
        ------
        RuntimeError
            When called from the loop thread (for example from code already running on it); use
            the ``async`` API (``asave``, ``arestore``, ``aread_many``) there instead.
        """
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(
                "a blocking asyncckpt call was made from the asyncckpt event-loop thread, which would "
                "deadlock; use the async API instead (await asave()/arestore()/aread_many())"
            )
        return self.submit(coro).result(timeout)

    def call_soon(self, callback, *args) -> None:
        """Run ``callback(*args)`` on the loop thread, from any thread."""
        self.loop.call_soon_threadsafe(callback, *args)

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel what still runs on the loop, stop it and join the thread. Idempotent."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._closed = True
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError("a Runtime cannot be closed from its own loop thread")

        async def _cancel_all() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in the calling thread, or ``None``."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class ProcessState:
    """What asyncckpt keeps for the life of one process; see the module docstring."""

    def __init__(self, series: dict[str, list] | None = None) -> None:
        self._lock = threading.RLock()
        self._runtime: Runtime | None = None
        self._owned: dict[Callable[[], Any], Any] = {}
        # Increasing series of numbers (identities, versions): carried into a forked child, so a
        # number is never handed out twice in a process tree's objects.
        self._series: dict[str, list] = series if series is not None else {}

    def next_number(self, series: str) -> int:
        """The next number of the increasing ``series`` (1, 2, ...), unique across forks too."""
        with self._lock:
            entry = self._series.setdefault(series, [itertools.count(1), 0])
            entry[1] = number = next(entry[0])
            return number

    def last_number(self, series: str) -> int:
        """The number :meth:`next_number` last gave for ``series`` (0 before the first)."""
        entry = self._series.get(series)
        return 0 if entry is None else entry[1]

    @property
    def runtime(self) -> Runtime:
        """The process's default :class:`Runtime` (created on first use, started on first call)."""
        with self._lock:
            if self._runtime is None:
                self._runtime = Runtime()
            return self._runtime

    def owned(self, factory: Callable[[], T]) -> T:
        """The process's one instance made by ``factory`` (a class, usually), created on first use."""
        found = self._owned.get(factory)
        if found is not None:
            return found
        with self._lock:
            found = self._owned.get(factory)
            if found is None:
                found = self._owned[factory] = factory()
            return found

    def at_exit(self, final: bool) -> None:
        """Call ``at_exit(final)`` on every component that has one, in creation order.

        A component's failure is its own to report (it logs or re-raises); the others still run.
        """
        with self._lock:
            components = list(self._owned.values())
        error = None
        for component in components:
            hook = getattr(component, "at_exit", None)
            if hook is None:
                continue
            try:
                hook(final)
            except BaseException as exc:  # noqa: BLE001 - every component gets its turn; first error re-raised
                error = error or exc
        if error is not None:
            raise error


class GcPause:
    """Holds the cyclic garbage collector off while bulk bookkeeping allocates (owned by the process state).

    Parsing a manifest of 10,000 values or walking a graph of 10,000 objects allocates hundreds of
    thousands of dicts and tuples; each time that crosses the collector's threshold it scans every
    object of the program -- a training program's whole heap -- which doubled the time of those
    steps. Nested and concurrent pauses count: the collector runs again when the last one ends,
    and a program that turned it off itself keeps it off.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False

    @contextlib.contextmanager
    def paused(self):
        with self._lock:
            if self._depth == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._resume:
                    gc.enable()


def gc_paused():
    """A context in which the cyclic collector does not run (see :class:`GcPause`)."""
    return _state.owned(GcPause).paused()


_state = ProcessState()


def process_state() -> ProcessState:
    """This process's :class:`ProcessState`."""
    return _state


def get_runtime() -> Runtime:
    """The process-wide default runtime (created on first use)."""
    return _state.runtime


def _reset_after_fork() -> None:
    # The child has the parent's objects but not the threads serving them: start afresh on next use,
    # keeping only the number series (a cached version or a restore uid must never repeat).
    global _state
    _state = ProcessState(series=_state._series)


def _before_threads_join() -> None:
    with contextlib.suppress(BaseException):  # errors are reported by the final call
        _state.at_exit(final=False)


#: The exit status of a process whose components failed at exit (a write that failed and was
#: never synced): a job scheduler must not believe the run succeeded.
FAILED_AT_EXIT_STATUS = 1


def _at_exit() -> None:
    try:
        _state.at_exit(final=True)
    except BaseException as error:  # noqa: BLE001 - the process must not end with status 0
        _exit_failed(error)


def _exit_failed(error: BaseException) -> None:
    """End the process with :data:`FAILED_AT_EXIT_STATUS`, saying why on stderr.

    An exception raised by an exit hook is printed but leaves the exit status alone, so the only
    way to fail the process from here is ``os._exit``: flush what Python would flush, then go.
    Exit hooks registered before asyncckpt was imported do not run after this.
    """
    import logging  # noqa: PLC0415 - only on this path
    import sys  # noqa: PLC0415

    with contextlib.suppress(BaseException):
        sys.stderr.write(f"asyncckpt: exiting with status {FAILED_AT_EXIT_STATUS}: {type(error).__name__}: {error}\n")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(FAILED_AT_EXIT_STATUS)


# The thread pool registers its own exit hook when its module is first imported; import it now so
# that hook is registered first and therefore runs after ours (they run in reverse order).
importlib.import_module("concurrent.futures.thread")
getattr(threading, "_register_atexit", atexit.register)(_before_threads_join)
atexit.register(_at_exit)
os.register_at_fork(after_in_child=_reset_after_fork)
