"""``CheckpointManager``, and the state-file API re-exported from `asyncckpt.state_file`.

The state file itself (its text codec, `get_checkpoint_state`, `latest_checkpoint`,
`update_checkpoint_state`, the lock file) lives in `asyncckpt.state_file`; its public names are
re-exported here, where TensorFlow keeps them (``tf.train.latest_checkpoint`` comes from
``checkpoint_management``). What a manager records of its directory, and the protocol that keeps
several managers (and processes) sharing one directory in agreement, is
`asyncckpt.bookkeeping`'s; which checkpoints expire is `asyncckpt.retention`'s. This module keeps
what a user sees: numbering and skipping saves, waiting for them, restoring the newest one.

Concurrency
-----------
*Within a process* the manager's bookkeeping (recording a new checkpoint, writing the state file,
deleting old checkpoints) runs as the last write callback of the save, i.e. only after the data is
durable -- on a background thread for asynchronous saves -- under a lock that guards all of the
manager's mutable state (TensorFlow mutates it from its async thread without one).

*Across processes* every read-modify-write of the state file holds the state file's lock (see
`asyncckpt.bookkeeping`); plain `update_checkpoint_state` (used by `asyncckpt.Checkpoint.save`)
takes the same lock but only writes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import numbers
import os
import threading
import time
from typing import Any, Callable

import numpy as np

from asyncckpt import _paths
from asyncckpt import io as ckio
from asyncckpt import state_file
from asyncckpt.bookkeeping import CheckpointIo, ManagedCheckpoints
from asyncckpt.checkpoint import CheckpointOptions, is_chief
from asyncckpt.errors import CheckpointError, CorruptCheckpointError, NotFoundError
from asyncckpt.retention import RetentionPolicy
from asyncckpt.state_file import (  # re-exported: TensorFlow's spelling is checkpoint_management.X
    MAX_STATE_FILE_BYTES,
    CheckpointState,
    CheckpointStateParseError,
    _fspath,
    checkpoint_exists,
    format_checkpoint_state,
    get_checkpoint_state,
    latest_checkpoint,
    parse_checkpoint_state,
    update_checkpoint_state,
)

__all__ = [*state_file.__all__, "CheckpointManager"]  # the state-file functions are re-exported here

logger = logging.getLogger("asyncckpt")


def _as_integer(value: Any, what: str) -> int:
    """An int from a Python/NumPy integer or an integer-dtype variable (anything with ``numpy()``)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer or an integer variable, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if hasattr(value, "numpy"):
        array = np.asarray(value.numpy())
        if array.shape == () and np.issubdtype(array.dtype, np.integer):
            return int(array)
    raise TypeError(f"{what} must be an integer or an integer variable, got {value!r}")


def _read_step(step_counter: Any) -> Any:
    value = step_counter.numpy() if hasattr(step_counter, "numpy") else step_counter
    array = np.asarray(value)
    if array.shape != ():
        raise ValueError(f"step_counter must hold a scalar, got shape {array.shape}")
    return array.item()


