"""The ``checkpoint`` state file, ``latest_checkpoint`` and ``CheckpointManager``.

State file
----------
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
file in the same directory is written, fsynced and renamed over the old one, then the directory is
fsynced, so a reader sees the old state or the new one, never a mixture.

Concurrency
-----------
*Within a process* the manager's bookkeeping (recording a new checkpoint, writing the state file,
deleting old checkpoints) runs as the last write callback of the save, i.e. only after the data is
durable -- on a background thread for asynchronous saves -- under a lock that guards all of the
manager's mutable state (TensorFlow mutates it from its async thread without one). The public
readers (`latest_checkpoint`, `get_checkpoint_state`, `checkpoint_exists`) first wait for this
process's pending writes under the directory, so a process always reads its own writes.

*Across processes* we use a **lock file**, not compare-and-swap: every read-modify-write of the
state file holds an exclusive ``fcntl.flock`` on ``<directory>/.<latest_filename>.lock``. While
holding it a manager re-reads the state file and then

1. keeps the entries other managers recorded there (those it did not find at construction, did
   not delete or preserve itself, and whose checkpoints still exist),
2. forgets its own entries that another manager deleted (missing from the file and from disk),
3. adds its new checkpoint, writes the file, deletes its own expired checkpoints and writes the
   file again.

So two managers sharing a directory never lose each other's entries, every path the file lists
exists, and ``model_checkpoint_path`` is the checkpoint committed last by anyone. A manager
still adopts, at construction, every managed entry of the file (TensorFlow's behaviour), so a
manager created while another is saving may delete that one's older checkpoints; build
concurrent managers before they save, and give them different ``checkpoint_name`` values
(managers sharing a name number their files independently and overwrite each other's).
The lock file is created once and never removed (removing it would let two processes lock
different files). ``flock`` is advisory and POSIX-only; it works on local file systems and
NFSv4, and is skipped on platforms without ``fcntl``. Plain `update_checkpoint_state` (used by
`asyncckpt.Checkpoint.save`) takes the same lock but only writes.
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
import re
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from asyncckpt import pipeline

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
    "CheckpointManager",
]

logger = logging.getLogger("asyncckpt")

#: State files larger than this are refused as unparseable. A state entry takes about 90 bytes,
#: so this still holds ~180,000 managed checkpoints (``max_to_keep=None`` keeps every path).
MAX_STATE_FILE_BYTES = 16 * 1024 * 1024

_DEFAULT_STATE_FILENAME = "checkpoint"


# ---------------------------------------------------------------------------------------------
# The state file: pure text codec
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointState:
    """The contents of a ``checkpoint`` state file (TensorFlow's ``CheckpointState`` proto).

    Attributes
    ----------
    model_checkpoint_path : str
        Prefix of the most recent checkpoint.
    all_model_checkpoint_paths : list of str
        Prefixes of the checkpoints a manager still tracks, oldest first; the last one is
        ``model_checkpoint_path``.
    all_model_checkpoint_timestamps : list of float
        Seconds since the epoch at which each path in ``all_model_checkpoint_paths`` was
        recorded. Empty for state written by `asyncckpt.Checkpoint.save` (unmanaged paths).
    last_preserved_timestamp : float
        When the manager last preserved a checkpoint because of
        ``keep_checkpoint_every_n_hours``; ``0.0`` when the file does not say.
    """

    model_checkpoint_path: str = ""
    all_model_checkpoint_paths: list = dataclasses.field(default_factory=list)
    all_model_checkpoint_timestamps: list = dataclasses.field(default_factory=list)
    last_preserved_timestamp: float = 0.0


class CheckpointStateParseError(ValueError):
    """The text of a state file does not follow the ``CheckpointState`` text-format grammar."""


_STRING_FIELDS = ("model_checkpoint_path", "all_model_checkpoint_paths")
_REPEATED_FIELDS = ("all_model_checkpoint_paths", "all_model_checkpoint_timestamps")
_FIELD_ORDER = (
    "model_checkpoint_path",
    "all_model_checkpoint_paths",
    "all_model_checkpoint_timestamps",
    "last_preserved_timestamp",
)

# One token at a time; anything that matches none of these is a syntax error. Whitespace is ASCII
# only, strings may not span lines, and numbers follow the text-format float grammar (an optional
# minus, decimal or exponent notation without a leading zero, an optional ``f`` suffix, or
# inf/infinity/nan).
_TOKEN_RE = re.compile(
    r"""
      (?P<space>[ \t\r\n\f\v]+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\\n]|\\[^\n])*"|'(?:[^'\\\n]|\\[^\n])*')
    | (?P<number>-?(?:(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fF]?
                     |(?i:inf(?:inity)?f?|nanf?)))
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>[:\[\],;])
    """,
    re.VERBOSE,
)
_SPECIAL_FLOAT_RE = re.compile(r"(-?)(?:(inf(?:inity)?)|nan)f?", re.IGNORECASE)
_SIMPLE_ESCAPES = {
    "a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11,
    "\\": 92, "'": 39, '"': 34, "?": 63,
}  # fmt: skip
_OCTAL_RE = re.compile(r"[0-7]{1,3}")
_HEX_RE = re.compile(r"x([0-9A-Fa-f]{1,2})")


def _tokenize(text: str) -> Iterator[tuple[str, str, int]]:
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise CheckpointStateParseError(f"unexpected character {text[pos]!r} at offset {pos}")
        kind = match.lastgroup
        if kind not in ("space", "comment"):
            yield kind, match.group(), pos
        pos = match.end()


def _unescape(literal: str, offset: int) -> str:
    """Decode one quoted string token the way protobuf's text format does (C escapes, UTF-8)."""
    body = literal[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            out += char.encode("utf-8", "surrogatepass")
            i += 1
            continue
        nxt = body[i + 1]  # the token grammar guarantees a character after a backslash
        if nxt in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[nxt])
            i += 2
        elif (octal := _OCTAL_RE.match(body, i + 1)) is not None:
            value = int(octal.group(), 8)
            if value > 0xFF:
                raise CheckpointStateParseError(f"octal escape \\{octal.group()} out of range at offset {offset}")
            out.append(value)
            i = octal.end()
        elif (hexa := _HEX_RE.match(body, i + 1)) is not None:
            out.append(int(hexa.group(1), 16))
            i = hexa.end()
        else:
            raise CheckpointStateParseError(f"invalid escape \\{nxt} in string at offset {offset}")
    try:
        value = out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointStateParseError(f"string at offset {offset} is not valid UTF-8") from exc
    if "\x00" in value:
        # No file system accepts NUL in a path; refusing it here keeps every later os call safe.
        raise CheckpointStateParseError(f"string at offset {offset} contains a NUL character")
    return value


