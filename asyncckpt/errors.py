"""Exceptions raised by asyncckpt.

Error tree::

    CheckpointError
    ├── NotFoundError (also FileNotFoundError)      no committed checkpoint at a path
    ├── CheckpointTimeoutError (also TimeoutError)  a multi-worker save waited too long for a worker
    ├── CoordinationError                           a save of several ranks failed on some rank
    └── CorruptCheckpointError (also ValueError)    manifest, state or data failed validation
        └── UnsupportedFormatError                  another format (TensorFlow's) or an unknown version

Mismatches between a checkpoint and live objects (dtype, shape) raise plain ``ValueError``
naming the key, as TensorFlow users expect; failed status assertions raise ``AssertionError``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "NotFoundError",
    "CheckpointTimeoutError",
    "CoordinationError",
    "CorruptCheckpointError",
    "UnsupportedFormatError",
]


class CheckpointError(Exception):
    """Base class of every error asyncckpt raises on its own account."""


class NotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint (or a file it needs) exists at the given path."""


class CheckpointTimeoutError(CheckpointError, TimeoutError):
    """A multi-worker save gave up waiting: for a worker's section (chief) or the commit (others)."""


class CoordinationError(CheckpointError):
    """A save of several ranks was not committed because of some rank: every rank's ``sync()`` raises it.

    The message names the rank(s) and what went wrong there (an error in its own part, a save of
    other values than the chief's, a collective that failed).
    """


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint file failed validation: bad checksum, truncation, or malformed metadata."""


class UnsupportedFormatError(CorruptCheckpointError):
    """A file at a checkpoint path is in a format this release cannot read, or of a version it cannot.

    Raised for a TensorFlow checkpoint (recognised by its index), for a file asyncckpt did not
    write where it would commit a checkpoint (left as it is: asyncckpt never replaces or deletes
    files it did not write), and for an asyncckpt manifest of an unknown ``format_version``.
    """
