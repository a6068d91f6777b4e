"""``Checkpoint``: group trackables, save them as one object graph, restore them by matching edges.

Where the object model meets the I/O side. A save walks the object graph and starts a write on the
caller's thread -- the snapshot is taken there, so device values are captured on the caller's
current CUDA stream -- and the write itself is a coroutine on the owned loop (``asyncckpt.io``):
``save`` waits for it (unless ``CheckpointOptions(enable_async=True)``), ``asave`` awaits it from
the caller's own event loop with no thread hop. A restore is the restore engine's steps
(``restore.restore_steps``) driven by blocking reads (``restore``) or awaited ones (``arestore``),
the matching always on the caller's thread.

At most one write per ``Checkpoint`` is in flight: a new save first waits for the previous one
and re-raises its error, as do ``sync()`` and ``restore()``'s wait.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from asyncckpt import io as ckio
from asyncckpt._runtime import gc_paused, process_state
from asyncckpt.io.settings import PlanSettings
from asyncckpt.model.autotrackable import AutoTrackable
from asyncckpt.errors import NotFoundError
from asyncckpt.graph import GraphCache, GraphView
from asyncckpt.restore import (
    run_async,
    run_blocking,
    CheckpointLoadStatus,
    CheckpointPosition,
    InitializationOnlyStatus,
    RestoreCoordinator,
    preload_simple_restoration,
)
from asyncckpt.name_based import restore_by_names
from asyncckpt.state_file import _tensorflow_checkpoints_in, update_checkpoint_state
from asyncckpt.model.trackable import Trackable, TrackableReference
from asyncckpt.model.variable import Variable

__all__ = ["Checkpoint", "CheckpointOptions", "add_variable", "is_chief"]

logger = logging.getLogger("asyncckpt")

class UnsyncedWrites:
    """Asynchronous writes nobody has waited for yet (at most one per ``Checkpoint``).

    Owned by the process state. Held strongly: a temporary ``Checkpoint``'s failed write must
    still be reported. At exit they are waited for and a failure nobody saw is logged and
    re-raised (TensorFlow re-raises it too).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: set[ckio.WriteHandle] = set()

    def add(self, handle: ckio.WriteHandle) -> None:
        with self._lock:
            self._handles.add(handle)

    def discard(self, handle: ckio.WriteHandle) -> None:
        with self._lock:
            self._handles.discard(handle)

    def at_exit(self, final: bool) -> None:
        if not final:
            return
        with self._lock:
            handles = list(self._handles)
            self._handles.clear()
        first_error = None
        for handle in handles:
            try:
                handle.result()
            except Exception as error:  # noqa: BLE001 - every failure is reported
                logger.error("An asynchronous checkpoint write to %s failed and was never synced: %r", handle.path, error)
                first_error = first_error or error
        if first_error is not None:
            raise first_error


def _unsynced_writes() -> UnsyncedWrites:
    return process_state().owned(UnsyncedWrites)


@dataclasses.dataclass
class CheckpointOptions:
    """Options for ``save``/``write``/``restore``/``read``.

    Parameters
    ----------
    enable_async : bool
        Return from ``save``/``write`` once the snapshot is taken; the bytes are written in the
        background. ``sync()`` waits for them and re-raises any error.
    experimental_write_callbacks : list of callables, optional
        Called in order, with no argument or with the saved path, after each write is durable.
    experimental_skip_slot_variables : bool
        On restore, neither restore nor require optimizer slot variables.
    write_settings, read_settings : optional
        Staging budget, chunk sizes and concurrency of the I/O pipeline.
    experimental_metrics_callback : callable, optional
        Called once after each write ends (committed or failed), in a worker thread, with a
        frozen :class:`~asyncckpt.io.ckio.WriteStats`: bytes and files written, and seconds per
        stage (snapshot -- the caller's stall --, data write, commit, total); and once after each
        restore or read, on the restoring thread, with a :class:`~asyncckpt.io.ckio.ReadStats`:
        values, bytes and data files read (every byte verified), seconds opening and reading.
        Its exceptions are logged, never raised.
    multi_worker : asyncckpt.MultiWorker, optional
        This process is worker ``index`` of ``count`` saving the same checkpoints to a shared
        filesystem: each writes its share of the bytes, the chief (worker 0) merges the sections,
        commits, and alone updates the ``checkpoint`` state file. Every worker's ``save``/``sync``
        returns once the checkpoint is committed. Also accepted as ``write_settings.multi_worker``.
    experimental_io_device, experimental_sharding_callback :
        Accepted for TensorFlow compatibility and ignored (placement and sharding are the pipeline's).
    experimental_enable_async_checkpoint : bool
        Deprecated spelling of ``enable_async``.
    """

    experimental_io_device: str | None = None
    experimental_enable_async_checkpoint: bool = False
    experimental_write_callbacks: Sequence[Callable] | None = None
    enable_async: bool = False
    experimental_sharding_callback: Any = None
    experimental_skip_slot_variables: bool = False
    write_settings: ckio.WriteSettings | None = None
    read_settings: ckio.ReadSettings | None = None
    experimental_metrics_callback: Callable[[Any], None] | None = None  # WriteStats, or ReadStats
    multi_worker: ckio.MultiWorker | None = None

    def __post_init__(self):
        if self.multi_worker is not None and not isinstance(self.multi_worker, ckio.MultiWorker):
            raise TypeError(f"multi_worker must be an asyncckpt.MultiWorker or None, got {self.multi_worker!r}")
        if self.experimental_enable_async_checkpoint:
            logger.warning("experimental_enable_async_checkpoint is deprecated; use enable_async=True")
            self.enable_async = True
        self.experimental_write_callbacks = list(self.experimental_write_callbacks or ())
        for callback in self.experimental_write_callbacks:
            _callback_arity(callback)
        if self.experimental_metrics_callback is not None and not callable(self.experimental_metrics_callback):
            raise TypeError(
                f"experimental_metrics_callback must be callable, got {self.experimental_metrics_callback!r}"
            )


