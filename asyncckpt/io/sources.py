"""What a write takes its bytes from: entries validated and frozen into :class:`Source` records.

``bytes`` and plain arrays cannot announce a change, so they are taken at ``start_write`` (bytes as
they are, arrays as an owned C-order little-endian copy); a *snapshot source* (``Variable``) is
only inspected here and read live later, under the snapshot's guard or device capture.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncckpt import _arrays
from asyncckpt.dtypes import dtype_from_string, dtype_string
from asyncckpt.format import BYTES_DTYPE, OBJECT_GRAPH_KEY
from asyncckpt.shards import SHARD_SEPARATOR, ShardedValue, declaration_key, shard_key

__all__ = ["SaveEntry", "Source", "SourceKind", "host_bytes", "prepare_source", "prepare_sources"]


@dataclass(frozen=True)
class SaveEntry:
    """One checkpoint key and where its value comes from.

    ``source`` is a snapshot source (has ``_snapshot_array``, ``_add_mutation_hook`` and
    ``_remove_mutation_hook``), a NumPy or device array, or ``bytes``.
    """

    key: str
    source: Any


# ---------------------------------------------------------------------------------------------
# Sources


class SourceKind(enum.Enum):
    """Where a value's bytes come from during a write."""

    BYTES = "bytes"  #: a byte string, taken as it is at start_write
    ARRAY = "array"  #: an owned host copy made at start_write (a plain array has no guard)
    HOLDER = "holder"  #: a snapshot source, read live until its bytes are written or copied