def _parse_float(token: str, offset: int) -> float:
    special = _SPECIAL_FLOAT_RE.fullmatch(token)
    if special is not None:
        if special.group(2) is None:
            return math.nan
        return -math.inf if special.group(1) else math.inf
    try:
        return float(token.rstrip("fF"))
    except ValueError:  # pragma: no cover - the token regex only admits valid floats
        raise CheckpointStateParseError(f"invalid number {token!r} at offset {offset}") from None


def parse_checkpoint_state(text: str) -> CheckpointState:
    """Parse the text format of a ``CheckpointState`` proto, exactly as stored on disk.

    Accepts what protobuf's text-format parser accepts for this message: fields in any order,
    ``#`` comments, optional ``,``/``;`` separators, single or double quotes, adjacent string
    literals concatenated, C escapes (``\\n``, ``\\"``, ``\\\\``, octal ``\\NNN``, hex ``\\xHH``),
    ``[a, b]`` lists for repeated fields, and a repeated singular field keeping its last value
    (``text_format.Merge`` semantics). Paths are returned as written (not joined with a
    directory), and nothing is checked beyond syntax.

    Parameters
    ----------
    text : str
        The file contents.

    Returns
    -------
    CheckpointState

    Raises
    ------
    CheckpointStateParseError
        On any unknown field, syntax error, bad escape, non-UTF-8 string or NUL in a path.
    """
    tokens = list(_tokenize(text))
    values: dict[str, Any] = {
        "model_checkpoint_path": "",
        "all_model_checkpoint_paths": [],
        "all_model_checkpoint_timestamps": [],
        "last_preserved_timestamp": 0.0,
    }
    pos = 0

    def peek() -> tuple[str, str, int] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(kind: str | None = None, text_: str | None = None) -> tuple[str, str, int]:
        nonlocal pos
        token = peek()
        if token is None:
            raise CheckpointStateParseError(f"unexpected end of input (expected {text_ or kind})")
        if (kind is not None and token[0] != kind) or (text_ is not None and token[1] != text_):
            raise CheckpointStateParseError(f"unexpected {token[1]!r} at offset {token[2]} (expected {text_ or kind})")
        pos += 1
        return token

    def take_value(field: str) -> Any:
        if field in _STRING_FIELDS:
            first = take("string")
            parts = [_unescape(first[1], first[2])]
            while (token := peek()) is not None and token[0] == "string":
                take()
                parts.append(_unescape(token[1], token[2]))
            return "".join(parts)
        token = peek()
        if token is not None and token[0] == "ident" and _SPECIAL_FLOAT_RE.fullmatch(token[1]):
            take()
            return _parse_float(token[1], token[2])
        token = take("number")
        return _parse_float(token[1], token[2])

    while peek() is not None:
        _, name, offset = take("ident")
        if name not in values:
            raise CheckpointStateParseError(f"unknown field {name!r} at offset {offset}")
        take("punct", ":")
        if name in _REPEATED_FIELDS and (token := peek()) is not None and token[1] == "[":
            take()
            if (token := peek()) is not None and token[1] == "]":
                take()
            else:
                values[name].append(take_value(name))
                while (token := peek()) is not None and token[1] == ",":
                    take()
                    values[name].append(take_value(name))
                take("punct", "]")
        elif name in _REPEATED_FIELDS:
            values[name].append(take_value(name))
        else:
            values[name] = take_value(name)
        if (token := peek()) is not None and token[1] in (",", ";"):
            take()
    return CheckpointState(**values)


