"""Pure: checkpoint paths that are either local paths or ``s3://bucket/key`` URLs.

A checkpoint directory may be a local folder or a key prefix in a bucket. The state file, the
manager's bookkeeping and the readers spell, join and compare paths through these functions, so
both kinds go through the same code: a URL is absolute, is joined with ``/``, and is normalised
without touching the file system.
"""

from __future__ import annotations

import os
import posixpath

__all__ = ["URL_SCHEMES", "is_url", "absolute", "join", "inside", "relative", "parent"]

#: The URL schemes a checkpoint path may have.
URL_SCHEMES = ("s3://",)


def is_url(path: str) -> bool:
    return isinstance(path, str) and path.startswith(URL_SCHEMES)


def _split_url(path: str) -> tuple[str, str]:
    """``("s3://bucket", "normalised/key")``."""
    scheme = next(s for s in URL_SCHEMES if path.startswith(s))
    bucket, _, key = path[len(scheme):].partition("/")
    key = posixpath.normpath(key).lstrip("/") if key else ""
    return f"{scheme}{bucket}", "" if key == "." else key


def absolute(path: str) -> str:
    """A local path made absolute; a URL normalised (``s3://b/a/./c/../d`` is ``s3://b/a/d``)."""
    if is_url(path):
        root, key = _split_url(path)
        return f"{root}/{key}" if key else root
    return os.path.abspath(path or ".")


def join(directory: str, name: str) -> str:
    """``name`` in ``directory``: ``os.path.join`` for local paths, ``/`` for URLs; a URL ``name`` stays."""
    if is_url(name):
        return name
    if is_url(directory):
        return f"{directory.rstrip('/')}/{name}" if directory else name
    return os.path.join(directory, name)


def inside(path: str, directory: str) -> bool:
    """Whether ``path`` is strictly inside ``directory`` (both absolute, as :func:`absolute` gives)."""
    if is_url(path) or is_url(directory):
        return is_url(path) and is_url(directory) and path.startswith(directory.rstrip("/") + "/")
    try:
        return path != directory and os.path.commonpath([directory, path]) == directory
    except ValueError:  # different drives on Windows
        return False


def relative(path: str, directory: str) -> str:
    """``path`` relative to ``directory`` (``path`` inside it, both absolute)."""
    if is_url(path):
        return path[len(directory.rstrip("/")) + 1:]
    return os.path.relpath(path, directory)


def parent(path: str) -> str:
    """The directory holding ``path``."""
    if is_url(path):
        root, key = _split_url(path)
        head = posixpath.dirname(key)
        return f"{root}/{head}" if head else root
    return os.path.dirname(path)
