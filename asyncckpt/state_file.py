"""The ``checkpoint`` state file: reading it, writing it atomically under a lock (codec: ``_state_text``).

Every checkpoint directory may hold a small text file (``checkpoint`` unless ``latest_filename``
says otherwise) naming its most recent checkpoint. It is the text format of TensorFlow's
``CheckpointState`` protocol buffer, written byte for byte as TensorFlow writes it, so TensorFlow
reads ours and we read TensorFlow's::

    model_checkpoint_path: "ckpt-10"
    all_model_checkpoint_paths: "ckpt-9"
    all_model_checkpoint_paths: "ckpt-10"
    all_model_checkpoint_timestamps: 1700000000.25
    all_model_checkpoint_timestamps: 1700000600.5
    last_preserved_timestamp: 1699999999.0

The file is untrusted input: it is parsed by hand with a strict grammar for exactly these four
fields (no protobuf dependency, nothing evaluated), files over `MAX_STATE_FILE_BYTES` are refused,
and anything malformed makes `get_checkpoint_state` log a WARNING and return ``None`` (TensorFlow's
behaviour, tensorflow/tensorflow#35148, made loud). Paths inside the directory are stored relative
to it and joined with it on read; other paths are stored absolute. Updates are atomic: a temporary
file in the same directory (``.<latest_filename>.tmp``, a fixed name: writers hold the lock below,
and one left by a crash is replaced by the next update) is written, fsynced and renamed over the
old one, then the directory is fsynced, so a reader sees the old state or the new one, never a
mixture. The file is created with mode ``0o666`` less the umask, like any new file.

`asyncckpt.CheckpointManager` also keeps, only while it deletes expired checkpoints, a
*pending-deletions file* ``.<latest_filename>.deleting`` in the same text format, naming the
checkpoints it has dropped from the state file and is about to delete (see
`_write_pending_deletions`).

The state file of a local directory is a local file, read and written with plain ``os`` calls,
even when the checkpoints it names live on another storage (``WriteSettings(storage=...)``):
atomic rename and ``flock`` need a file system. The state file of an ``s3://`` directory is an
object in the bucket (`asyncckpt.state_object`: one atomic write per update, a lease object for
the lock). The lookups that check a named checkpoint exists
(`latest_checkpoint`, `checkpoint_exists`) and the waits for pending writes use the pipeline's
default storage, the local file system; `asyncckpt.CheckpointManager` passes its saves' storage.

This module sits just above the I/O side (`asyncckpt.io`) so that both `asyncckpt.checkpoint`
(which records every ``save``) and `asyncckpt.checkpoint_management` (whose manager keeps the
file) can use it; it knows nothing of trackables or managers. The text codec itself is pure and
lives in `asyncckpt._state_text`.

Concurrency
-----------
*Within a process* the public readers (`latest_checkpoint`, `get_checkpoint_state`,
`checkpoint_exists`) first wait for this process's pending writes under the directory, so a
process always reads its own writes; `update_checkpoint_state` does not wait, so a write callback
may call it.

*Across processes* every write of the state file holds an exclusive ``fcntl.flock`` on the lock
file ``<directory>/.<latest_filename>.lock``; `asyncckpt.CheckpointManager` holds the same lock
around its whole read-modify-write. The lock file is created once and never removed (removing it
would let two processes lock different files). ``flock`` is advisory and POSIX-only; it works on
local file systems and NFSv4, and is skipped on platforms without ``fcntl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, Sequence

from asyncckpt import _paths, state_object
from asyncckpt import io as ckio
from asyncckpt._runtime import Runtime
from asyncckpt._state_text import (
    CheckpointState,
    CheckpointStateParseError,
    format_checkpoint_state,
    parse_checkpoint_state,
)
from asyncckpt.format import is_tensorflow_index
from asyncckpt.naming import index_path
from asyncckpt.io.storage import NotRegularFileError, Storage, StorageError
from asyncckpt.io.storage.base import as_storage_error, from_os_error
from asyncckpt.io.storage.file import open_regular_file

try:  # POSIX only; see the module docstring.
    import fcntl
except ImportError:  # pragma: no cover - exercised only on Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MAX_STATE_FILE_BYTES",
    "CheckpointState",
    "CheckpointStateParseError",
    "parse_checkpoint_state",
    "format_checkpoint_state",
    "get_checkpoint_state",
    "update_checkpoint_state",
    "latest_checkpoint",
    "checkpoint_exists",
]

logger = logging.getLogger("asyncckpt")

#: State files larger than this are refused as unparseable. A state entry takes about 90 bytes,
#: so this still holds ~180,000 managed checkpoints (``max_to_keep=None`` keeps every path).
MAX_STATE_FILE_BYTES = 16 * 1024 * 1024

_DEFAULT_STATE_FILENAME = "checkpoint"


# ---------------------------------------------------------------------------------------------
# Reading and writing the file
# ---------------------------------------------------------------------------------------------


def _state_filename(directory: str, latest_filename: str | None) -> str:
    return _paths.join(directory, latest_filename or _DEFAULT_STATE_FILENAME)


def _fspath(path: Any, what: str) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"{what} must be a str or os.PathLike, got {type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path


def _read_state_text(filename: str) -> str | None:
    """The file's text, or ``None`` when it does not exist; ``OSError``/parse error otherwise.

    Anything but a regular file (a FIFO would block the read for ever) raises
    ``NotRegularFileError``, an ``OSError``: the file is then unreadable, like a malformed one.
    """
    if _paths.is_url(filename):
        return _decoded(state_object.read_bytes(filename, MAX_STATE_FILE_BYTES))
    try:
        fd = open_regular_file(filename, os.O_RDONLY, follow_links=True)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if os.fstat(handle.fileno()).st_size > MAX_STATE_FILE_BYTES:
            raise CheckpointStateParseError(f"larger than {MAX_STATE_FILE_BYTES} bytes")
        data = handle.read(MAX_STATE_FILE_BYTES + 1)
    return _decoded(data)


def _decoded(data: bytes | None) -> str | None:
    if data is None:
        return None
    if len(data) > MAX_STATE_FILE_BYTES:  # (or grew while we read it)
        raise CheckpointStateParseError(f"larger than {MAX_STATE_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointStateParseError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _read_state(filename: str) -> CheckpointState | None:
    """Read and parse a state-format file; ``None`` when it does not exist.

    Raises ``OSError`` or ``CheckpointStateParseError``; each caller decides how to report them.
    """
    text = _read_state_text(filename)
    return None if text is None else parse_checkpoint_state(text)


def _join_with_directory(state: CheckpointState, directory: str) -> CheckpointState:
    def join(path: str) -> str:
        return path if os.path.isabs(path) or _paths.is_url(path) else _paths.join(directory, path)

    return dataclasses.replace(
        state,
        model_checkpoint_path=join(state.model_checkpoint_path),
        all_model_checkpoint_paths=[join(p) for p in state.all_model_checkpoint_paths],
        all_model_checkpoint_timestamps=list(state.all_model_checkpoint_timestamps),
    )


def _load_state(directory: str, latest_filename: str | None) -> CheckpointState | None:
    """`get_checkpoint_state` without waiting for pending writes (safe inside write callbacks)."""
    filename = _state_filename(directory, latest_filename)
    try:
        state = _read_state(filename)
    except (OSError, CheckpointStateParseError) as exc:
        logger.warning("%s: %s", type(exc).__name__, exc)
        logger.warning("%s: Checkpoint ignored", filename)
        return None
    if state is None:
        return None
    if not state.model_checkpoint_path:
        raise ValueError("Invalid checkpoint state loaded from " + directory)
    return _join_with_directory(state, directory)


def get_checkpoint_state(checkpoint_dir, latest_filename: str | None = None) -> CheckpointState | None:
    """Read the state file of a checkpoint directory.

    Waits first for this process's pending asynchronous writes under ``checkpoint_dir``, so a
    save that already returned is always visible.

    Parameters
    ----------
    checkpoint_dir : str or os.PathLike
        The directory holding the state file.
    latest_filename : str, optional
        Name of the state file; ``"checkpoint"`` by default.

    Returns
    -------
    CheckpointState or None
        The state with relative paths joined with ``checkpoint_dir`` (``"./ckpt-5"`` becomes
        ``os.path.join(checkpoint_dir, "./ckpt-5")``); ``None`` when the file is missing,
        unreadable or malformed -- the last two logged at WARNING on the ``asyncckpt`` logger.

    Raises
    ------
    ValueError
        If the file parses but names no ``model_checkpoint_path`` (e.g. it is empty).
    """
    directory = _fspath(checkpoint_dir, "checkpoint_dir")
    ckio.wait_for_pending_writes(directory)
    return _load_state(directory, latest_filename)


def _storable_path(path: str, directory_abs: str) -> str:
    """Relative to the directory when inside it, absolute otherwise."""
    path_abs = _paths.absolute(path)
    return _paths.relative(path_abs, directory_abs) if _paths.inside(path_abs, directory_abs) else path_abs


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _temporary_name(filename: str) -> str:
    """The fixed temporary a file of ours is written to before its rename: ``.<name>.tmp``."""
    directory, name = os.path.split(filename)
    return os.path.join(directory, f".{name}.tmp")


def _atomic_write_text(filename: str, text: str) -> None:
    """`_replace_text`, with an ``OSError`` (a full disk) raised as a ``StorageError`` naming ``filename``.

    The errno is kept and the original error chained.
    """
    if _paths.is_url(filename):
        state_object.write_bytes(filename, text.encode("utf-8"))
        return
    try:
        _replace_text(filename, text)
    except StorageError:
        raise
    except OSError as exc:
        raise from_os_error(exc, f"writing {filename}") from exc


def _replace_text(filename: str, text: str) -> None:
    """Write, fsync and rename over ``filename``, then fsync the directory.

    The caller holds `_state_file_lock`, so the temporary can have a fixed name (see
    `_temporary_name`): one left by a crash before its rename is replaced by the next write
    instead of staying for ever. It is removed and created afresh (``O_EXCL``, mode ``0o666``
    less the umask), so the file gets the permissions of any new file -- readable by whoever
    may read the checkpoints -- and a leftover that is a symbolic link is never followed.
    """
    directory = os.path.dirname(filename) or "."
    temp = _temporary_name(filename)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(temp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, filename)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(directory)


@contextlib.contextmanager
def _state_file_lock(directory: str, latest_filename: str | None) -> Iterator[None]:
    """Hold the cross-process lock guarding read-modify-write of one state file."""
    name = f".{latest_filename or _DEFAULT_STATE_FILENAME}.lock"
    if _paths.is_url(directory):
        with state_object.lease_lock(_paths.join(directory, name)):
            yield
        return
    if fcntl is None:  # pragma: no cover - see the module docstring
        yield
        return
    fd = _open_lock_file(os.path.join(directory or ".", name))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _open_lock_file(path: str) -> int:
    """Open (creating) the lock file; a planted link, FIFO or directory there is refused.

    ``O_NOFOLLOW``: a symbolic link at the lock's name would otherwise make the next save create
    or open a file wherever it points.
    """
    try:
        return open_regular_file(path, os.O_RDWR | os.O_CREAT)
    except NotRegularFileError as exc:
        raise as_storage_error(exc, "refusing to use it as the state-file lock. Remove it: the next update "
                               "creates it afresh") from None


def _build_state(
    save_dir: str,
    model_checkpoint_path: str,
    all_model_checkpoint_paths: Sequence[str] | None,
    latest_filename: str | None,
    all_model_checkpoint_timestamps: Sequence[float] | None,
    last_preserved_timestamp: float | None,
) -> CheckpointState:
    model_path = _fspath(model_checkpoint_path, "model_checkpoint_path")
    if not model_path:
        raise ValueError("model_checkpoint_path must be a non-empty checkpoint prefix")
    paths = [_fspath(p, "all_model_checkpoint_paths entry") for p in (all_model_checkpoint_paths or [])]
    if not paths or paths[-1] != model_path:
        paths.append(model_path)
    timestamps = [float(t) for t in (all_model_checkpoint_timestamps or [])]
    if timestamps and len(timestamps) != len(paths):
        raise ValueError(
            "Checkpoint timestamps, if provided, must match checkpoint paths "
            f"(got paths {paths} and timestamps {timestamps})"
        )
    directory_abs = _paths.absolute(save_dir or ".")
    if _paths.absolute(model_path) == _paths.absolute(_state_filename(save_dir, latest_filename)):
        raise RuntimeError(
            f"Save path '{model_path}' conflicts with path used for checkpoint state.  "
            "Please use a different save path."
        )
    return CheckpointState(
        model_checkpoint_path=_storable_path(model_path, directory_abs),
        all_model_checkpoint_paths=[_storable_path(p, directory_abs) for p in paths],
        all_model_checkpoint_timestamps=timestamps,
        last_preserved_timestamp=float(last_preserved_timestamp or 0.0),
    )


def _write_state(save_dir: str, latest_filename: str | None, state: CheckpointState) -> None:
    """Replace the state file; the caller holds `_state_file_lock`."""
    if save_dir and not _paths.is_url(save_dir):
        os.makedirs(save_dir, exist_ok=True)
    _atomic_write_text(_state_filename(save_dir, latest_filename), format_checkpoint_state(state))


# ---------------------------------------------------------------------------------------------
# The pending-deletions file
# ---------------------------------------------------------------------------------------------


def _pending_deletions_filename(directory: str, latest_filename: str | None) -> str:
    return _paths.join(directory, f".{latest_filename or _DEFAULT_STATE_FILENAME}.deleting")


def _write_pending_deletions(directory: str, latest_filename: str | None, paths: Sequence[str]) -> None:
    """Record, before the state file stops listing them, the checkpoints about to be deleted.

    `asyncckpt.CheckpointManager` drops expired checkpoints from the state file first and
    deletes them after, so the file never names a deleted checkpoint; a crash in between would
    leave complete checkpoints that nothing lists and so nothing would ever delete. This file
    (``.<latest_filename>.deleting``, in the state file's text format: the paths are
    ``all_model_checkpoint_paths``, stored like the state file's) names them until they are
    gone, and the next manager to update the state file finishes the job. The caller holds
    `_state_file_lock`; the write is atomic like the state file's.
    """
    if not paths:
        raise ValueError("no checkpoint to record for deletion")
    directory_abs = _paths.absolute(directory or ".")
    stored = [_storable_path(path, directory_abs) for path in paths]
    text = format_checkpoint_state(CheckpointState(stored[-1], stored))
    _atomic_write_text(_pending_deletions_filename(directory, latest_filename), text)


def _load_pending_deletions(directory: str, latest_filename: str | None) -> list[str] | None:
    """The paths `_write_pending_deletions` recorded, joined with ``directory``.

    ``None`` when there is no such file; ``[]`` (and a WARNING) when it cannot be read or
    parsed -- it is untrusted input like the state file, and the caller must still check every
    path before deleting anything.
    """
    filename = _pending_deletions_filename(directory, latest_filename)
    try:
        state = _read_state(filename)
    except (OSError, CheckpointStateParseError) as exc:
        logger.warning("%s: %s; %s ignored", type(exc).__name__, exc, filename)
        return []
    if state is None:
        return None
    return _join_with_directory(state, directory).all_model_checkpoint_paths


def _remove_pending_deletions(directory: str, latest_filename: str | None) -> None:
    """Remove the pending-deletions file once every checkpoint it names is gone."""
    filename = _pending_deletions_filename(directory, latest_filename)
    if _paths.is_url(filename):
        state_object.delete(filename)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(filename)


def update_checkpoint_state(
    save_dir,
    model_checkpoint_path,
    all_model_checkpoint_paths: Sequence[str] | None = None,
    latest_filename: str | None = None,
    all_model_checkpoint_timestamps: Sequence[float] | None = None,
    last_preserved_timestamp: float | None = None,
) -> None:
    """Atomically replace the state file of ``save_dir``.

    `asyncckpt.Checkpoint.save` calls this with only the newest path, after the checkpoint is
    durable. Paths are ordinary paths (absolute, or relative to the working directory); those
    inside ``save_dir`` are stored relative to it. It does not wait for pending writes, so it is
    safe to call from a write callback.

    Parameters
    ----------
    save_dir : str or os.PathLike
        Directory of the state file.
    model_checkpoint_path : str or os.PathLike
        Prefix of the newest checkpoint.
    all_model_checkpoint_paths : sequence of str, optional
        All tracked prefixes, oldest first; ``model_checkpoint_path`` is appended when it is not
        already last.
    latest_filename : str, optional
        Name of the state file; ``"checkpoint"`` by default.
    all_model_checkpoint_timestamps : sequence of float, optional
        One timestamp per path in ``all_model_checkpoint_paths``.
    last_preserved_timestamp : float, optional
        See `CheckpointState`.

    Raises
    ------
    RuntimeError
        If ``model_checkpoint_path`` is the state file itself.
    ValueError
        If the timestamps do not match the paths one to one, or the model path is empty.
    """
    save_dir = _fspath(save_dir, "save_dir")
    state = _build_state(
        save_dir,
        model_checkpoint_path,
        all_model_checkpoint_paths,
        latest_filename,
        all_model_checkpoint_timestamps,
        last_preserved_timestamp,
    )
    if save_dir and not _paths.is_url(save_dir):
        os.makedirs(save_dir, exist_ok=True)
    with _state_file_lock(save_dir, latest_filename):
        _write_state(save_dir, latest_filename, state)


def checkpoint_exists(checkpoint_prefix) -> bool:
    """True when a committed checkpoint exists at ``checkpoint_prefix`` (its ``.index`` marker).

    Waits first for this process's pending writes to that prefix.
    """
    prefix = _fspath(checkpoint_prefix, "checkpoint_prefix")
    ckio.wait_for_pending_writes(prefix)
    return bool(ckio.checkpoint_exists(prefix))


def latest_checkpoint(checkpoint_dir, latest_filename: str | None = None) -> str | None:
    """The prefix of the newest checkpoint recorded in ``checkpoint_dir``, if it exists.

    Parameters
    ----------
    checkpoint_dir : str or os.PathLike
        Directory holding the state file.
    latest_filename : str, optional
        Name of the state file; ``"checkpoint"`` by default.

    Returns
    -------
    str or None
        The joined ``model_checkpoint_path``; if that checkpoint is gone, the newest older one the
        state file lists that is committed (WARNING); ``None`` when there is no (readable) state
        file or none of the checkpoints it lists exists (logged at ERROR).

    Raises
    ------
    ValueError
        If the state file parses but names no checkpoint (see `get_checkpoint_state`).
    """
    state = get_checkpoint_state(checkpoint_dir, latest_filename)
    if state is None or not state.model_checkpoint_path:
        return None
    return newest_committed(state, _recorded_checkpoint_exists)


def newest_committed(state: CheckpointState, exists: Callable[[str], bool]) -> str | None:
    """The newest checkpoint ``state`` records that ``exists``: the latest, else older ones.

    A latest checkpoint that is gone (its ``P.index`` deleted, a disk that lost it) must not make a
    run start from scratch while older committed checkpoints are listed: this falls back to the
    newest of those, with a WARNING naming both. ``None`` (logged at ERROR) when none exists.
    """
    candidates = [state.model_checkpoint_path]
    candidates += [path for path in reversed(state.all_model_checkpoint_paths) if path not in candidates]
    for path in candidates:
        if exists(path):
            if path != state.model_checkpoint_path:
                logger.warning(
                    "The latest checkpoint %s recorded in the state file is missing; falling back to %s, the "
                    "newest recorded checkpoint that is committed", state.model_checkpoint_path, path,
                )
            return path
    logger.error("Couldn't match files for checkpoint %s", state.model_checkpoint_path)
    return None


def _recorded_checkpoint_exists(prefix: str, *, storage: Storage | None = None, runtime: Runtime | None = None) -> bool:
    """`ckio.checkpoint_exists` for a path read from a state file, which may be anything.

    A path the file system cannot even look up (a name too long, say) names no checkpoint.
    ``storage`` and ``runtime`` say where checkpoints live (the pipeline's defaults when ``None``).
    """
    try:
        return bool(ckio.checkpoint_exists(prefix, storage=storage, runtime=runtime))
    except OSError as exc:
        logger.warning("cannot look up checkpoint %r recorded in the state file: %s", prefix, exc)
        return False


# ---------------------------------------------------------------------------------------------
# TensorFlow's checkpoints in the same file
# ---------------------------------------------------------------------------------------------

#: The bytes at the end of a TensorFlow index that identify it (its table footer).
_TENSORFLOW_FOOTER_BYTES = 48


def _listed_tensorflow_checkpoints(state: CheckpointState) -> list[str]:
    """The checkpoints ``state`` lists that are TensorFlow's (their local ``P.index`` says so).

    TensorFlow keeps the same state file; its entries must be neither adopted nor dropped.
    """
    paths = dict.fromkeys([*state.all_model_checkpoint_paths, state.model_checkpoint_path])
    return [path for path in paths if path and _is_tensorflow_checkpoint(path)]


def _is_tensorflow_checkpoint(prefix: str) -> bool:
    """Whether ``prefix.index`` on the local file system is a TensorFlow index (by its footer's magic)."""
    try:
        with open(index_path(prefix), "rb") as index:
            size = index.seek(0, os.SEEK_END)
            index.seek(max(size - _TENSORFLOW_FOOTER_BYTES, 0))
            return is_tensorflow_index(index.read(_TENSORFLOW_FOOTER_BYTES))
    except (OSError, ValueError):
        return False


def _tensorflow_checkpoints_in(directory: str) -> list[str]:
    """TensorFlow checkpoints the state file of ``directory`` lists; [] when it is missing or unreadable."""
    try:
        state = _read_state(_state_filename(directory, None))
    except (OSError, CheckpointStateParseError):
        return []
    return [] if state is None else _listed_tensorflow_checkpoints(_join_with_directory(state, directory))
