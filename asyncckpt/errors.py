"""Exceptions raised by asyncckpt.

Error tree::

    CheckpointError
    ├── NotFoundError (also FileNotFoundError)      no committed checkpoint at a path
    ├── CheckpointTimeoutError (also TimeoutError)  a multi-worker save waited too long for a worker
    └── CorruptCheckpointError (also ValueError)    manifest, state or data failed validation
        └── UnsupportedFormatError                  written by an unknown format version

Mismatches between a checkpoint and live objects (dtype, shape) raise plain ``ValueError``
naming the key, as TensorFlow users expect; failed status assertions raise ``AssertionError``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "NotFoundError",
    "CheckpointTimeoutError",
    "CorruptCheckpointError",
    "UnsupportedFormatError",
]


class CheckpointError(Exception):
    """Base class of every error asyncckpt raises on its own account."""


class NotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint (or a file it needs) exists at the given path."""


class CheckpointTimeoutError(CheckpointError, TimeoutError):
    """A multi-worker save gave up waiting: for a worker's section (chief) or the commit (others)."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint file failed validation: bad checksum, truncation, or malformed metadata."""


class UnsupportedFormatError(CorruptCheckpointError):
    """The checkpoint was written by a format version this release cannot read."""
