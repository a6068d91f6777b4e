"""Where checkpoint bytes live: a small async ``Backend`` interface over files and TensorStore kvstores.

* :mod:`~asyncckpt.io.storage.base`: the interface (:class:`Storage`, :class:`Backend`) and its errors.
* :mod:`~asyncckpt.io.storage.file`: :class:`FileStorage`, the default, on a local or network filesystem.
* :mod:`~asyncckpt.io.storage.kvstore`: :class:`KvStoreStorage`, on any TensorStore kvstore driver.
* :mod:`~asyncckpt.io.storage.s3`: :class:`S3Storage`, S3-compatible object storage (``s3://`` paths)
  through TensorStore's ``s3`` driver, committing by conditional writes.

:class:`KvStoreStorage` and :class:`S3Storage` are loaded on first use, so that only their users
import TensorStore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncckpt.io.storage.base import (
    Backend,
    BackendWrapper,
    CommitConflictError,
    Lock,
    NotRegularFileError,
    Storage,
    StorageError,
    StreamedValue,
    TruncatedError,
)
from asyncckpt.io.storage.file import FileStorage, default_storage

if TYPE_CHECKING:
    from asyncckpt.io.storage.kvstore import KvStoreStorage
    from asyncckpt.io.storage.s3 import S3Storage

__all__ = [
    "StorageError",
    "TruncatedError",
    "CommitConflictError",
    "NotRegularFileError",
    "StreamedValue",
    "Lock",
    "Backend",
    "BackendWrapper",
    "Storage",
    "FileStorage",
    "KvStoreStorage",
    "S3Storage",
    "default_storage",
    "storage_for_path",
]


def storage_for_path(path) -> Storage:
    """Where a path given without a storage is: the bucket of an ``s3://`` URL, else the filesystem."""
    if isinstance(path, str) and path.startswith("s3://"):
        from asyncckpt._runtime import process_state
        from asyncckpt.io.storage.s3 import S3Storages

        return process_state().owned(S3Storages).for_url(path)
    return default_storage()


def __getattr__(name: str):
    if name == "KvStoreStorage":
        from asyncckpt.io.storage.kvstore import KvStoreStorage

        return KvStoreStorage
    if name == "S3Storage":
        from asyncckpt.io.storage.s3 import S3Storage

        return S3Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