class CheckpointManager:
    """Save numbered checkpoints into a directory, keep the newest few and delete the rest.

    Mirrors ``tf.train.CheckpointManager``. The manager's state (the active set of checkpoints,
    the latest one, and the preservation clock) lives in the directory's state file, so a new
    manager in the same directory continues where the previous one stopped: it manages the
    recorded checkpoints newer than the last preserved one, and may delete them on its first
    save. Checkpoints written by plain `asyncckpt.Checkpoint.save` carry no timestamps and are
    never managed or deleted; neither are recorded paths outside ``directory`` or names no
    checkpoint can have (an empty entry, a name too long for the file system), which are
    logged at WARNING. Paths are normalised, so ``./ckpt-2`` in the state file and a save of
    ``ckpt-2`` are the same checkpoint. A directory whose state file lists TensorFlow checkpoints
    (TensorFlow keeps the same state file) is refused at construction, so that none of them is
    ever adopted, renumbered over or deleted; the manager never deletes a ``P.index`` it did not
    write either (`asyncckpt.io.delete_checkpoint` leaves it, with a WARNING).

    Bookkeeping happens only after a checkpoint is durable (as the last write callback), so with
    ``CheckpointOptions(enable_async=True)`` the state file, `latest_checkpoint` and deletions
    advance on the background thread; `latest_checkpoint`, `checkpoints` and
    `restore_or_initialize` first wait for this manager's pending saves, so they never report a
    stale or incomplete checkpoint. `asyncckpt.bookkeeping` describes the cross-process protocol.

    Checkpoints go where each save's ``options.write_settings`` sends them (``storage`` and
    ``runtime``, the local file system and the process runtime by default), and the manager
    deletes them, looks them up, waits for them and restores them (`restore_or_initialize`)
    through that same storage and runtime. The state file does not follow: it is always a local
    file in ``directory`` (atomic rename and ``flock`` need a file system), so ``directory`` is
    both a local folder and, joined with ``checkpoint_name``, the checkpoint prefix on the
    storage. Keep one storage per directory: checkpoints another manager recorded are looked up
    and deleted through the storage of the save whose bookkeeping runs. The module-level
    `latest_checkpoint` and `checkpoint_exists` look on the local file system only; use this
    manager's `latest_checkpoint` for checkpoints elsewhere.

    Parameters
    ----------
    checkpoint : asyncckpt.Checkpoint
        The object to save; its ``save_counter`` numbers the checkpoints.
    directory : str or os.PathLike
        Where the state file (always local) and the checkpoints go.
    max_to_keep : int or None
        How many checkpoints to keep in the active set; ``None`` keeps all of them.
    keep_checkpoint_every_n_hours : float, optional
        A checkpoint leaving the active set is preserved (kept on disk, forgotten by every
        manager) if at least this many hours passed since the last preserved one.
    checkpoint_name : str
        File name stem: checkpoints are ``<directory>/<checkpoint_name>-<number>``.
    step_counter : variable, optional
        Read on each save when ``checkpoint_interval`` is set.
    checkpoint_interval : int, optional
        Minimum number of steps between two saves.
    init_fn : callable, optional
        Called by `restore_or_initialize` when the directory has no checkpoint.
    clock : callable, optional
        Returns seconds since the epoch; ``time.time`` by default (looked up at call time).

    Raises
    ------
    ValueError
        If ``max_to_keep`` is not a positive integer or ``None``, if ``checkpoint_interval`` is
        given without ``step_counter``, or if a number argument is negative.
    TypeError
        If ``checkpoint`` is not a checkpoint or ``init_fn`` is not callable.
    UnsupportedFormatError
        If the state file of ``directory`` lists TensorFlow checkpoints.
    """

    def __init__(
        self,
        checkpoint,
        directory,
        max_to_keep,
        keep_checkpoint_every_n_hours=None,
        checkpoint_name="ckpt",
        step_counter=None,
        checkpoint_interval=None,
        init_fn=None,
        *,
        clock: Callable[[], float] | None = None,
    ):
        if not (callable(getattr(checkpoint, "write", None)) and hasattr(type(checkpoint), "save_counter")):
            # Looked up on the type: reading ``save_counter`` on the object would create it.
            raise TypeError(
                f"`checkpoint` must be an asyncckpt.Checkpoint (with `save_counter` and `write`), got {checkpoint!r}"
            )
        retention = RetentionPolicy(max_to_keep, keep_checkpoint_every_n_hours)  # validates both
        if checkpoint_interval is not None:
            if step_counter is None:
                raise ValueError("`step_counter` should be passed if `checkpoint_interval` is not None.")
            if not isinstance(checkpoint_interval, numbers.Real) or not checkpoint_interval >= 0:
                raise ValueError(f"`checkpoint_interval` must be a non-negative number, got {checkpoint_interval!r}.")
        if not isinstance(checkpoint_name, str) or not checkpoint_name:
            raise ValueError(f"`checkpoint_name` must be a non-empty string, got {checkpoint_name!r}.")
        if init_fn is not None and not callable(init_fn):
            raise TypeError(f"`init_fn` must be callable, got {init_fn!r}")

        self._checkpoint = checkpoint
        self._directory = _fspath(directory, "directory")
        self._checkpoint_prefix = _paths.join(self._directory, checkpoint_name)
        self._step_counter = step_counter
        self._checkpoint_interval = checkpoint_interval
        self._last_checkpoint_step = None
        self._init_fn = init_fn

        # Guards everything below; bookkeeping runs on the pipeline's background thread.
        self._lock = threading.RLock()
        self._pending: list[_PendingSave] = []  # saves whose bookkeeping has not run yet
        # Reads the state file: the active set, the latest checkpoint and the preservation clock.
        self._managed = ManagedCheckpoints(
            self._directory, retention, clock if clock is not None else (lambda: time.time())
        )

    # -- properties ---------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        """The directory holding the checkpoints and the state file."""
        return self._directory

    @property
    def checkpoint(self):
        """The managed `asyncckpt.Checkpoint`."""
        return self._checkpoint

    @property
    def checkpoint_interval(self):
        """Minimum number of steps between saves, or ``None``."""
        return self._checkpoint_interval

    @property
    def latest_checkpoint(self) -> str | None:
        """Prefix of the newest checkpoint, after this manager's pending saves committed.

        Equal to ``latest_checkpoint(directory)`` while this is the only manager of the
        directory; ``None`` when there is none.
        """
        self._wait_for_own_saves()
        with self._lock:
            return self._managed.latest

    @property
    def checkpoints(self) -> list[str]:
        """The managed checkpoints, oldest first (preserved ones excluded)."""
        self._wait_for_own_saves()
        with self._lock:
            return self._managed.paths()

    # -- saving -------------------------------------------------------------------------------

    def save(self, checkpoint_number=None, check_interval: bool = True, options=None) -> str | None:
        """Write a new checkpoint ``<directory>/<checkpoint_name>-<number>`` and manage it.

        ``checkpoint.save_counter`` is incremented on every save that is not skipped, even when
        ``checkpoint_number`` is given. Recording the checkpoint, rewriting the state file and
        deleting checkpoints beyond ``max_to_keep`` happen after the data is durable: before
        this returns for a synchronous save, on the background thread for an asynchronous one.

        Parameters
        ----------
        checkpoint_number : int or integer variable, optional
            Number for the file name instead of ``save_counter`` (a variable is not incremented).
        check_interval : bool
            With ``checkpoint_interval`` set: ``True`` skips the save unless at least that many
            steps passed since the last one; ``False`` saves unless the step did not change.
        options : asyncckpt.CheckpointOptions, optional
            Passed to ``checkpoint.write`` (copied, never mutated); the manager appends its
            bookkeeping as the last write callback.

        Returns
        -------
        str or None
            The new checkpoint prefix, or ``None`` when the interval check skipped the save.
        """
        with self._lock:
            if self._checkpoint_interval is not None:
                current_step = _read_step(self._step_counter)
                if self._last_checkpoint_step is not None:
                    if current_step == self._last_checkpoint_step:
                        return None
                    if check_interval and current_step < self._last_checkpoint_step + self._checkpoint_interval:
                        return None
                self._last_checkpoint_step = current_step
            save_counter = self._checkpoint.save_counter
            if self._managed.resumed is None:
                # A counter above 0: restored from a checkpoint, or going on. Explicit numbers: the
                # program numbers its checkpoints itself, and so decides what replaces what.
                self._managed.resumed = int(save_counter) > 0 or checkpoint_number is not None
            save_counter.assign_add(1)
            number = _as_integer(save_counter if checkpoint_number is None else checkpoint_number, "checkpoint_number")
            prefix = f"{self._checkpoint_prefix}-{number}"
            if self._managed.would_overwrite_found(prefix):
                save_counter.assign_sub(1)
                raise CheckpointError(
                    f"refusing to overwrite checkpoint {prefix}: it was in {self._directory} before this run, "
                    "whose latest checkpoint was missing, and this run did not resume from it (save_counter "
                    "was 0 at its first save). Restore the latest checkpoint first (restore_or_initialize()), "
                    "save under other numbers "
                    "(checkpoint_number=...), or delete the old checkpoints to start over"
                )
            pending = _PendingSave(prefix, CheckpointIo.of(options))
            self._pending.append(pending)

        write_options = copy.copy(options) if options is not None else CheckpointOptions()
        write_options.experimental_write_callbacks = [
            *(getattr(options, "experimental_write_callbacks", None) or []),
            self._make_bookkeeping_callback(pending, chief=is_chief(options)),
        ]
        try:
            path = self._checkpoint.write(prefix, options=write_options)
        except BaseException:
            self._forget(pending)
            raise
        with self._lock:
            pending.started = True
        return path

    def _make_bookkeeping_callback(self, pending: _PendingSave, *, chief: bool = True) -> Callable[[Any], None]:
        def record_and_sweep(save_path) -> None:
            try:
                with self._lock:
                    if chief:
                        in_flight = [other.path for other in self._pending]
                        self._managed.record(_fspath(save_path, "save path"), pending.io, in_flight=in_flight)
                    else:
                        self._managed.follow(_fspath(save_path, "save path"), pending.io)
            finally:
                self._forget(pending)

        return record_and_sweep

    def _forget(self, pending: _PendingSave) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._pending.remove(pending)

    # -- waiting and restoring ----------------------------------------------------------------

    def _wait_for_own_saves(self) -> None:
        """Block until the bookkeeping of every save that returned has run, or its write failed.

        Saves still inside ``save()`` on another thread have not happened yet for the caller and
        are not waited for; neither is the write whose callback is calling (the pipeline skips
        it), so a write callback may read these properties without deadlocking.
        """
        with self._lock:
            started = [pending for pending in self._pending if pending.started]
        for pending in started:
            # Returns once that write and its callbacks finished, successfully or not.
            pending.io.wait(pending.path)
        for pending in started:
            self._forget(pending)  # a failed write never runs its callbacks

    def sync(self) -> None:
        """Wait for every pending save of the checkpoint; re-raise a background error."""
        self._checkpoint.sync()
        self._wait_for_own_saves()

    def restore_or_initialize(self) -> str | None:
        """Restore the latest checkpoint, or run ``init_fn`` when there is none.

        Waits first for this manager's pending saves, so an asynchronous first save is restored
        rather than re-initialized. A checkpoint this manager saved is read from the storage and
        runtime it was saved with; one found in the state file at construction from the local
        file system. The load status is discarded; use
        ``checkpoint.restore(manager.latest_checkpoint)`` to make assertions.

        Returns
        -------
        str or None
            The restored prefix, or ``None`` when ``init_fn`` (if any) was called instead.
        """
        latest = self.latest_checkpoint
        if latest is not None:
            with self._lock:
                io = self._managed.latest_io
                older = [path for path in reversed(self._managed.paths()) if path != latest]
            restored = self._restore_newest_verified([latest, *older], io)
            if restored is not None:
                if self._checkpoint_interval is not None:
                    with self._lock:
                        self._last_checkpoint_step = _read_step(self._step_counter)
                return restored
        if self._init_fn is not None:
            self._init_fn()
        return None

    def _restore_newest_verified(self, candidates: list[str], io: CheckpointIo) -> str | None:
        """Restore the first of ``candidates`` (newest first) whose every checksum verifies.

        Each is verified before anything is restored from it, so a corrupt checkpoint leaves no
        variable half-restored; a fallback is logged at WARNING naming the one used, and one that
        fails names why. ``None`` (logged at ERROR) when none verifies.
        """
        read_settings = io.read_settings()
        options = None if read_settings is None else CheckpointOptions(read_settings=read_settings)
        verify_settings = read_settings if read_settings is not None else ckio.ReadSettings()
        for path in candidates:
            if not io.exists(path):
                continue
            try:
                ckio.open_reader(path, settings=verify_settings).verify()
            except (CorruptCheckpointError, NotFoundError) as error:
                logger.warning("Checkpoint %s failed verification, trying an older one: %s", path, error)
                continue
            self._checkpoint.restore(path, options=options)
            if path != candidates[0]:
                logger.warning("Restored %s, the newest checkpoint that verified (not %s)", path, candidates[0])
            with self._lock:
                self._managed.set_latest(path, io)
            return path
        logger.error("No checkpoint in %s passed verification (%s); initializing instead",
                     self._directory, ", ".join(candidates))
        return None


class _PendingSave:
    """One save whose bookkeeping callback has not run; ``started`` once ``write`` returned."""

    __slots__ = ("path", "io", "started")

    def __init__(self, path: str, io: CheckpointIo):
        self.path = path
        self.io = io
        self.started = False