@dataclass
class Source:
    """A prepared :class:`SaveEntry`: what the manifest records and where to take bytes from.

    ``kind`` says where the bytes come from (:class:`SourceKind`). ``off_host`` marks a holder whose array was
    not a NumPy array when prepared: a device array, captured on the device at each write.
    """

    key: str
    kind: SourceKind
    value: Any
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    off_host: bool = False

    def live_array(self) -> Any:
        """The array to take bytes from now; for a holder, checked against the recorded layout."""
        if self.kind is not SourceKind.HOLDER:
            return self.value
        array = self.value._snapshot_array()
        if _encode(array.dtype) != self.dtype or tuple(array.shape) != self.shape:
            raise ValueError(
                f"the value of {self.key!r} changed from {self.dtype}{list(self.shape)} to "
                f"{_encode(array.dtype)}{list(array.shape)} during the write without calling its "
                "mutation hooks first"
            )
        return array

    def flat_view(self) -> memoryview | None:
        """All bytes of the value as one flat view, or ``None`` when only copies of ranges exist."""
        if self.kind is SourceKind.BYTES:
            return memoryview(self.value)
        array = self.live_array()
        if type(array) is not np.ndarray and (_arrays.is_device_array(array) or not isinstance(array, np.ndarray)):
            return None
        if not array.flags.c_contiguous or array.dtype != dtype_from_string(self.dtype):
            return None
        if array.ndim:
            try:
                return memoryview(array).cast("B")  # a third of the cost of reshape + view
            except (TypeError, ValueError):  # a dtype the buffer protocol cannot describe (bfloat16)
                pass
        return memoryview(array.reshape(-1).view(np.uint8))

    def byte_view(self, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` of the value as a flat ``'B'`` memoryview (a view when possible)."""
        if self.kind is SourceKind.BYTES:
            return memoryview(self.value)[start:stop]
        return host_bytes(self.live_array(), start, stop)


_dtype_strings: dict[Any, str] = {}


def _encode(dtype: Any) -> str:
    """:func:`~asyncckpt.dtypes.dtype_string`, memoised per dtype object (it is on every save's path)."""
    try:
        return _dtype_strings[dtype]
    except (KeyError, TypeError):
        pass
    text = dtype_string(dtype)
    with contextlib.suppress(TypeError):
        _dtype_strings[dtype] = text
    return text


_SOURCE_METHODS = ("_snapshot_array", "_add_mutation_hook", "_remove_mutation_hook")
_source_types: dict[type, bool] = {}


def _is_snapshot_source(value: Any) -> bool:
    kind = type(value)
    known = _source_types.get(kind)
    if known is None:
        known = all(callable(getattr(kind, name, None)) for name in _SOURCE_METHODS)
        if known or not any(hasattr(value, name) for name in _SOURCE_METHODS):
            _source_types[kind] = known  # decided by the type alone: remember it
        else:  # instance attributes may provide the protocol: decide per object
            return all(callable(getattr(value, name, None)) for name in _SOURCE_METHODS)
    return known


def _owned_copy(key: str, value: Any) -> np.ndarray:
    if _arrays.is_device_array(value):
        value = _arrays.to_numpy(value)
    elif not isinstance(value, (np.ndarray, np.generic)):
        raise TypeError(
            f"the value of {key!r} is a {type(value).__name__}; expected a NumPy or device array, "
            "bytes, or an object with the snapshot-source protocol"
        )
    try:
        little = dtype_from_string(_encode(value.dtype))
    except TypeError as exc:
        raise TypeError(f"cannot save {key!r}: {exc}") from None
    return np.array(value, dtype=little, order="C", copy=True)


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"checkpoint keys must be non-empty strings, got {key!r}")
    if key == OBJECT_GRAPH_KEY:
        raise ValueError(f"{OBJECT_GRAPH_KEY!r} is reserved for the object graph")
    if SHARD_SEPARATOR in key:
        raise ValueError(f"checkpoint key {key!r} contains a NUL character")


def _shard_sources(key: str, value: ShardedValue) -> list[Source]:
    """A sharded value's items: its declaration (no bytes), then each shard this process writes."""
    shape = tuple(int(dim) for dim in value.global_shape)
    sources = [Source(declaration_key(key, value.dtype, shape), SourceKind.BYTES, b"", BYTES_DTYPE, (), 0)]
    for shard in value.shards:
        offset = tuple(int(start) for start in shard.offset)
        source = prepare_source(shard_key(key, value.dtype, shape, offset), shard.value)
        if source.dtype != value.dtype:
            raise TypeError(f"the shard of {key!r} at {list(offset)} is {source.dtype}, the value {value.dtype}")
        if len(offset) != len(shape) or len(source.shape) != len(shape) or any(
                start < 0 or start + size > dim for start, size, dim in zip(offset, source.shape, shape)):
            raise ValueError(f"the shard of {key!r} at offset {list(offset)} with shape {list(source.shape)} "
                             f"does not fit in the value's shape {list(shape)}")
        if source.nbytes:  # an empty box covers nothing: the ranks past an uneven split hold one each
            sources.append(source)
    return sources


def prepare_source(key: str, value: Any) -> Source:
    """One :class:`Source` for ``value`` (the key is not checked here; see :func:`prepare_sources`)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return Source(key, SourceKind.BYTES, data, BYTES_DTYPE, (), len(data))
    if isinstance(value, str):
        raise TypeError(f"the value of {key!r} is a str; encode it to bytes first")
    if _is_snapshot_source(value):
        live = value._snapshot_array()
        try:
            dtype = _encode(live.dtype)
        except TypeError as exc:
            raise TypeError(f"cannot save {key!r}: {exc}") from None
        if type(live) is np.ndarray:  # the usual case, without a generator per value
            return Source(key, SourceKind.HOLDER, value, dtype, live.shape, live.nbytes)
        shape = tuple(int(dim) for dim in live.shape)
        nbytes = math.prod(shape) * live.dtype.itemsize
        return Source(key, SourceKind.HOLDER, value, dtype, shape, nbytes, off_host=not isinstance(live, np.ndarray))
    array = _owned_copy(key, value)
    return Source(key, SourceKind.ARRAY, array, _encode(array.dtype), tuple(array.shape), array.nbytes)


def prepare_sources(entries: Sequence[SaveEntry]) -> list[Source]:
    """Validate ``entries`` and freeze what can be frozen now.

    ``bytes`` are taken as they are and arrays are copied; snapshot sources are only inspected
    (dtype and shape of their live array). A :class:`~asyncckpt.shards.ShardedValue` becomes one
    item per shard plus its declaration (``asyncckpt.shards`` names them), so one entry may give
    several sources. Raises ``ValueError`` for a duplicate, empty or
    reserved key and ``TypeError`` for an unsupported value or dtype, naming the key.
    """
    sources: list[Source] = []
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, SaveEntry):
            raise TypeError(f"expected SaveEntry objects, got {type(entry).__name__}")
        key = entry.key
        _check_key(key)
        if key in seen:
            raise ValueError(f"duplicate checkpoint key {key!r}")
        seen.add(key)
        if isinstance(entry.source, ShardedValue):
            sources.extend(_shard_sources(key, entry.source))
        else:
            sources.append(prepare_source(key, entry.source))
    return sources


def host_bytes(array: Any, start: int, stop: int) -> memoryview:
    """Bytes ``[start, stop)`` of ``array``'s C-order little-endian representation.

    A view for C-contiguous little-endian host arrays; otherwise only the elements covering the
    range are copied (device arrays: only that range crosses to the host).
    """
    if _arrays.is_device_array(array):
        cupy = _arrays.cupy_module()
        flat = cupy.ascontiguousarray(array).reshape(-1).view(cupy.uint8)
        return memoryview(cupy.asnumpy(flat[start:stop]))
    array = np.asarray(array)
    little = dtype_from_string(_encode(array.dtype))
    if array.flags.c_contiguous and array.dtype == little:
        return memoryview(array.reshape(-1).view(np.uint8))[start:stop]
    itemsize = array.dtype.itemsize
    first, last = start // itemsize, -(-stop // itemsize)
    elements = array.reshape(-1)[first:last] if array.flags.c_contiguous else array.flat[first:last]
    part = np.ascontiguousarray(elements, dtype=little).view(np.uint8)
    base = first * itemsize
    return memoryview(part)[start - base : stop - base]


