"""Where checkpoint bytes live: a small async ``Backend`` interface over files and TensorStore kvstores.

* :mod:`~asyncckpt.io.storage.base`: the interface (:class:`Storage`, :class:`Backend`) and its errors.
* :mod:`~asyncckpt.io.storage.file`: :class:`FileStorage`, the default, on a local or network filesystem.
* :mod:`~asyncckpt.io.storage.kvstore`: :class:`KvStoreStorage`, on any TensorStore kvstore driver.

:class:`KvStoreStorage` is loaded on first use, so that only its users import TensorStore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncckpt.io.storage.base import (
    Backend,
    BackendWrapper,
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

__all__ = [
    "StorageError",
    "TruncatedError",
    "NotRegularFileError",
    "StreamedValue",
    "Lock",
    "Backend",
    "BackendWrapper",
    "Storage",
    "FileStorage",
    "KvStoreStorage",
    "default_storage",
]


def __getattr__(name: str):
    if name == "KvStoreStorage":
        from asyncckpt.io.storage.kvstore import KvStoreStorage

        return KvStoreStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
