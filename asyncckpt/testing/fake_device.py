"""A CPU simulation of one GPU, so the device copy engine is tested on machines without one.

:class:`FakeDeviceBackend` implements :class:`asyncckpt._cuda.DeviceBackend` with device memory held
in NumPy arrays that only the backend's streams read or write, and each stream an in-order queue of
operations run by a worker thread. A kernel "still running" when ``save()`` is called is then an
operation blocked on a test gate, so every ordering claim is checked with events and gates, never
with sleeps. Copy hooks hold or fail chosen copies; counters show what was allocated and copied.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from asyncckpt._cuda import HostSyncError

__all__ = ["FakeDeviceBackend", "FakeDeviceArray", "FakeStream", "FakeEvent", "FakeOutOfMemoryError"]


class FakeOutOfMemoryError(MemoryError):
    """A :class:`FakeDeviceBackend` allocation exceeded its simulated device memory."""


class FakeEvent:
    """An event of the fake device: set when its stream reaches it, carrying the stream's error."""

    def __init__(self) -> None:
        self._fired = threading.Event()
        self.error: BaseException | None = None

    def _fire(self, error: BaseException | None) -> None:
        self.error = error
        self._fired.set()


class FakeStream:
    """An in-order queue of operations run by one worker thread, like a CUDA stream.

    An operation that raises leaves the stream in error: later copies and kernels are skipped and
    later events carry the error (CUDA errors are sticky in the same way).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: BaseException | None = None
        self._queue: collections.deque = collections.deque()
        self._state = threading.Condition()
        self._running = False
        self._blocked = False
        self._thread = threading.Thread(target=self._run, name=f"fake-stream-{name}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<FakeStream {self.name}>"

    def enqueue(self, operation: Callable[[], None], *, always: bool = False) -> None:
        """Append ``operation``; ``always`` runs it even after an error (events, waits)."""
        with self._state:
            self._queue.append((operation, always))
            self._state.notify_all()

    def enqueue_wait(self, event: "FakeEvent") -> None:
        """Append a device-side wait: later operations run once ``event`` has fired."""

        def wait() -> None:
            if event._fired.is_set():
                return
            with self._state:
                self._blocked = True
                self._state.notify_all()
            event._fired.wait()
            with self._state:
                self._blocked = False

        self.enqueue(wait, always=True)

    def settle(self) -> None:
        """Block until the stream has nothing it can run: it is idle, or stuck in an event wait.

        Lets a test observe deterministically whether later work was held back by a wait.
        (Operations that block by themselves, like a kernel waiting on a test gate, never settle.)
        """
        with self._state:
            self._state.wait_for(lambda: self._blocked or (not self._queue and not self._running))

    def _stop(self) -> None:
        with self._state:
            self._queue.append(None)
            self._state.notify_all()

    def _run(self) -> None:
        while True:
            with self._state:
                self._running = False
                self._state.notify_all()
                while not self._queue:
                    self._state.wait()
                entry = self._queue.popleft()
                self._running = entry is not None
            if entry is None:
                return
            operation, always = entry
            del entry  # an idle worker keeps nothing alive (a copy refers to its backend)
            try:
                if self.error is None or always:
                    operation()
            except BaseException as exc:  # kept, like a sticky CUDA error
                self.error = exc
            finally:
                del operation


class FakeDeviceArray:
    """An array in the fake device's memory. Only the backend's streams read or write its bytes.

    It deliberately has no ``__array__``: host code that bypasses the backend fails loudly. It
    refers to its backend weakly, like a CUDA pointer to its context: a dropped backend is collected
    even while arrays of it wait in a stager for their last copy.
    """

    __slots__ = ("_data", "_backend", "_owner", "__weakref__")

    def __init__(self, data: np.ndarray, backend: "FakeDeviceBackend", owner: "FakeDeviceArray | None" = None):
        self._data = data
        self._backend = weakref.ref(backend)
        self._owner = owner

    @property
    def backend(self) -> "FakeDeviceBackend | None":
        """The backend whose memory this is (``None`` once it was collected)."""
        return self._backend()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    @property
    def size(self) -> int:
        return int(self._data.size)

    def __getitem__(self, index) -> "FakeDeviceArray":
        """A view (no allocation), as CuPy slicing gives."""
        return FakeDeviceArray(self._data[index], self.backend, self._owner or self)

    @property
    def T(self) -> "FakeDeviceArray":  # noqa: N802 - mirrors ndarray.T
        return FakeDeviceArray(self._data.T, self.backend, self._owner or self)

    def __repr__(self) -> str:
        return f"<FakeDeviceArray shape={self.shape} dtype={self.dtype}>"


def _flat_bytes(array: np.ndarray) -> np.ndarray:
    if not array.flags.c_contiguous:
        raise ValueError("raw copies need a C-contiguous array")
    return array.reshape(-1).view(np.uint8)


class FakeDeviceBackend:
    """A CPU simulation of one GPU for tests: memory, streams, events, kernels, pinned buffers.

    Parameters
    ----------
    memory_bytes:
        Simulated device memory; allocations beyond it raise :class:`FakeOutOfMemoryError` and
        :meth:`mem_info` reports what is left.
    copy_hook:
        Called in the stream's worker as ``copy_hook(kind, nbytes)`` before each copy (``kind``
        is ``"d2h"``, ``"h2d"`` or ``"d2d"``). Tests use it to hold a copy (block on an event) or
        to make one fail (raise).

    Test helpers: :meth:`array` (allocate and fill), :meth:`launch` (a "kernel"), :meth:`peek`
    (read an array after the device is idle), :meth:`synchronize`, :meth:`use_stream`,
    :meth:`forbid_host_sync`, and the counters ``allocated_bytes``, ``pinned_live_bytes``,
    ``pinned_peak_bytes``, ``pinned_allocations``, ``host_syncs`` and ``copies``.
    """

    def __init__(
        self,
        *,
        memory_bytes: int = 1 << 30,
        device_id: int = 0,
        copy_hook: Callable[[str, int], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.memory_bytes = memory_bytes
        self.copy_hook = copy_hook
        self._lock = threading.Lock()
        self.allocated_bytes = 0
        self.pinned_live_bytes = 0
        self.pinned_peak_bytes = 0
        self.pinned_allocations = 0
        self.host_syncs = 0
        self.copies: collections.Counter = collections.Counter()
        self.default_stream = FakeStream("default")
        self._streams = [self.default_stream]
        weakref.finalize(self, _stop_streams, self._streams)  # collected unclosed: stop the workers too
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<FakeDeviceBackend fake:{self.device_id}>"

    # ------------------------------------------------------------------ test helpers
    def array(self, values: Any, dtype: Any = None) -> FakeDeviceArray:
        """A new device array holding a copy of ``values`` (as if uploaded before anything else)."""
        host = np.array(values, dtype=dtype, copy=True, order="C")
        array = self._allocate(host.shape, host.dtype)
        np.copyto(array._data, host)
        return array

    def launch(self, stream: FakeStream, kernel: Callable[..., None], *arrays: FakeDeviceArray) -> None:
        """Enqueue ``kernel(*views)`` on ``stream``; ``views`` are the arrays' device memory."""
        views = [array._data for array in arrays]
        stream.enqueue(lambda: kernel(*views))

    def peek(self, array: FakeDeviceArray) -> np.ndarray:
        """A host copy of ``array`` once every stream is idle."""
        self.synchronize()
        return np.array(array._data, copy=True)

    def synchronize(self) -> None:
        """Wait until every stream has run what is enqueued so far (raises nothing)."""
        events = []
        for stream in list(self._streams):
            event = FakeEvent()
            stream.enqueue(lambda event=event: event._fire(None), always=True)
            events.append(event)
        for event in events:
            event._fired.wait()

    @contextlib.contextmanager
    def use_stream(self, stream: FakeStream):
        """Make ``stream`` the calling thread's current stream for the block."""
        previous = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield stream
        finally:
            self._local.stream = previous

    @contextlib.contextmanager
    def forbid_host_sync(self):
        """Inside the block, a host wait on the device in this thread raises :class:`HostSyncError`."""
        self._local.forbid = True
        try:
            yield
        finally:
            self._local.forbid = False

    def new_stream(self, name: str | None = None) -> FakeStream:
        stream = FakeStream(name or f"s{len(self._streams)}")
        with self._lock:
            self._streams.append(stream)
        return stream

    def close(self) -> None:
        """Stop the stream workers once their queues drain."""
        _stop_streams(self._streams)

    # ------------------------------------------------------------------ memory
    def _allocate(self, shape, dtype) -> FakeDeviceArray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        with self._lock:
            if self.allocated_bytes + nbytes > self.memory_bytes:
                raise FakeOutOfMemoryError(
                    f"out of fake device memory allocating {nbytes} bytes "
                    f"({self.allocated_bytes} of {self.memory_bytes} in use)"
                )
            self.allocated_bytes += nbytes
        array = FakeDeviceArray(np.empty(shape, dtype=dtype), self)
        weakref.finalize(array, _call_if_alive, weakref.WeakMethod(self._free), nbytes)
        return array

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self.allocated_bytes -= nbytes

    def _free_pinned(self, nbytes: int) -> None:
        with self._lock:
            self.pinned_live_bytes -= nbytes

    # ------------------------------------------------------------------ DeviceBackend
    def is_device_array(self, value: Any) -> bool:
        return isinstance(value, FakeDeviceArray) and value.backend is self

    def adopt(self, value: Any) -> FakeDeviceArray:
        if not self.is_device_array(value):
            raise TypeError(f"{type(value).__name__} is not an array of {self!r}")
        return value

    def is_c_contiguous(self, array: FakeDeviceArray) -> bool:
        return bool(array._data.flags.c_contiguous)

    def current_stream(self) -> FakeStream:
        return getattr(self._local, "stream", None) or self.default_stream

    def record_event(self, stream: FakeStream) -> FakeEvent:
        event = FakeEvent()
        stream.enqueue(lambda: event._fire(stream.error), always=True)
        return event

    def wait_event(self, stream: FakeStream, event: FakeEvent) -> None:
        stream.enqueue_wait(event)

    def event_done(self, event: FakeEvent) -> bool:
        return event._fired.is_set()

    def synchronize_event(self, event: FakeEvent) -> None:
        if getattr(self._local, "forbid", False):
            raise HostSyncError("the host waited for the device inside forbid_host_sync()")
        with self._lock:
            self.host_syncs += 1
        event._fired.wait()
        if event.error is not None:
            raise event.error

    def _copy(self, kind: str, nbytes: int, stream: FakeStream, body: Callable[[], None]) -> None:
        def operation() -> None:
            if self.copy_hook is not None:
                self.copy_hook(kind, nbytes)
            body()
            with self._lock:
                self.copies[kind] += 1

        stream.enqueue(operation)

    def copy_on_stream(self, array: FakeDeviceArray, stream: FakeStream) -> FakeDeviceArray:
        copy = self._allocate(array.shape, array.dtype)
        source, target = array._data, copy._data
        self._copy("d2d", array.nbytes, stream, lambda: np.copyto(target, source))
        return copy

    def assign_on_stream(self, destination: FakeDeviceArray, source: FakeDeviceArray, stream: FakeStream) -> None:
        target, data = destination._data, source._data
        self._copy("d2d", destination.nbytes, stream, lambda: np.copyto(target, data))

    def gather_table(self, arrays, offsets, stream: FakeStream):
        return [(_flat_bytes(array._data), offset) for array, offset in zip(arrays, offsets)]

    def gather_on_stream(self, table, nbytes: int, stream: FakeStream) -> FakeDeviceArray:
        packed = self._allocate((nbytes,), np.uint8)
        target = packed._data

        def body() -> None:
            for source, offset in table:
                target[offset : offset + source.nbytes] = source

        self._copy("gather", nbytes, stream, body)
        return packed

    def empty(self, shape, dtype) -> FakeDeviceArray:
        return self._allocate(tuple(shape), dtype)

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        buffer = np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            self.pinned_live_bytes += nbytes
            self.pinned_peak_bytes = max(self.pinned_peak_bytes, self.pinned_live_bytes)
            self.pinned_allocations += 1
        weakref.finalize(buffer, _call_if_alive, weakref.WeakMethod(self._free_pinned), nbytes)
        return buffer

    def d2h_async(self, source: FakeDeviceArray, offset: int, destination: np.ndarray, stream: FakeStream) -> None:
        data, nbytes = source._data, destination.nbytes

        def body() -> None:
            destination[...] = _flat_bytes(data)[offset : offset + nbytes]

        self._copy("d2h", nbytes, stream, body)

    def h2d_async(self, source: np.ndarray, destination: FakeDeviceArray, offset: int, stream: FakeStream) -> None:
        data, nbytes = destination._data, source.nbytes

        def body() -> None:
            _flat_bytes(data)[offset : offset + nbytes] = source

        self._copy("h2d", nbytes, stream, body)

    def mem_info(self) -> tuple[int, int]:
        with self._lock:
            return self.memory_bytes - self.allocated_bytes, self.memory_bytes


def _stop_streams(streams: list[FakeStream]) -> None:
    for stream in streams:
        stream._stop()


def _call_if_alive(method: weakref.WeakMethod, *args: Any) -> None:
    """Run a finalizer's bookkeeping on its backend, unless the backend is gone (so it is not kept alive)."""
    bound = method()
    if bound is not None:
        bound(*args)