_ESCAPES = {i: f"\\{i:03o}" for i in [*range(32), 127]}
_ESCAPES.update({9: r"\t", 10: r"\n", 13: r"\r", 34: r"\"", 39: r"\'", 92: r"\\"})


def _escape(value: str) -> str:
    """C-escape a string as current protobuf releases do in text format (``as_utf8=True``).

    ASCII control characters become octal escapes and non-ASCII characters stay as they are;
    older protobuf releases wrote the UTF-8 bytes of non-ASCII characters as octal escapes,
    which `parse_checkpoint_state` reads as well.
    """
    return value.translate(_ESCAPES)


def format_checkpoint_state(state: CheckpointState) -> str:
    """Render a `CheckpointState` exactly as ``text_format.MessageToString`` renders the proto.

    Fields come in field-number order, one per line; proto3 defaults (an empty model path, a
    zero ``last_preserved_timestamp``) are omitted; doubles use Python's shortest round-trip
    ``str``; strings are C-escaped (see `_escape`).
    """
    lines = []
    for name in _FIELD_ORDER:
        value = getattr(state, name)
        items = value if name in _REPEATED_FIELDS else [value]
        for item in items:
            if name in _STRING_FIELDS:
                if name not in _REPEATED_FIELDS and item == "":
                    continue
                lines.append(f'{name}: "{_escape(item)}"\n')
            else:
                item = float(item)
                if name not in _REPEATED_FIELDS and item == 0.0 and math.copysign(1.0, item) > 0:
                    continue
                lines.append(f"{name}: {item!s}\n")
    return "".join(lines)


# ---------------------------------------------------------------------------------------------
# The state file: reading and writing
# ---------------------------------------------------------------------------------------------


