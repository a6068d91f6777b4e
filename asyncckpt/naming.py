"""The names of the files a checkpoint consists of, and telling them apart (docs/format.md §1, §11).

Pure string functions: every writer builds names here and every cleanup parses them back here, so
a name is recognised exactly when it was made by one of these functions.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

__all__ = [
    "readable_name",
    "INDEX_SUFFIX",
    "index_path",
    "index_name",
    "data_dir_name",
    "index_tmp_name",
    "lock_name",
    "parse_data_dir_name",
    "parse_index_tmp_name",
    "parse_lock_name",
    "is_plain_name",
    "SectionName",
    "ClaimName",
    "section_name",
    "parse_section_name",
    "claim_name",
    "parse_claim_name",
    "lock_probe_name",
    "lock_probe_result_name",
]

INDEX_SUFFIX = ".index"
_MAX_NAME_LENGTH = 255
_NONCE = r"[0-9a-f]{16}"
_DATA_DIR_RE = re.compile(rf"^(?P<stem>.+)\.data-(?P<nonce>{_NONCE})$", re.DOTALL)
_LOCK_RE = re.compile(rf"^(?P<stem>.+)\.data-(?P<nonce>{_NONCE})\.lock$", re.DOTALL)
_INDEX_TMP_RE = re.compile(rf"^(?P<stem>.+)\.index\.tmp-(?P<nonce>{_NONCE})$", re.DOTALL)
_SECTION_RE = re.compile(
    rf"^(?P<stem>.+)\.index\.section-(?P<worker>[0-9]{{5,}})-of-(?P<count>[0-9]{{5,}})-(?P<nonce>{_NONCE})$", re.DOTALL
)
_CLAIM_RE = re.compile(rf"^(?P<stem>.+)\.index\.claim-(?P<chief>{_NONCE})-(?P<worker>{_NONCE})$", re.DOTALL)


def index_path(prefix: str) -> str:
    """The commit marker of the checkpoint at ``prefix``: ``prefix + ".index"``."""
    return f"{prefix}{INDEX_SUFFIX}"


def index_name(stem: str) -> str:
    """Basename of the manifest of the checkpoint whose basename is ``stem``."""
    return f"{stem}{INDEX_SUFFIX}"


def data_dir_name(stem: str, nonce: str) -> str:
    """Basename of a data directory: ``<stem>.data-<nonce>``."""
    return f"{stem}.data-{nonce}"


def lock_name(stem: str, nonce: str) -> str:
    """Basename of the lock file held while ``data_dir_name(stem, nonce)`` is being written."""
    return f"{data_dir_name(stem, nonce)}.lock"


def index_tmp_name(stem: str, nonce: str) -> str:
    """Basename under which a manifest is written before being renamed to ``index_name(stem)``."""
    return f"{stem}{INDEX_SUFFIX}.tmp-{nonce}"


def _parse(pattern: re.Pattern, name: str) -> tuple[str, str] | None:
    match = pattern.match(name)
    return (match["stem"], match["nonce"]) if match else None


def parse_data_dir_name(name: str) -> tuple[str, str] | None:
    """``(stem, nonce)`` if ``name`` is a data directory name, else ``None``."""
    return _parse(_DATA_DIR_RE, name)


def parse_lock_name(name: str) -> tuple[str, str] | None:
    """``(stem, nonce)`` if ``name`` is a write-lock file name, else ``None``."""
    return _parse(_LOCK_RE, name)


def parse_index_tmp_name(name: str) -> tuple[str, str] | None:
    """``(stem, nonce)`` if ``name`` is a temporary manifest name, else ``None``."""
    return _parse(_INDEX_TMP_RE, name)


def is_plain_name(name: Any) -> bool:
    """True for a non-empty single path component that cannot leave its directory.

    Rejects separators (``/`` and ``\\``), ``.`` and ``..``, NUL and other control characters,
    and names longer than 255 characters.
    """
    return (
        isinstance(name, str)
        and 0 < len(name) <= _MAX_NAME_LENGTH
        and name not in (".", "..")
        and not any(ch in "/\\" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name)
    )


# ---------------------------------------------------------------------------------------------
# Files of a multi-worker save (docs/format.md section 11)


def section_name(stem: str, worker: int, count: int, nonce: str) -> str:
    """Basename of the section worker ``worker`` publishes for data directory ``stem.data-<nonce>``.

    ``<stem>.index.section-i-of-n-<nonce>``: the writer's nonce makes the name its own, so no two
    writers ever publish under one name and cleanup can tell whose lock guards which section.
    """
    return f"{stem}.index.section-{worker:05d}-of-{count:05d}-{nonce}"


class SectionName(NamedTuple):
    """The parts of a section file's name (see :func:`section_name`)."""

    stem: str
    worker: int
    count: int
    nonce: str


class ClaimName(NamedTuple):
    """The parts of a claim file's name (see :func:`claim_name`)."""

    stem: str
    chief_nonce: str
    worker_nonce: str


def parse_section_name(name: str) -> SectionName | None:
    """The parts of ``name`` if it is a section file name, else ``None``."""
    match = _SECTION_RE.match(name)
    return SectionName(match["stem"], int(match["worker"]), int(match["count"]), match["nonce"]) if match else None


def claim_name(stem: str, chief_nonce: str, worker_nonce: str) -> str:
    """Basename a chief renames an accepted section to: ``<stem>.index.claim-<chief>-<worker>``.

    While the chief holds the lock of ``stem.data-<chief_nonce>``, the claim keeps data directory
    ``stem.data-<worker_nonce>`` from cleanup, whatever happens to the worker that wrote it.
    """
    return f"{stem}.index.claim-{chief_nonce}-{worker_nonce}"


def parse_claim_name(name: str) -> ClaimName | None:
    """The parts of ``name`` if it is a claim file name, else ``None``."""
    match = _CLAIM_RE.match(name)
    return ClaimName(match["stem"], match["chief"], match["worker"]) if match else None


def lock_probe_name(stem: str, save_id: str) -> str:
    """The marker the chief of a file-coordinated save holds while the others test its lock."""
    return f"{stem}.index.probe-{save_id[:16]}"


def lock_probe_result_name(stem: str, save_id: str, worker: int, excluded: bool) -> str:
    """Where worker ``worker`` reports whether the chief's lock kept it out (``excluded``)."""
    return f"{stem}.index.probe-{save_id[:16]}-{worker:05d}-{'held' if excluded else 'free'}"


# ---------------------------------------------------------------------------------------------
# Checkpoint keys as the names a user gave

_ATTRIBUTES = "/.ATTRIBUTES/"
_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"


def _unescape(segment: str) -> str:
    """A key segment as the name it escapes (``..`` is ``.``, ``.S`` is ``/``)."""
    return segment.replace(".S", "/").replace("..", ".")


def readable_name(key: str) -> str:
    """A checkpoint key as a path of the names a user gave: ``model/.ATTRIBUTES/layer1..weight`` → ``model/layer1.weight``.

    A variable's value is its object's path; other attributes follow their object's path.
    """
    if key.endswith(_VALUE):
        key = key[: -len(_VALUE)]
    return "/".join(_unescape(segment) for segment in key.replace(_ATTRIBUTES, "/").split("/"))