def _write_settings(options: CheckpointOptions) -> ckio.WriteSettings:
    """``options.write_settings`` with ``options.multi_worker`` folded in (they must agree)."""
    settings = options.write_settings or ckio.WriteSettings()
    worker = getattr(options, "multi_worker", None)
    if worker is None:
        return settings
    if settings.multi_worker is not None and settings.multi_worker != worker:
        raise ValueError(
            f"CheckpointOptions.multi_worker ({worker}) and write_settings.multi_worker "
            f"({settings.multi_worker}) disagree; give one of them"
        )
    return dataclasses.replace(settings, multi_worker=worker)


def is_chief(options: CheckpointOptions | None) -> bool:
    """Whether this process keeps the bookkeeping of a save with ``options`` (not a non-chief worker)."""
    if options is None:
        return True
    worker = _write_settings(options).multi_worker
    return worker is None or worker.is_chief


def _callback_arity(callback: Callable) -> int:
    try:
        parameters = inspect.signature(callback).parameters
    except (TypeError, ValueError):
        return 1
    required = [
        p for p in parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(parameters) > 1 and len(required) > 1:
        raise AssertionError(
            f"A write callback must take no argument or one (the checkpoint path); {callback!r} takes "
            f"{len(parameters)}."
        )
    return min(len(parameters), 1)


def _bind_callback(callback: Callable, path: str) -> Callable[[], None]:
    if _callback_arity(callback) == 0:
        return callback
    return lambda: callback(path)


def _assert_trackable(obj: Any, name: str) -> None:
    if not isinstance(obj, Trackable):
        raise ValueError(
            f"`Checkpoint` was expecting {name} to be a trackable object (an object derived from "
            f"`Trackable`), got {obj}. Wrap an array in asyncckpt.Variable, and keep other Python state in a "
            "PythonState subclass."
        )


def add_variable(
    trackable: Trackable,
    name: str,
    shape: Sequence[int] | None = None,
    dtype: Any = np.float32,
    initializer: Any = None,
    trainable: bool = True,
    device: str | None = None,
) -> Variable:
    """Create a variable and track it as ``trackable.<name>``.

    If a restore is waiting for ``trackable.<name>`` and it is a plain variable, the checkpoint value
    is the initial value and ``initializer`` is not called (restore-on-create). ``initializer`` is an
    array-like value or a callable ``initializer(shape, dtype)``; with neither, the variable is zeros.
    """
    trackable._maybe_initialize_trackable()
    if trackable._lookup_dependency(name) is not None:
        raise ValueError(
            f"Called Trackable._track_trackable() with name='{name}', but a Trackable with this name is "
            "already declared as a dependency. Names must be unique (or overwrite=True)."
        )
    declared_shape = tuple(shape) if shape is not None else None
    position = preload_simple_restoration(trackable, name)
    if position is not None:
        _check_initial_checkpoint_value(position, name, declared_shape, dtype)
        variable = Variable(position.value(), name=name, trainable=trainable, device=device)
        variable._update_uid = position.restore_uid
    else:
        variable = Variable(_initial_value(name, declared_shape, dtype, initializer), dtype=dtype, name=name,
                            trainable=trainable, device=device)
    return trackable._track_trackable(variable, name)


def _check_initial_checkpoint_value(position: CheckpointPosition, name: str, shape: tuple[int, ...] | None,
                                    dtype: Any) -> None:
    """Refuse a checkpoint value that cannot be variable ``name``'s initial value, before reading it.

    ``save_counter``, an optimizer's ``iter`` and its hyperparameters declare their shape ``()``,
    so a saved value of another shape fails here, naming its key and checkpoint, rather than at
    first use.
    """
    spec = position.value_spec()
    source = position.value_source()
    if isinstance(spec.dtype, str):
        raise ValueError(f"In the creation of variable {name!r}, the checkpoint value ({source}) is a byte "
                         "string, not an array.")
    if shape is not None and tuple(spec.shape) != shape:
        raise ValueError(
            f"In the creation of variable {name!r}, the checkpoint value's shape {tuple(spec.shape)} is not "
            f"compatible with the explicitly supplied `shape` argument {shape}. The value is {source}."
        )
    if dtype is not None and np.dtype(spec.dtype) != np.dtype(dtype):
        raise ValueError(
            f"In the creation of variable {name!r}, the checkpoint value's dtype {np.dtype(spec.dtype)} does not "
            f"match the requested dtype {np.dtype(dtype)}. The value is {source}."
        )


def _initial_value(name: str, shape: tuple[int, ...] | None, dtype: Any, initializer: Any):
    if initializer is None:
        if shape is None:
            raise ValueError(f"add_variable({name!r}) needs a shape or an initializer")
        return np.zeros(shape, dtype=dtype)
    if callable(initializer):
        value = initializer(shape, dtype)
    else:
        value = initializer
    value = np.asarray(value, dtype=dtype) if not hasattr(value, "__cuda_array_interface__") else value
    if shape is not None and tuple(value.shape) != shape:
        if value.ndim == 0:
            return np.full(shape, value, dtype=dtype)
        raise ValueError(
            f"add_variable({name!r}): the initial value's shape {tuple(value.shape)} is not compatible with "
            f"the explicitly supplied `shape` argument {shape}"
        )
    return value


def _record_in_state_file(directory: str, path: str) -> None:
    """Name ``path`` in the state file of ``directory``, unless that file is TensorFlow's record.

    TensorFlow keeps the same ``checkpoint`` file; rewriting it would drop its checkpoints from it,
    so a save beside TensorFlow checkpoints leaves the file alone and says so.
    """
    found = _tensorflow_checkpoints_in(directory)
    if found:
        logger.warning(
            "Not recording %s in the state file of %s: it lists TensorFlow checkpoints (%s), and asyncckpt "
            "does not rewrite files it did not write. latest_checkpoint() will not name this checkpoint.",
            path, directory, ", ".join(found),
        )
        return
    update_checkpoint_state(directory, path)


class Checkpoint(AutoTrackable):
    """Groups trackable objects, saving and restoring them.

    ``Checkpoint(**kwargs)`` tracks each keyword argument under its name; ``Checkpoint(root, **kwargs)``
    saves ``root`` as the top of the graph with the kwargs attached to it. See the package README for
    the programming model, which follows TensorFlow 2's ``tf.train.Checkpoint``.
    """

    def __init__(self, root: Any = None, **kwargs: Any):
        super().__init__()
        self._maybe_initialize_trackable()
        internals = {
            "_self_save_counter": None,
            "_self_root": root,
            "_self_attached": None,
            "_self_pending": None,
            "_self_save_lock": threading.RLock(),
            "_self_graph_cache": GraphCache(),
        }
        for name, value in internals.items():
            object.__setattr__(self, name, value)
        attached: list[TrackableReference] = []
        trackable_root = None
        if root is not None:
            trackable_root = root() if isinstance(root, weakref.ref) else root
            _assert_trackable(trackable_root, "root")
            trackable_root._maybe_initialize_trackable()
            kwargs["root"] = root
        for key, value in sorted(kwargs.items(), key=lambda item: item[0]):
            setattr(self, key, value)
            converted = getattr(self, key)
            if isinstance(converted, weakref.ref):
                converted = converted()
            if not isinstance(converted, Trackable) and key != "root":
                converted = self._lookup_dependency(key) or converted  # framework state: its adapter
            _assert_trackable(converted, key)
            if trackable_root is not None and key != "root":
                child = trackable_root._lookup_dependency(key)
                if child is None:
                    attached.append(TrackableReference(key, converted))
                elif child is not converted:
                    raise ValueError(
                        f"Cannot create a Checkpoint with keyword argument {key} if root.{key} already exists."
                    )
        if root is not None:
            object.__setattr__(self, "_self_attached", attached)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "root" and isinstance(value, weakref.ref):
            object.__setattr__(self, name, value)  # a weak root is not a dependency of the Checkpoint
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ graph
    def _graph_view(self) -> GraphView:
        """The saved graph's view; it holds the root weakly so that statuses don't keep it alive."""
        if self._self_root is None:
            return GraphView(weakref.ref(self))
        root = self._self_root
        return GraphView(root if isinstance(root, weakref.ref) else weakref.ref(root), tuple(self._self_attached))

    @property
    def save_counter(self) -> Variable:
        """An int64 variable incremented by ``save()``; created on first use (restore-on-create)."""
        self._maybe_create_save_counter()
        return self._self_save_counter

    def _maybe_create_save_counter(self) -> None:
        if self._self_save_counter is not None:
            return
        counter = add_variable(self, "save_counter", shape=(), initializer=0, dtype=np.int64, trainable=False)
        object.__setattr__(self, "_self_save_counter", counter)
        if self._self_attached is not None:
            self._self_attached.append(TrackableReference("save_counter", counter))
            root = self._graph_view().root_object
            for position in sorted(root._deferred_dependencies.pop("save_counter", ()),
                                   key=lambda p: p.restore_uid, reverse=True):
                position.restore(counter)

    # ------------------------------------------------------------------ saving
    def save(self, file_prefix: str | os.PathLike, options: CheckpointOptions | None = None) -> str:
        """Write ``<file_prefix>-<save_counter + 1>``, record it in the ``checkpoint`` state file, return it."""
        options = copy.copy(options) if options is not None else CheckpointOptions()
        prefix = os.fspath(file_prefix)
        with self._self_save_lock:
            self._wait_for_pending_write()
            counter = self.save_counter
            counter.assign_add(1)
            path = f"{prefix}-{int(counter)}"
            directory = os.path.dirname(path) or "."
            state_updater = lambda: _record_in_state_file(directory, path)  # noqa: E731
            # Of several workers saving together, only the chief records the checkpoint.
            return self._write(path, options, extra_callbacks=[state_updater] if is_chief(options) else [])

    def write(self, file_prefix: str | os.PathLike, options: CheckpointOptions | None = None) -> str:
        """Write exactly ``file_prefix``: no numbering, no ``save_counter`` change, no state file."""
        options = copy.copy(options) if options is not None else CheckpointOptions()
        with self._self_save_lock:
            self._wait_for_pending_write()
            return self._write(os.fspath(file_prefix), options)

    def _write(self, path: str, options: CheckpointOptions, extra_callbacks: Sequence[Callable] = ()) -> str:
        handle = self._start_write(path, options, extra_callbacks)
        if options.enable_async:
            object.__setattr__(self, "_self_pending", handle)
            _unsynced_writes().add(handle)
        else:
            handle.result()
        return path

    def _start_write(self, path: str, options: CheckpointOptions, extra_callbacks: Sequence[Callable]):
        settings = _write_settings(options)
        prepared = self._prepare_write(settings)
        callbacks = [_bind_callback(callback, path) for callback in options.experimental_write_callbacks]
        callbacks.extend(extra_callbacks)
        return ckio.start_write(
            path, prepared, settings=settings, on_commit=callbacks, on_stats=options.experimental_metrics_callback
        )

    def _prepare_write(self, settings: ckio.WriteSettings) -> ckio.PreparedWrite:
        """The entries of this save, validated and laid out; reused while the graph is unchanged.

        An unchanged program (see :class:`~asyncckpt.graph.GraphCache`) reuses the last layout and
        only takes fresh values of computed attributes (``PythonState``), so the stall of a save no
        longer grows with the number of variables. The bytes written are the same either way.
        """
        with gc_paused():  # the walk and the layout of 10,000 values allocate a lot: no collector pauses
            return self._prepare_write_now(settings)

    def _prepare_write_now(self, settings: ckio.WriteSettings) -> ckio.PreparedWrite:
        cache = self._self_graph_cache
        serialized, values = cache.serialize(self._graph_view())
        kept = cache.attachment(serialized)  # lives and dies with the cached graph
        # A sharded value makes several sources of one entry: its layout is prepared afresh.
        if values is not None and kept is not None and kept[0] == PlanSettings.of(settings) and not kept[1].sharded_entries:
            prepared = kept[1].with_values(values) if values else kept[1]
        else:
            fresh = values or {}  # a cached graph holds no computed values: this save's come with it
            entries = [ckio.SaveEntry(key, fresh.get(index, source)) for index, (key, source) in enumerate(serialized.entries)]
            prepared = ckio.prepare_write(entries, serialized.object_graph, settings=settings)
        cache.attach(serialized, (PlanSettings.of(settings), prepared.released(values or cache.computed_indices())))
        cache.release_computed()
        return prepared

    def _wait_for_pending_write(self) -> None:
        """Wait for this checkpoint's write in flight; re-raise its error once."""
        handle = self._self_pending
        if handle is None:
            return
        object.__setattr__(self, "_self_pending", None)
        _unsynced_writes().discard(handle)
        handle.result()

    def sync(self) -> None:
        """Wait until pending asynchronous writes are durable; re-raise the first background error."""
        with self._self_save_lock:
            self._wait_for_pending_write()

    async def asave(self, file_prefix: str | os.PathLike, options: CheckpointOptions | None = None) -> str:
        """``save`` for asyncio programs: the snapshot is taken now, on this thread; resolves when durable.

        The previous write of this checkpoint is awaited first, then the graph is walked and the
        values captured here (device values on this thread's current stream), then the write is
        awaited from this event loop: no worker thread, and the loop never blocks on I/O.
        """
        options = copy.copy(options) if options is not None else CheckpointOptions()
        options.enable_async = True
        await self._await_pending_write()
        path = self.save(file_prefix, options)
        await self._await_pending_write()
        return path

    async def awrite(self, file_prefix: str | os.PathLike, options: CheckpointOptions | None = None) -> str:
        """``write`` for asyncio programs (see :meth:`asave`)."""
        options = copy.copy(options) if options is not None else CheckpointOptions()
        options.enable_async = True
        await self._await_pending_write()
        path = self.write(file_prefix, options)
        await self._await_pending_write()
        return path

    async def async_sync(self) -> None:
        """``sync`` for asyncio programs: await pending writes; re-raise the first background error."""
        await self._await_pending_write()

    async def _await_pending_write(self) -> None:
        handle = self._self_pending
        if handle is not None:
            with contextlib.suppress(Exception):
                await handle.wait()  # without blocking the loop; sync() then reports the outcome once
            self.sync()

    # ------------------------------------------------------------------ restoring
    def restore(self, save_path: str | os.PathLike | None, options: CheckpointOptions | None = None):
        """Restore from ``save_path`` (``read`` plus the ``save_counter``); ``None`` restores nothing."""
        return run_blocking(self._restore_steps(save_path, options))

    async def arestore(self, save_path: str | os.PathLike | None, options: CheckpointOptions | None = None):
        """``restore`` for asyncio programs: the same matching on this thread, every read awaited."""
        return await run_async(self._restore_steps(save_path, options))

    def read(self, save_path: str | os.PathLike, options: CheckpointOptions | None = None) -> CheckpointLoadStatus:
        """Restore values of objects that exist (or are queued for creation); ``save_counter`` is left alone."""
        return run_blocking(self._read_steps(save_path, options))

    async def aread(self, save_path: str | os.PathLike, options: CheckpointOptions | None = None):
        """``read`` for asyncio programs."""
        return await run_async(self._read_steps(save_path, options))

    def _restore_steps(self, save_path, options: CheckpointOptions | None):
        if save_path is None:
            self._maybe_create_save_counter()
            return InitializationOnlyStatus(self._graph_view())
        try:
            status = yield from self._read_steps(save_path, options)
        except NotFoundError as error:
            raise NotFoundError(
                f"Error when restoring from checkpoint or SavedModel at {os.fspath(save_path)}: {error}\n"
                "Please double-check that the path is correct. You may be missing the checkpoint suffix "
                "(e.g. the '-1' in 'path/to/ckpt-1'). asyncckpt reads asyncckpt checkpoints only, not "
                "SavedModel directories."
            ) from error
        self._maybe_create_save_counter()
        return status

    def _read_steps(self, save_path, options: CheckpointOptions | None):
        """The one restore path: wait for this process's writes there, open, match, read in batches."""
        options = options or CheckpointOptions()
        path = os.fspath(save_path)
        read_settings = options.read_settings or ckio.ReadSettings()
        yield _WaitForWrites(path, read_settings.storage)
        started = time.perf_counter()
        reader, opened = None, 0.0
        try:
            reader = yield _OpenReader(path, read_settings)
            opened = time.perf_counter() - started
            logger.debug("restore of %s: opened in %.3f s", path, opened)
            if getattr(reader, "name_based", False):  # a TF1 checkpoint: no object graph, values by variable name
                status = yield from restore_by_names(self._graph_view(), reader, optional=(self._self_save_counter,))
            else:
                coordinator = RestoreCoordinator(
                    reader.own_object_graph(), reader, skip_slot_variables=options.experimental_skip_slot_variables
                )
                view = self._graph_view()
                root = view.root_object
                yield from CheckpointPosition(coordinator, 0).restore_steps(root)
                yield from self._restore_attached(coordinator, root)
                status = CheckpointLoadStatus(coordinator, view)
        except Exception as error:
            _report_read(options, path, reader, started, opened, error)
            raise
        _report_read(options, path, reader, started, opened, None)
        return status

    def _restore_attached(self, coordinator: RestoreCoordinator, root: Trackable):
        """Match kwargs attached to an explicit root against the saved root's children (steps)."""
        if self._self_attached is None:
            return
        saved_children = {child["local_name"]: child["node_id"] for child in coordinator.nodes[0]["children"]}
        for ref in self._self_attached:
            if ref.name == "root" or ref.name not in saved_children:
                continue
            queued = root._deferred_dependencies.get(ref.name)
            if queued:
                queued[:] = [p for p in queued if p.checkpoint is not coordinator]
                if not queued:
                    del root._deferred_dependencies[ref.name]
            node_id = saved_children[ref.name]
            if node_id in coordinator.object_by_proto_id:
                continue
            target = ref.ref() if isinstance(ref.ref, weakref.ref) else ref.ref
            yield from CheckpointPosition(coordinator, node_id).restore_steps(target)

    # ------------------------------------------------------------------ copying
    def __deepcopy__(self, memo):
        copied = Checkpoint.__new__(Checkpoint)
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            if name == "_self_deferred_dependencies":
                value = {}
            elif name == "_self_update_uid":
                value = -1
            elif name == "_self_pending":
                value = None
            elif name == "_self_save_lock":
                value = threading.RLock()
            elif name == "_self_graph_cache":
                value = GraphCache()
            elif name == "_self_root" and isinstance(value, weakref.ref):
                pass
            else:
                value = copy.deepcopy(value, memo)
            object.__setattr__(copied, name, value)
        return copied


def _report_read(options: CheckpointOptions, path: str, reader, started: float, opened: float,
                 error: Exception | None) -> None:
    """Log a restore's figures at DEBUG and hand them to the metrics callback (whose errors are logged)."""
    counts = getattr(reader, "counts", None)
    tensors, nbytes, files, reading = (counts.tensors, counts.bytes, len(counts.files), counts.seconds) if counts \
        else (0, 0, 0, 0.0)
    total = time.perf_counter() - started
    stats = ckio.ReadStats(path, tensors, nbytes, files, opened, reading, total, error)
    logger.debug("restore of %s: %d values, %d bytes from %d data files in %.3f s (%.3f s reading)%s", path,
                 stats.tensors, stats.bytes_read, stats.files_read, total, stats.read_seconds,
                 f", failed: {error}" if error else "")
    callback = options.experimental_metrics_callback
    if callback is not None:
        try:
            callback(stats)
        except Exception:  # noqa: BLE001 - observing a restore must never change its outcome
            logger.exception("the metrics callback for the restore of %s failed", path)


@dataclasses.dataclass(frozen=True)
class _WaitForWrites:
    """A restore step: wait for this process's writes to ``path`` (their errors are not ours)."""

    path: str
    storage: Any

    def run(self) -> None:
        ckio.wait_for_pending_writes(self.path, storage=self.storage)

    async def arun(self) -> None:
        await ckio.await_pending_writes(self.path, storage=self.storage)


@dataclasses.dataclass(frozen=True)
class _OpenReader:
    """A restore step: open the committed checkpoint at ``path``."""

    path: str
    settings: ckio.ReadSettings

    def run(self) -> ckio.CheckpointReader:
        return ckio.open_reader(self.path, settings=self.settings)

    async def arun(self) -> ckio.CheckpointReader:
        return await ckio.aopen_reader(self.path, settings=self.settings)