def _state_filename(directory: str, latest_filename: str | None) -> str:
    return os.path.join(directory, latest_filename or _DEFAULT_STATE_FILENAME)


def _fspath(path: Any, what: str) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"{what} must be a str or os.PathLike, got {type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path


def _read_state_text(filename: str) -> str | None:
    """The file's text, or ``None`` when it does not exist; ``OSError``/parse error otherwise."""
    try:
        with open(filename, "rb") as handle:
            if os.fstat(handle.fileno()).st_size > MAX_STATE_FILE_BYTES:
                raise CheckpointStateParseError(f"larger than {MAX_STATE_FILE_BYTES} bytes")
            data = handle.read(MAX_STATE_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_STATE_FILE_BYTES:  # grew while we read it
        raise CheckpointStateParseError(f"larger than {MAX_STATE_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointStateParseError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _join_with_directory(state: CheckpointState, directory: str) -> CheckpointState:
    def join(path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(directory, path)

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
        text = _read_state_text(filename)
        if text is None:
            return None
        state = parse_checkpoint_state(text)
    except (OSError, CheckpointStateParseError) as exc:
        logger.warning("%s: %s", type(exc).__name__, exc)
        logger.warning("%s: Checkpoint ignored", filename)
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
    pipeline.wait_for_pending_writes(directory)
    return _load_state(directory, latest_filename)


def _storable_path(path: str, directory_abs: str) -> str:
    """Relative to the directory when inside it, absolute otherwise."""
    path_abs = os.path.abspath(path)
    try:
        inside = os.path.commonpath([directory_abs, path_abs]) == directory_abs and path_abs != directory_abs
    except ValueError:  # different drives on Windows
        inside = False
    return os.path.relpath(path_abs, directory_abs) if inside else path_abs


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


def _atomic_write_text(filename: str, text: str) -> None:
    """Write, fsync and rename over ``filename``, then fsync the directory."""
    directory = os.path.dirname(filename) or "."
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(filename)}.", suffix=".tmp", dir=directory)
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
    if fcntl is None:  # pragma: no cover - see the module docstring
        yield
        return
    name = f".{latest_filename or _DEFAULT_STATE_FILENAME}.lock"
    fd = os.open(os.path.join(directory or ".", name), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


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
    directory_abs = os.path.abspath(save_dir or ".")
    if os.path.abspath(model_path) == os.path.abspath(_state_filename(save_dir, latest_filename)):
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
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    _atomic_write_text(_state_filename(save_dir, latest_filename), format_checkpoint_state(state))


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
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    with _state_file_lock(save_dir, latest_filename):
        _write_state(save_dir, latest_filename, state)


def checkpoint_exists(checkpoint_prefix) -> bool:
    """True when a committed checkpoint exists at ``checkpoint_prefix`` (its ``.index`` marker).

    Waits first for this process's pending writes to that prefix.
    """
    prefix = _fspath(checkpoint_prefix, "checkpoint_prefix")
    pipeline.wait_for_pending_writes(prefix)
    return bool(pipeline.checkpoint_exists(prefix))


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
        The joined ``model_checkpoint_path``, or ``None`` when there is no (readable) state file
        or the checkpoint it names is gone (logged at ERROR).

    Raises
    ------
    ValueError
        If the state file parses but names no checkpoint (see `get_checkpoint_state`).
    """
    state = get_checkpoint_state(checkpoint_dir, latest_filename)
    if state is None or not state.model_checkpoint_path:
        return None
    if _recorded_checkpoint_exists(state.model_checkpoint_path):
        return state.model_checkpoint_path
    logger.error("Couldn't match files for checkpoint %s", state.model_checkpoint_path)
    return None


def _recorded_checkpoint_exists(prefix: str) -> bool:
    """`pipeline.checkpoint_exists` for a path read from a state file, which may be anything.

    A path the file system cannot even look up (a name too long, say) names no checkpoint.
    """
    try:
        return bool(pipeline.checkpoint_exists(prefix))
    except OSError as exc:
        logger.warning("cannot look up checkpoint %r recorded in the state file: %s", prefix, exc)
        return False


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


def _default_options():
    # Imported on use: ``checkpoint`` itself imports this module to write the state file.
    from asyncckpt.checkpoint import CheckpointOptions  # noqa: PLC0415

    return CheckpointOptions()


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
    never managed or deleted.

    Bookkeeping happens only after a checkpoint is durable (as the last write callback), so with
    ``CheckpointOptions(enable_async=True)`` the state file, `latest_checkpoint` and deletions
    advance on the background thread; `latest_checkpoint`, `checkpoints` and
    `restore_or_initialize` first wait for this manager's pending saves, so they never report a
    stale or incomplete checkpoint. See the module docstring for the cross-process protocol.

    Parameters
    ----------
    checkpoint : asyncckpt.Checkpoint
        The object to save; its ``save_counter`` numbers the checkpoints.
    directory : str or os.PathLike
        Where checkpoints and the state file go.
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
        self._checkpoint_prefix = os.path.join(self._directory, checkpoint_name)
        self._step_counter = step_counter
        self._checkpoint_interval = checkpoint_interval
        self._last_checkpoint_step = None
        self._init_fn = init_fn
        self._clock = clock if clock is not None else (lambda: time.time())

        # Guards everything below; bookkeeping runs on the pipeline's background thread.
        self._lock = threading.RLock()
        self._pending: list[_PendingSave] = []  # saves whose bookkeeping has not run yet
        self._maybe_delete: collections.OrderedDict[str, float] = collections.OrderedDict()
        # Paths in the state file this manager must not carry forward: the ones it found but did
        # not adopt (preserved or unmanaged), and the ones it preserved or deleted itself.
        self._released: set[str] = set()

        recovered = get_checkpoint_state(self._directory)
        now = self._clock()
        if recovered is None:
            self._latest_checkpoint = None
            # A second before now, so a manager re-created right away does not preserve on clock ties.
            self._last_preserved_timestamp = now - 1.0
            return
        self._latest_checkpoint = recovered.model_checkpoint_path
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
        paths = recovered.all_model_checkpoint_paths
        timestamps = recovered.all_model_checkpoint_timestamps or [self._last_preserved_timestamp] * len(paths)
        for path, timestamp in zip(paths, timestamps):
            timestamp = min(timestamp, now)
            if timestamp > self._last_preserved_timestamp:
                self._maybe_delete[path] = timestamp
        self._released.update(p for p in paths if p not in self._maybe_delete)

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
            save_counter.assign_add(1)
            number = _as_integer(save_counter if checkpoint_number is None else checkpoint_number, "checkpoint_number")
            prefix = f"{self._checkpoint_prefix}-{number}"
            pending = _PendingSave(prefix)
            self._pending.append(pending)

        write_options = copy.copy(options) if options is not None else _default_options()
        write_options.experimental_write_callbacks = [
            *(getattr(options, "experimental_write_callbacks", None) or []),
            self._make_bookkeeping_callback(pending),
        ]
        try:
            path = self._checkpoint.write(prefix, options=write_options)
        except BaseException:
            self._forget(pending)
            raise
        with self._lock:
            pending.started = True
        return path

    def _make_bookkeeping_callback(self, pending: _PendingSave) -> Callable[[Any], None]:
        def record_and_sweep(save_path) -> None:
            try:
                self._record_and_sweep_state(_fspath(save_path, "save path"))
            finally:
                self._forget(pending)

        return record_and_sweep

    def _forget(self, pending: _PendingSave) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._pending.remove(pending)

    def _record_and_sweep_state(self, save_path: str) -> None:
        with self._lock, _state_file_lock(self._directory, None):
            on_disk = None
            with contextlib.suppress(ValueError):  # an empty state file has nothing to keep
                on_disk = _load_state(self._directory, None)
            foreign = self._foreign_entries(on_disk, save_path)
            self._forget_deleted_elsewhere(on_disk, save_path)
            timestamp = self._clock()
            # An overwritten checkpoint moves to the end of the queue.
            self._maybe_delete.pop(save_path, None)
            self._maybe_delete[save_path] = timestamp
            self._released.discard(save_path)
            self._latest_checkpoint = save_path
            # Record before deleting, so a crash while deleting still finds the new checkpoint;
            # then record again without the deleted ones (when there were any).
            self._record_state(foreign)
            if self._sweep():
                self._record_state(foreign)

    def _foreign_entries(self, on_disk: CheckpointState | None, save_path: str) -> list[tuple[str, float]]:
        """Entries another manager recorded in the state file that must survive our rewrite."""
        if on_disk is None:
            return []
        return [
            (path, timestamp)
            for path, timestamp in zip(on_disk.all_model_checkpoint_paths, on_disk.all_model_checkpoint_timestamps)
            if path != save_path
            and path not in self._maybe_delete
            and path not in self._released
            and _recorded_checkpoint_exists(path)
        ]

    def _forget_deleted_elsewhere(self, on_disk: CheckpointState | None, save_path: str) -> None:
        """Drop managed paths another manager deleted, so the state file never lists them.

        A manager that deletes a checkpoint rewrites the state file without it (under the file
        lock), so only our paths missing from the file need an existence check; in the usual
        one-manager case none is missing and nothing is read.
        """
        if on_disk is None:
            return
        listed = set(on_disk.all_model_checkpoint_paths)
        for path in [p for p in self._maybe_delete if p not in listed and p != save_path]:
            if not _recorded_checkpoint_exists(path):
                del self._maybe_delete[path]
                self._released.add(path)

    def _record_state(self, foreign: list[tuple[str, float]]) -> None:
        own = list(self._maybe_delete.items())
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
            self._last_preserved_timestamp,
        )
        _write_state(self._directory, None, state)

    def _sweep(self) -> bool:
        """Preserve or delete the oldest managed checkpoints beyond ``max_to_keep``.

        Returns whether the active set changed.
        """
        if not self._max_to_keep or len(self._maybe_delete) <= self._max_to_keep:
            return False  # with no max_to_keep everything stays active and nothing is preserved
        while len(self._maybe_delete) > self._max_to_keep:
            path, timestamp = self._maybe_delete.popitem(last=False)
            self._released.add(path)
            if self._keep_checkpoint_every_n_hours and (
                timestamp - self._keep_checkpoint_every_n_hours * 3600.0 >= self._last_preserved_timestamp
            ):
                # Kept on disk but no longer listed, so the state file cannot grow forever.
                self._last_preserved_timestamp = timestamp
                continue
            pipeline.delete_checkpoint(path)
        return True

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
            pipeline.wait_for_pending_writes(pending.path)
        for pending in started:
            self._forget(pending)  # a failed write never runs its callbacks

    def sync(self) -> None:
        """Wait for every pending save of the checkpoint; re-raise a background error."""
        self._checkpoint.sync()
        self._wait_for_own_saves()

    def restore_or_initialize(self) -> str | None:
        """Restore the latest checkpoint, or run ``init_fn`` when there is none.

        Waits first for this manager's pending saves, so an asynchronous first save is restored
        rather than re-initialized. The load status is discarded; use
        ``checkpoint.restore(manager.latest_checkpoint)`` to make assertions.

        Returns
        -------
        str or None
            The restored prefix, or ``None`` when ``init_fn`` (if any) was called instead.
        """
        latest = self.latest_checkpoint
        if latest is not None:
            self._checkpoint.restore(latest)
            if self._checkpoint_interval is not None:
                with self._lock:
                    self._last_checkpoint_step = _read_step(self._step_counter)
            return latest
        if self._init_fn is not None:
            self._init_fn()
        return None


class _PendingSave:
    """One save whose bookkeeping callback has not run; ``started`` once ``write`` returned."""

    __slots__ = ("path", "started")

    def __init__(self, path: str):
        self.path = path
        self.started = False


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
