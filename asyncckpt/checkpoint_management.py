"""``CheckpointManager``, and the state-file API re-exported from `asyncckpt.state_file`.

The state file itself (its text codec, `get_checkpoint_state`, `latest_checkpoint`,
`update_checkpoint_state`, the lock file) lives in `asyncckpt.state_file`; its public names are
re-exported here, where TensorFlow keeps them (``tf.train.latest_checkpoint`` comes from
``checkpoint_management``).

Concurrency
-----------
*Within a process* the manager's bookkeeping (recording a new checkpoint, writing the state file,
deleting old checkpoints) runs as the last write callback of the save, i.e. only after the data is
durable -- on a background thread for asynchronous saves -- under a lock that guards all of the
manager's mutable state (TensorFlow mutates it from its async thread without one).

*Across processes* we use a **lock file**, not compare-and-swap: every read-modify-write of the
state file holds an exclusive ``fcntl.flock`` on ``<directory>/.<latest_filename>.lock`` (see
`asyncckpt.state_file`). While holding it a manager re-reads the state file and then

1. keeps the entries other managers recorded there (those it did not find at construction, did
   not delete or preserve itself, and whose checkpoints still exist),
2. forgets its own entries that another manager deleted (missing from the file and from disk),
3. adds its new checkpoint, takes its expired checkpoints out of the active set, names the ones
   to delete in the pending-deletions file ``<directory>/.<latest_filename>.deleting``, writes the
   state file once, deletes them, and removes the pending-deletions file.

TensorFlow instead writes the file, deletes, and writes it again, so a crash or a failed
deletion in between leaves the file naming checkpoints that are gone. Here the file never names
a deleted checkpoint, and the pending-deletions file keeps a crash in between from leaving
complete checkpoints that nothing lists (and so nothing would ever delete): the next manager to
update the state file deletes those of them the file does not list again. Deletions that fail
stay in that file and are tried again at the next save.

So two managers sharing a directory never lose each other's entries, every path the file lists
exists, and ``model_checkpoint_path`` is the checkpoint committed last by anyone. A manager
still adopts, at construction, every managed entry of the file (TensorFlow's behaviour) that it
could have written itself -- a path inside ``directory`` (not through a symbolic link) whose
name fits the file system; other entries are logged at WARNING and never deleted.
Paths are compared and recorded normalised (``ckpt-2`` and ``./ckpt-2`` are one checkpoint).
A manager created while another is saving may delete that one's older checkpoints; build
concurrent managers before they save, and give them different ``checkpoint_name`` values
(managers sharing a name number their files independently and overwrite each other's).
Plain `update_checkpoint_state` (used by `asyncckpt.Checkpoint.save`) takes the same lock but
only writes.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import math
import numbers
import os
import threading
import time
from typing import Any, Callable

import numpy as np

from asyncckpt import state_file
from asyncckpt import io as ckio
from asyncckpt.errors import CheckpointError, CorruptCheckpointError, NotFoundError, UnsupportedFormatError
from asyncckpt._runtime import Runtime
from asyncckpt.checkpoint import CheckpointOptions, is_chief
from asyncckpt.naming import lock_name
from asyncckpt.state_file import (
    MAX_STATE_FILE_BYTES,
    CheckpointState,
    CheckpointStateParseError,
    _build_state,
    _fspath,
    _listed_tensorflow_checkpoints,
    _load_pending_deletions,
    _load_state,
    _recorded_checkpoint_exists,
    newest_committed,
    _remove_pending_deletions,
    _state_file_lock,
    _write_pending_deletions,
    _write_state,
    checkpoint_exists,
    format_checkpoint_state,
    get_checkpoint_state,
    latest_checkpoint,
    parse_checkpoint_state,
    update_checkpoint_state,
)
from asyncckpt.io.storage import Storage

__all__ = [*state_file.__all__, "CheckpointManager"]  # the state-file functions are re-exported here

logger = logging.getLogger("asyncckpt")

#: The longest file name (in bytes) the file systems we write to accept.
_NAME_MAX = 255


# ---------------------------------------------------------------------------------------------
# CheckpointManager
# ---------------------------------------------------------------------------------------------


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
    stale or incomplete checkpoint. See the module docstring for the cross-process protocol.

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
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, numbers.Integral) or max_to_keep <= 0
        ):
            raise ValueError(f"Expected a positive integer or `None` for `max_to_keep`, got {max_to_keep!r}.")
        if keep_checkpoint_every_n_hours is not None and (
            not isinstance(keep_checkpoint_every_n_hours, numbers.Real) or not keep_checkpoint_every_n_hours >= 0
        ):
            raise ValueError(
                "`keep_checkpoint_every_n_hours` must be a non-negative number or `None`, "
                f"got {keep_checkpoint_every_n_hours!r}."
            )
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
        self._max_to_keep = None if max_to_keep is None else int(max_to_keep)
        self._keep_checkpoint_every_n_hours = keep_checkpoint_every_n_hours
        self._directory = _fspath(directory, "directory")
        self._directory_abs = os.path.abspath(self._directory or ".")
        self._checkpoint_prefix = os.path.join(self._directory, checkpoint_name)
        self._step_counter = step_counter
        self._checkpoint_interval = checkpoint_interval
        self._last_checkpoint_step = None
        self._init_fn = init_fn
        self._clock = clock if clock is not None else (lambda: time.time())

        # Guards everything below; bookkeeping runs on the pipeline's background thread.
        self._lock = threading.RLock()
        self._pending: list[_PendingSave] = []  # saves whose bookkeeping has not run yet
        self._latest_io = _CheckpointIo()  # where _latest_checkpoint lives
        self._maybe_delete: collections.OrderedDict[str, float] = collections.OrderedDict()
        # Paths in the state file this manager must not carry forward: the ones it found but did
        # not adopt (preserved or unmanaged), and the ones it preserved or deleted itself.
        self._released: set[str] = set()
        # Checkpoints found in the directory at construction, and whether this run resumed from
        # one: a run that started from scratch does not expire them (see _keep_found_checkpoints).
        self._found_at_start: frozenset[str] = frozenset()
        self._resumed: bool | None = None  # decided at the first save
        self._fell_back = False  # the recorded latest checkpoint was missing at construction
        self._warned_keeping = False

        recovered = get_checkpoint_state(self._directory)
        now = self._clock()
        if recovered is None:
            self._latest_checkpoint = None
            # A second before now, so a manager re-created right away does not preserve on clock ties.
            self._last_preserved_timestamp = now - 1.0
            return
        _refuse_tensorflow_checkpoints(self._directory, recovered)
        # As latest_checkpoint(directory) answers, a missing latest falls back to an older committed
        # one; with none committed the recorded path is kept unchecked (TensorFlow's behaviour).
        self._latest_checkpoint = recovered.model_checkpoint_path
        if recovered.model_checkpoint_path and not _recorded_checkpoint_exists(recovered.model_checkpoint_path):
            fallback = newest_committed(recovered, _recorded_checkpoint_exists)
            self._fell_back = fallback is not None
            self._latest_checkpoint = fallback or self._latest_checkpoint
        self._last_preserved_timestamp = recovered.last_preserved_timestamp
        if math.isnan(self._last_preserved_timestamp):
            # Only a hand-edited file says nan; treat it like a clock reset (keeps everything).
            logger.warning("Ignoring last_preserved_timestamp nan in the state file of %s.", self._directory)
            self._last_preserved_timestamp = now
        elif now < self._last_preserved_timestamp:
            # The clock went backwards; min() below keeps old checkpoints from being deleted by mistake.
            logger.warning(
                "time.time() returned a value %f seconds behind the last preserved checkpoint timestamp.",
                self._last_preserved_timestamp - now,
            )
            self._last_preserved_timestamp = now
        recorded = recovered.all_model_checkpoint_paths
        paths = [self._canonical(path) for path in recorded]
        timestamps = recovered.all_model_checkpoint_timestamps or [self._last_preserved_timestamp] * len(paths)
        for entry, path, timestamp in zip(recorded, paths, timestamps):
            timestamp = min(timestamp, now)
            if timestamp > self._last_preserved_timestamp:
                problem = self._unmanageable(path)
                if problem is not None:
                    logger.warning("Not managing %r from the state file of %s: %s.", entry, self._directory, problem)
                    continue
                # The last of several spellings of one path wins (the file lists oldest first).
                self._maybe_delete.pop(path, None)
                self._maybe_delete[path] = timestamp
        self._released.update(p for p in paths if p not in self._maybe_delete)
        self._found_at_start = frozenset(self._maybe_delete)

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
            return self._latest_checkpoint

    @property
    def checkpoints(self) -> list[str]:
        """The managed checkpoints, oldest first (preserved ones excluded)."""
        self._wait_for_own_saves()
        with self._lock:
            return list(self._maybe_delete)

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
            if self._resumed is None:
                # A counter above 0: restored from a checkpoint, or going on. Explicit numbers: the
                # program numbers its checkpoints itself, and so decides what replaces what.
                self._resumed = int(save_counter) > 0 or checkpoint_number is not None
            save_counter.assign_add(1)
            number = _as_integer(save_counter if checkpoint_number is None else checkpoint_number, "checkpoint_number")
            prefix = f"{self._checkpoint_prefix}-{number}"
            if (self._fell_back and not self._resumed and self._canonical(prefix) in self._found_at_start
                    and _recorded_checkpoint_exists(prefix)):
                save_counter.assign_sub(1)
                raise CheckpointError(
                    f"refusing to overwrite checkpoint {prefix}: it was in {self._directory} before this run, "
                    "whose latest checkpoint was missing, and this run did not resume from it (save_counter "
                    "was 0 at its first save). Restore the latest checkpoint first (restore_or_initialize()), "
                    "save under other numbers "
                    "(checkpoint_number=...), or delete the old checkpoints to start over"
                )
            pending = _PendingSave(prefix, _CheckpointIo.of(options))
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
                if chief:
                    self._record_and_sweep_state(_fspath(save_path, "save path"), pending.io)
                else:
                    self._record_only(_fspath(save_path, "save path"), pending.io)
            finally:
                self._forget(pending)

        return record_and_sweep

    def _record_only(self, save_path: str, io: _CheckpointIo) -> None:
        """A non-chief worker's bookkeeping: the chief's view, in memory, without touching files.

        Of several workers saving together only the chief writes the state file and deletes old
        checkpoints; the others follow along so ``latest_checkpoint`` and ``checkpoints`` answer
        the same on every worker.
        """
        with self._lock:
            save_path = self._canonical(save_path)
            self._maybe_delete.pop(save_path, None)
            self._maybe_delete[save_path] = self._clock()
            self._released.discard(save_path)
            self._latest_checkpoint = save_path
            self._latest_io = io
            expiring, _, last_preserved = self._plan_expiry()
            for path in expiring:
                del self._maybe_delete[path]
                self._released.add(path)
            self._last_preserved_timestamp = last_preserved

    def _forget(self, pending: _PendingSave) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._pending.remove(pending)

    def _record_and_sweep_state(self, save_path: str, io: _CheckpointIo) -> None:
        with self._lock, _state_file_lock(self._directory, None):
            on_disk = None
            with contextlib.suppress(ValueError):  # an empty state file has nothing to keep
                on_disk = _load_state(self._directory, None)
            listed = [] if on_disk is None else [self._canonical(p) for p in on_disk.all_model_checkpoint_paths]
            save_path = self._canonical(save_path)
            unfinished = self._unfinished_deletions(listed, save_path)
            foreign = self._foreign_entries(on_disk, listed, save_path, io)
            self._forget_deleted_elsewhere(listed, save_path, io)
            timestamp = self._clock()
            # An overwritten checkpoint moves to the end of the queue.
            self._maybe_delete.pop(save_path, None)
            self._maybe_delete[save_path] = timestamp
            self._released.discard(save_path)
            self._latest_checkpoint = save_path
            self._latest_io = io
            # Unlike TensorFlow (record, delete, record again), the state file is written once,
            # without the expired checkpoints, and they are deleted after it: the file never names
            # a deleted checkpoint. The pending-deletions file, written first, names them until
            # they are gone, so a crash in between leaves no checkpoint that nothing would delete.
            expiring, doomed, last_preserved = self._plan_expiry()
            doomed += [path for path in unfinished or () if path not in doomed]
            if doomed:
                _write_pending_deletions(self._directory, None, doomed)
            active = [(path, t) for path, t in self._maybe_delete.items() if path not in expiring]
            self._record_state(active, foreign, last_preserved)
            # The file no longer lists them: forget them only now, so a failed write changes nothing.
            for path in expiring:
                del self._maybe_delete[path]
                self._released.add(path)
            self._last_preserved_timestamp = last_preserved
            self._delete(doomed, expiring, io, pending_file=unfinished is not None)

    def _canonical(self, path: str) -> str:
        """One spelling per checkpoint: ``<directory>/<normalised relative path>`` inside it.

        That is how paths read back from a state file this module wrote look, and how this
        manager's own saves are spelled; paths outside the directory are made absolute (as the
        state file stores them).
        """
        path_abs = os.path.abspath(path)
        if _strictly_inside(path_abs, self._directory_abs):
            return os.path.join(self._directory, os.path.relpath(path_abs, self._directory_abs))
        return path_abs

    def _unmanageable(self, path: str) -> str | None:
        """Why a path read from a file in the directory must never be deleted, or ``None``.

        A manager only ever creates ``<directory>/<checkpoint_name>-N``, so it takes over only
        paths inside its directory (and not through a symbolic link), and only ones at
        which a checkpoint can exist: an empty entry names the directory itself, and a name too
        long for the file system could never have been written (deleting it would fail every
        save).
        """
        path_abs = os.path.abspath(path)
        if not _strictly_inside(path_abs, self._directory_abs):
            if path_abs == self._directory_abs:
                return "it names the directory, not a checkpoint"
            return "it is outside the directory"
        parts = os.path.relpath(path_abs, self._directory_abs).split(os.sep)
        try:
            too_long = [part for part in [*parts[:-1], lock_name(parts[-1], "0" * 16)]
                        if len(os.fsencode(part)) > _NAME_MAX]
        except UnicodeError:
            return "it cannot be encoded as a file name"
        if too_long:
            return "its name is too long for a checkpoint"
        parent = os.path.dirname(path_abs)
        if parent != self._directory_abs and os.path.realpath(parent) != os.path.join(
            os.path.realpath(self._directory_abs), os.path.relpath(parent, self._directory_abs)
        ):
            # It may lead out of the directory, or be a second spelling of a checkpoint in it.
            return "its folder is reached through a symbolic link"
        return None

    def _unfinished_deletions(self, listed: list[str], save_path: str) -> list[str] | None:
        """Checkpoints a manager dropped from the state file but did not finish deleting.

        ``None`` when no pending-deletions file exists (the usual case: nothing to do). A path
        the state file lists again, that this manager manages, has just saved or is saving is
        live and stays; so does any path that is not a checkpoint inside the directory.
        """
        recorded = _load_pending_deletions(self._directory, None)
        if recorded is None:
            return None
        keep = {*listed, save_path, *self._maybe_delete, *(self._canonical(p.path) for p in self._pending)}
        unfinished = []
        for path in map(self._canonical, recorded):
            if path in keep or path in unfinished:
                continue
            problem = self._unmanageable(path)
            if problem is not None:
                logger.warning("Not deleting %r named by the pending-deletions file of %s: %s.",
                               path, self._directory, problem)
                continue
            unfinished.append(path)
        return unfinished

    def _foreign_entries(
        self, on_disk: CheckpointState | None, listed: list[str], save_path: str, io: _CheckpointIo
    ) -> list[tuple[str, float]]:
        """Entries another manager recorded in the state file that must survive our rewrite."""
        if on_disk is None:
            return []
        return [
            (path, timestamp)
            for path, timestamp in zip(listed, on_disk.all_model_checkpoint_timestamps)
            if path != save_path
            and path not in self._maybe_delete
            and path not in self._released
            and io.exists(path)
        ]

    def _forget_deleted_elsewhere(self, listed: list[str], save_path: str, io: _CheckpointIo) -> None:
        """Drop managed paths another manager deleted, so the state file never lists them.

        A manager that deletes a checkpoint rewrites the state file without it (under the file
        lock), so only our paths missing from the file need an existence check; in the usual
        one-manager case none is missing and nothing is read.
        """
        if not listed:
            return
        listed_set = set(listed)
        for path in [p for p in self._maybe_delete if p not in listed_set and p != save_path]:
            if not io.exists(path):
                del self._maybe_delete[path]
                self._released.add(path)

    def _record_state(
        self, own: list[tuple[str, float]], foreign: list[tuple[str, float]], last_preserved: float
    ) -> None:
        foreign = [entry for entry in foreign if entry[0] not in self._maybe_delete]
        entries = _merge_by_timestamp(own, foreign) if foreign else own
        # The newest checkpoint of this manager goes last: it is the model checkpoint path.
        entries = [e for e in entries if e[0] != self._latest_checkpoint]
        entries.append((self._latest_checkpoint, self._maybe_delete[self._latest_checkpoint]))
        state = _build_state(
            self._directory,
            self._latest_checkpoint,
            [path for path, _ in entries],
            None,
            [timestamp for _, timestamp in entries],
            last_preserved,
        )
        _write_state(self._directory, None, state)

    def _plan_expiry(self) -> tuple[list[str], list[str], float]:
        """Which of the oldest managed checkpoints beyond ``max_to_keep`` leave the active set.

        Returns ``(expiring, doomed, last_preserved_timestamp)``: the paths leaving the active
        set, those of them to delete (the others are preserved: kept on disk, no longer listed),
        and the preservation clock afterwards. Changes nothing, so a failed write of the state
        file leaves the manager as it was.
        """
        last_preserved = self._last_preserved_timestamp
        if not self._max_to_keep or len(self._maybe_delete) <= self._max_to_keep:
            return [], [], last_preserved  # with no max_to_keep everything stays active, nothing is preserved
        kept = self._keep_found_checkpoints()
        excess = len(self._maybe_delete) - self._max_to_keep
        expiring, doomed = [], []
        # Never the checkpoint just saved, whatever is kept instead of older ones.
        expirable = [(p, t) for p, t in self._maybe_delete.items() if p not in kept and p != self._latest_checkpoint]
        for path, timestamp in expirable[:excess]:
            expiring.append(path)
            if self._keep_checkpoint_every_n_hours and (
                timestamp - self._keep_checkpoint_every_n_hours * 3600.0 >= last_preserved
            ):
                # Kept on disk but no longer listed, so the state file cannot grow forever.
                last_preserved = timestamp
            else:
                doomed.append(path)
        return expiring, doomed, last_preserved

    def _keep_found_checkpoints(self) -> frozenset[str]:
        """Checkpoints found at construction that a run started from scratch must not expire.

        A run whose ``save_counter`` was 0 at its first save (numbered automatically) resumed from nothing; if the directory
        held committed checkpoints, expiring them in favour of this run would delete the last good
        state of the run before it (for example after its newest checkpoint was lost). They stay,
        listed and on disk, until a run resumes from one or they are deleted by hand.
        """
        if self._resumed is not False or not self._fell_back or not self._found_at_start:
            return frozenset()
        kept = frozenset(path for path in self._found_at_start
                         if path in self._maybe_delete and _recorded_checkpoint_exists(path))
        if kept and not self._warned_keeping:
            self._warned_keeping = True
            logger.warning(
                "Not expiring %d checkpoint(s) found in %s (%s): this run did not resume from them "
                "(save_counter was 0 at its first save). Restore one first (restore_or_initialize()), or "
                "delete them to start over.", len(kept), self._directory, ", ".join(sorted(kept)),
            )
        return kept

    def _delete(self, doomed: list[str], expiring: list[str], io: _CheckpointIo, *, pending_file: bool) -> None:
        """Delete ``doomed`` (through ``io``), then the pending-deletions file naming them.

        Every deletion is tried. The first failure among this save's ``expiring`` checkpoints is
        raised once the others ran; a failed retry of an unfinished deletion is only logged. The
        pending-deletions file stays while anything failed, so the next save tries again.
        """
        failed, error = False, None
        for path in doomed:
            try:
                io.delete(path)
            except Exception as exc:
                failed = True
                if path in expiring:
                    error = error or exc
                else:
                    logger.warning("Could not finish deleting checkpoint %s: %s", path, exc)
        if not failed and (doomed or pending_file):
            _remove_pending_deletions(self._directory, None)
        if error is not None:
            raise error

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
                io = self._latest_io
                older = [path for path in reversed(self._maybe_delete) if path != latest]
            restored = self._restore_newest_verified([latest, *older], io)
            if restored is not None:
                if self._checkpoint_interval is not None:
                    with self._lock:
                        self._last_checkpoint_step = _read_step(self._step_counter)
                return restored
        if self._init_fn is not None:
            self._init_fn()
        return None

    def _restore_newest_verified(self, candidates: list[str], io: _CheckpointIo) -> str | None:
        """Restore the first of ``candidates`` (newest first) whose every checksum verifies.

        Each is verified before anything is restored from it, so a corrupt checkpoint leaves no
        variable half-restored; a fallback is logged at WARNING naming the one used, and one that
        fails names why. ``None`` (logged at ERROR) when none verifies.
        """
        read_settings = (io.read_options() or CheckpointOptions()).read_settings or ckio.ReadSettings()
        for path in candidates:
            if not io.exists(path):
                continue
            try:
                ckio.open_reader(path, settings=read_settings).verify()
            except (CorruptCheckpointError, NotFoundError) as error:
                logger.warning("Checkpoint %s failed verification, trying an older one: %s", path, error)
                continue
            self._checkpoint.restore(path, options=io.read_options())
            if path != candidates[0]:
                logger.warning("Restored %s, the newest checkpoint that verified (not %s)", path, candidates[0])
            with self._lock:
                self._latest_checkpoint, self._latest_io = path, io
            return path
        logger.error("No checkpoint in %s passed verification (%s); initializing instead",
                     self._directory, ", ".join(candidates))
        return None


@dataclasses.dataclass(frozen=True)
class _CheckpointIo:
    """Where one save's checkpoint lives: the storage and runtime of its ``write_settings``.

    ``None`` means the pipeline's default (the local file system, the process runtime). The
    manager does every lookup, deletion and wait for a checkpoint through the ``_CheckpointIo``
    of the save that wrote it, so a ``WriteSettings(storage=...)`` elsewhere is managed there.
    """

    storage: Storage | None = None
    runtime: Runtime | None = None

    @classmethod
    def of(cls, options: CheckpointOptions | None) -> _CheckpointIo:
        settings = getattr(options, "write_settings", None)
        if settings is None:
            return cls()
        return cls(settings.storage, settings.runtime)

    def exists(self, prefix: str) -> bool:
        return _recorded_checkpoint_exists(prefix, storage=self.storage, runtime=self.runtime)

    def delete(self, prefix: str) -> None:
        ckio.delete_checkpoint(prefix, storage=self.storage, runtime=self.runtime)

    def wait(self, prefix: str) -> None:
        # Pending writes are registered under the storage's canonical path (not the local one).
        ckio.wait_for_pending_writes(prefix, storage=self.storage)

    def read_options(self) -> CheckpointOptions | None:
        """Options that read from here, or ``None`` for the defaults."""
        if self.storage is None and self.runtime is None:
            return None
        return CheckpointOptions(read_settings=ckio.ReadSettings(storage=self.storage, runtime=self.runtime))


class _PendingSave:
    """One save whose bookkeeping callback has not run; ``started`` once ``write`` returned."""

    __slots__ = ("path", "io", "started")

    def __init__(self, path: str, io: _CheckpointIo):
        self.path = path
        self.io = io
        self.started = False


def _refuse_tensorflow_checkpoints(directory: str, state: CheckpointState) -> None:
    """Raise ``UnsupportedFormatError`` if the state file of ``directory`` lists TensorFlow checkpoints.

    TensorFlow's ``CheckpointManager`` keeps the same state file: adopting its entries would make
    this manager delete TensorFlow checkpoints, drop them from the file and number its own
    checkpoints over theirs. Refusing at construction leaves every file as it is.
    """
    found = _listed_tensorflow_checkpoints(state)
    if found:
        raise UnsupportedFormatError(
            f"{directory} holds TensorFlow checkpoints ({', '.join(map(repr, found))} in its state file "
            "are TensorFlow TensorBundle checkpoints): asyncckpt cannot read or manage them and leaves "
            "them as they are; give the CheckpointManager another directory"
        )


def _strictly_inside(path_abs: str, directory_abs: str) -> bool:
    """Whether normalised absolute ``path_abs`` lies under ``directory_abs`` (and is not it)."""
    try:
        return path_abs != directory_abs and os.path.commonpath([directory_abs, path_abs]) == directory_abs
    except ValueError:  # different drives on Windows
        return False


def _merge_by_timestamp(
    first: list[tuple[str, float]], second: list[tuple[str, float]]
) -> list[tuple[str, float]]:
    """Merge two oldest-first lists by timestamp, keeping each list's own order (stable)."""
    merged, i, j = [], 0, 0
    while i < len(first) and j < len(second):
        if second[j][1] < first[i][1]:
            merged.append(second[j])
            j += 1
        else:
            merged.append(first[i])
            i += 1
    return merged + first[i:] + second[j:]
