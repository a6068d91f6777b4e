"""What one `asyncckpt.CheckpointManager` knows of its directory, kept in agreement with the state file.

`ManagedCheckpoints` holds a manager's *active set* (the checkpoints it manages, oldest first,
with the times they were saved), its latest checkpoint and the preservation clock. It adopts them
from the directory's state file at construction, records each save there, and deletes what the
`asyncckpt.retention.RetentionPolicy` expires. It knows nothing of ``Checkpoint`` objects, step
counters or waiting for saves: the manager owns those, and serialises every call under its lock
(the bookkeeping of an asynchronous save runs on the background thread).

Across processes
----------------
We use a **lock file**, not compare-and-swap: every read-modify-write of the state file holds an
exclusive ``fcntl.flock`` on ``<directory>/.<latest_filename>.lock`` (see `asyncckpt.state_file`).
While holding it a manager re-reads the state file and then

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
name fits the file system; other entries are logged at WARNING and never deleted. A directory
whose state file lists TensorFlow checkpoints is refused. Paths are compared and recorded
normalised (``ckpt-2`` and ``./ckpt-2`` are one checkpoint). A manager created while another is
saving may delete that one's older checkpoints; build concurrent managers before they save, and
give them different ``checkpoint_name`` values (managers sharing a name number their files
independently and overwrite each other's). Plain `asyncckpt.state_file.update_checkpoint_state`
(used by `asyncckpt.Checkpoint.save`) takes the same lock but only writes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
from typing import Any, Callable, Collection, Iterable

from asyncckpt import io as ckio
from asyncckpt._runtime import Runtime
from asyncckpt.errors import UnsupportedFormatError
from asyncckpt.naming import lock_name
from asyncckpt import _paths
from asyncckpt.io.storage import Storage
from asyncckpt.retention import Expiry, RetentionPolicy
from asyncckpt.state_file import (
    CheckpointState,
    _build_state,
    _listed_tensorflow_checkpoints,
    _load_pending_deletions,
    _load_state,
    _recorded_checkpoint_exists,
    _remove_pending_deletions,
    _state_file_lock,
    _write_pending_deletions,
    _write_state,
    get_checkpoint_state,
    newest_committed,
)

__all__ = ["CheckpointIo", "ManagedCheckpoints"]

logger = logging.getLogger("asyncckpt")

#: The longest file name (in bytes) the file systems we write to accept.
_NAME_MAX = 255


@dataclasses.dataclass(frozen=True)
class CheckpointIo:
    """Where one save's checkpoint lives: the storage and runtime of its ``write_settings``.

    ``None`` means the pipeline's default (the local file system, the process runtime). The
    manager does every lookup, deletion and wait for a checkpoint through the ``CheckpointIo``
    of the save that wrote it, so a ``WriteSettings(storage=...)`` elsewhere is managed there.
    """

    storage: Storage | None = None
    runtime: Runtime | None = None

    @classmethod
    def of(cls, options: Any) -> CheckpointIo:
        """Where a save with ``options`` (an `asyncckpt.CheckpointOptions` or ``None``) writes."""
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

    def read_settings(self) -> ckio.ReadSettings | None:
        """Settings that read from here, or ``None`` for the defaults."""
        if self.storage is None and self.runtime is None:
            return None
        return ckio.ReadSettings(storage=self.storage, runtime=self.runtime)


class ManagedCheckpoints:
    """One manager's active set in ``directory``, adopted from its state file and recorded there.

    Not thread-safe: the manager calls it under its own lock.

    Parameters
    ----------
    directory : str
        The manager's directory, as given (paths inside it are spelled ``<directory>/...``).
    retention : RetentionPolicy
        Decides what expires after each save.
    clock : callable
        Seconds since the epoch; every save is timestamped with it.

    Attributes
    ----------
    latest : str or None
        The newest checkpoint: the last one recorded, restored, or found at construction.
    latest_io : CheckpointIo
        Where ``latest`` lives.
    resumed : bool or None
        Whether this run resumed from a checkpoint, set by the manager at its first save. A run
        that did not, in a directory whose latest checkpoint was missing, expires and overwrites
        none of the checkpoints found at construction.

    Raises
    ------
    UnsupportedFormatError
        If the state file of ``directory`` lists TensorFlow checkpoints.
    """

    def __init__(self, directory: str, retention: RetentionPolicy, clock: Callable[[], float]):
        self._directory = directory
        self._directory_abs = _paths.absolute(directory or ".")
        self._retention = retention
        self._clock = clock
        self.latest_io = CheckpointIo()
        self.resumed: bool | None = None
        self._active: collections.OrderedDict[str, float] = collections.OrderedDict()
        # Paths in the state file this manager must not carry forward: the ones it found but did
        # not adopt (preserved or unmanaged), and the ones it preserved or deleted itself.
        self._released: set[str] = set()
        # Checkpoints found in the directory at construction, and whether the recorded latest
        # one was missing then (see _keep_found_checkpoints).
        self._found_at_start: frozenset[str] = frozenset()
        self._fell_back = False
        self._warned_keeping = False
        self._adopt(get_checkpoint_state(directory), self._clock())

    def _adopt(self, recovered: CheckpointState | None, now: float) -> None:
        """Take over the latest checkpoint, the preservation clock and the managed entries."""
        if recovered is None:
            self.latest = None
            # A second before now, so a manager re-created right away does not preserve on clock ties.
            self._last_preserved = now - 1.0
            return
        _refuse_tensorflow_checkpoints(self._directory, recovered)
        # As latest_checkpoint(directory) answers, a missing latest falls back to an older committed
        # one; with none committed the recorded path is kept unchecked (TensorFlow's behaviour).
        self.latest = recovered.model_checkpoint_path
        if recovered.model_checkpoint_path and not _recorded_checkpoint_exists(recovered.model_checkpoint_path):
            fallback = newest_committed(recovered, _recorded_checkpoint_exists)
            self._fell_back = fallback is not None
            self.latest = fallback or self.latest
        self._last_preserved = recovered.last_preserved_timestamp
        if math.isnan(self._last_preserved):
            # Only a hand-edited file says nan; treat it like a clock reset (keeps everything).
            logger.warning("Ignoring last_preserved_timestamp nan in the state file of %s.", self._directory)
            self._last_preserved = now
        elif now < self._last_preserved:
            # The clock went backwards; min() below keeps old checkpoints from being deleted by mistake.
            logger.warning(
                "time.time() returned a value %f seconds behind the last preserved checkpoint timestamp.",
                self._last_preserved - now,
            )
            self._last_preserved = now
        recorded = recovered.all_model_checkpoint_paths
        paths = [self.canonical(path) for path in recorded]
        timestamps = recovered.all_model_checkpoint_timestamps or [self._last_preserved] * len(paths)
        for entry, path, timestamp in zip(recorded, paths, timestamps):
            timestamp = min(timestamp, now)
            if timestamp > self._last_preserved:
                problem = self._unmanageable(path)
                if problem is not None:
                    logger.warning("Not managing %r from the state file of %s: %s.", entry, self._directory, problem)
                    continue
                # The last of several spellings of one path wins (the file lists oldest first).
                self._active.pop(path, None)
                self._active[path] = timestamp
        self._released.update(p for p in paths if p not in self._active)
        self._found_at_start = frozenset(self._active)

    # -- questions ----------------------------------------------------------------------------

    def paths(self) -> list[str]:
        """The active set, oldest first."""
        return list(self._active)

    def would_overwrite_found(self, prefix: str) -> bool:
        """Whether saving at ``prefix`` would overwrite a committed checkpoint this run must keep.

        That is one found at construction, when the recorded latest checkpoint was missing and
        this run did not resume (see ``resumed``).
        """
        return (self._fell_back and not self.resumed and self.canonical(prefix) in self._found_at_start
                and _recorded_checkpoint_exists(prefix))

    def canonical(self, path: str) -> str:
        """One spelling per checkpoint: ``<directory>/<normalised relative path>`` inside it.

        That is how paths read back from a state file this module wrote look, and how this
        manager's own saves are spelled; paths outside the directory are made absolute (as the
        state file stores them).
        """
        path_abs = _paths.absolute(path)
        if _paths.inside(path_abs, self._directory_abs):
            return _paths.join(self._directory, _paths.relative(path_abs, self._directory_abs))
        return path_abs

    def _unmanageable(self, path: str) -> str | None:
        """Why a path read from a file in the directory must never be deleted, or ``None``.

        A manager only ever creates ``<directory>/<checkpoint_name>-N``, so it takes over only
        paths inside its directory (and not through a symbolic link), and only ones at
        which a checkpoint can exist: an empty entry names the directory itself, and a name too
        long for the file system could never have been written (deleting it would fail every
        save).
        """
        path_abs = _paths.absolute(path)
        if not _paths.inside(path_abs, self._directory_abs):
            if path_abs == self._directory_abs:
                return "it names the directory, not a checkpoint"
            return "it is outside the directory"
        if _paths.is_url(path_abs):
            return None  # a key in a bucket: no file-name limits, no links
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

    # -- recording saves ----------------------------------------------------------------------

    def set_latest(self, path: str, io: CheckpointIo) -> None:
        """``path`` (restored from ``io``) is the latest checkpoint now."""
        self.latest, self.latest_io = path, io

    def follow(self, save_path: str, io: CheckpointIo) -> None:
        """A non-chief worker's bookkeeping: the chief's view, in memory, without touching files.

        Of several workers saving together only the chief writes the state file and deletes old
        checkpoints; the others follow along so ``latest_checkpoint`` and ``checkpoints`` answer
        the same on every worker.
        """
        self._add(self.canonical(save_path), io)
        self._drop_expired(self._plan_expiry())

    def record(self, save_path: str, io: CheckpointIo, *, in_flight: Iterable[str]) -> None:
        """Record the committed ``save_path`` in the state file and delete what expires.

        ``in_flight`` names the saves of this manager that have not committed yet: a
        pending-deletions file naming one of them is not followed. Raises the first failed
        deletion of a checkpoint this save expired, once the state file is written.
        """
        with _state_file_lock(self._directory, None):
            on_disk = None
            with contextlib.suppress(ValueError):  # an empty state file has nothing to keep
                on_disk = _load_state(self._directory, None)
            listed = [] if on_disk is None else [self.canonical(p) for p in on_disk.all_model_checkpoint_paths]
            save_path = self.canonical(save_path)
            unfinished = self._unfinished_deletions(listed, save_path, in_flight)
            foreign = self._foreign_entries(on_disk, listed, save_path, io)
            self._forget_deleted_elsewhere(listed, save_path, io)
            self._add(save_path, io)
            # Unlike TensorFlow (record, delete, record again), the state file is written once,
            # without the expired checkpoints, and they are deleted after it: the file never names
            # a deleted checkpoint. The pending-deletions file, written first, names them until
            # they are gone, so a crash in between leaves no checkpoint that nothing would delete.
            expiry = self._plan_expiry()
            doomed = [*expiry.doomed, *(path for path in unfinished or () if path not in expiry.doomed)]
            if doomed:
                _write_pending_deletions(self._directory, None, doomed)
            active = [(path, t) for path, t in self._active.items() if path not in expiry.expiring]
            self._record_state(active, foreign, expiry.last_preserved)
            # The file no longer lists them: forget them only now, so a failed write changes nothing.
            self._drop_expired(expiry)
            self._delete(doomed, expiry.expiring, io, pending_file=unfinished is not None)

    def _add(self, save_path: str, io: CheckpointIo) -> None:
        # An overwritten checkpoint moves to the end of the queue.
        self._active.pop(save_path, None)
        self._active[save_path] = self._clock()
        self._released.discard(save_path)
        self.latest, self.latest_io = save_path, io

    def _drop_expired(self, expiry: Expiry) -> None:
        for path in expiry.expiring:
            del self._active[path]
            self._released.add(path)
        self._last_preserved = expiry.last_preserved

    def _unfinished_deletions(self, listed: list[str], save_path: str, in_flight: Iterable[str]) -> list[str] | None:
        """Checkpoints a manager dropped from the state file but did not finish deleting.

        ``None`` when no pending-deletions file exists (the usual case: nothing to do). A path
        the state file lists again, that this manager manages, has just saved or is saving is
        live and stays; so does any path that is not a checkpoint inside the directory.
        """
        recorded = _load_pending_deletions(self._directory, None)
        if recorded is None:
            return None
        keep = {*listed, save_path, *self._active, *map(self.canonical, in_flight)}
        unfinished = []
        for path in map(self.canonical, recorded):
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
        self, on_disk: CheckpointState | None, listed: list[str], save_path: str, io: CheckpointIo
    ) -> list[tuple[str, float]]:
        """Entries another manager recorded in the state file that must survive our rewrite."""
        if on_disk is None:
            return []
        return [
            (path, timestamp)
            for path, timestamp in zip(listed, on_disk.all_model_checkpoint_timestamps)
            if path != save_path
            and path not in self._active
            and path not in self._released
            and io.exists(path)
        ]

    def _forget_deleted_elsewhere(self, listed: list[str], save_path: str, io: CheckpointIo) -> None:
        """Drop managed paths another manager deleted, so the state file never lists them.

        A manager that deletes a checkpoint rewrites the state file without it (under the file
        lock), so only our paths missing from the file need an existence check; in the usual
        one-manager case none is missing and nothing is read.
        """
        if not listed:
            return
        listed_set = set(listed)
        for path in [p for p in self._active if p not in listed_set and p != save_path]:
            if not io.exists(path):
                del self._active[path]
                self._released.add(path)

    def _record_state(
        self, own: list[tuple[str, float]], foreign: list[tuple[str, float]], last_preserved: float
    ) -> None:
        foreign = [entry for entry in foreign if entry[0] not in self._active]
        entries = _merge_by_timestamp(own, foreign) if foreign else own
        # The newest checkpoint of this manager goes last: it is the model checkpoint path.
        entries = [e for e in entries if e[0] != self.latest]
        entries.append((self.latest, self._active[self.latest]))
        state = _build_state(
            self._directory,
            self.latest,
            [path for path, _ in entries],
            None,
            [timestamp for _, timestamp in entries],
            last_preserved,
        )
        _write_state(self._directory, None, state)

    # -- expiring -----------------------------------------------------------------------------

    def _plan_expiry(self) -> Expiry:
        """Which managed checkpoints leave the active set after a save (`RetentionPolicy.expire`).

        Never the checkpoint just saved, nor those `_keep_found_checkpoints` keeps. Changes
        nothing, so a failed write of the state file leaves the manager as it was.
        """
        # Computed only when something expires: it looks the found checkpoints up and may warn.
        protected = ({*self._keep_found_checkpoints(), self.latest}
                     if self._retention.over_limit(len(self._active)) else ())
        return self._retention.expire(self._active, self._last_preserved, protected=protected)

    def _keep_found_checkpoints(self) -> frozenset[str]:
        """Checkpoints found at construction that a run started from scratch must not expire.

        A run whose ``save_counter`` was 0 at its first save (numbered automatically) resumed
        from nothing; if the directory held committed checkpoints, expiring them in favour of
        this run would delete the last good state of the run before it (for example after its
        newest checkpoint was lost). They stay, listed and on disk, until a run resumes from one
        or they are deleted by hand.
        """
        if self.resumed is not False or not self._fell_back or not self._found_at_start:
            return frozenset()
        kept = frozenset(path for path in self._found_at_start
                         if path in self._active and _recorded_checkpoint_exists(path))
        if kept and not self._warned_keeping:
            self._warned_keeping = True
            logger.warning(
                "Not expiring %d checkpoint(s) found in %s (%s): this run did not resume from them "
                "(save_counter was 0 at its first save). Restore one first (restore_or_initialize()), or "
                "delete them to start over.", len(kept), self._directory, ", ".join(sorted(kept)),
            )
        return kept

    def _delete(self, doomed: list[str], expiring: Collection[str], io: CheckpointIo, *, pending_file: bool) -> None:
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
