"""Reading a TensorFlow checkpoint (TensorBundle) as if it were ours, without TensorFlow.

:func:`tensorflow_parts` decodes ``P.index`` (:mod:`asyncckpt.tensorflow_bundle`) into the same
in-memory manifest an asyncckpt checkpoint has: a record per tensor whose one extent is its
``[offset, offset + size)`` in ``P.data-NNNNN-of-NNNNN`` with TensorFlow's own CRC-32C, and a
partitioned variable as a sharded record of its slices. So ``read.TensorFlowReader`` reads,
verifies, reshards and restores with the same executor as an asyncckpt checkpoint. String
tensors are read apart: TensorFlow frames them (lengths, their checksum, then the bytes) and
checksums the frame its own way. The object graph of a TF2 checkpoint comes from its
``_CHECKPOINTABLE_OBJECT_GRAPH`` tensor; a TF1 checkpoint has none (:attr:`name_based`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncckpt import tensorflow_bundle as bundle
from asyncckpt.errors import CorruptCheckpointError, UnsupportedFormatError
from asyncckpt.format import BYTES_DTYPE, OBJECT_GRAPH_KEY, Extent, Manifest, ShardedRecord, TensorRecord
from asyncckpt.io.storage import Backend
from asyncckpt.shards import Box, tiling_problem

__all__ = ["TensorFlowParts", "tensorflow_parts", "string_tensor"]

#: The largest string tensor read (its frame is read whole to check it).
MAX_STRING_TENSOR_BYTES = 256 << 20


async def string_tensor(backend: Backend, path: str, key: str, entry: bundle.BundleEntry, stem: str,
                         shards: int) -> Any:
    """Read and check TensorFlow's frame of a string tensor: ``bytes`` for a scalar, else an object array."""
    problem = None
    file = bundle.data_file_name(stem, entry.shard_id, shards)
    if entry.size > MAX_STRING_TENSOR_BYTES:
        problem = f"claims {entry.size} bytes for string tensor {key!r}"
    else:
        found = await backend.holds(file, entry.offset + entry.size)
        if found is None:
            problem = "is missing"
        elif not found:
            problem = f"is truncated: the bytes of {key!r} end at {entry.offset + entry.size}, past its end"
    if problem is not None:
        raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint {path}: key {key!r}: data file "
                                     f"{backend.describe(file)} {problem}")
    data = await backend.read(file, entry.offset, entry.offset + entry.size) if entry.size else b""
    count = math.prod(entry.shape)
    strings = bundle.decode_strings(data, count, what=f"{path}: string tensor {key!r}")
    checked = bundle.string_frame_crc(data, strings)
    if checked != entry.crc32c:
        raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint {path}: key {key!r}: data file "
                                     f"{backend.describe(file)} fails its checksum (crc32c {checked:#010x}, "
                                     f"the index says {entry.crc32c:#010x})")
    if not entry.shape:
        return strings[0]
    array = np.empty(count, dtype=object)
    array[:] = strings
    return array.reshape(entry.shape)


def _records(table: dict[bytes, bytes], stem: str, shards: int, source: str):
    """``(tensors, string entries, object graph entry)`` of a decoded table."""
    tensors: dict[str, Any] = {}
    strings: dict[str, bundle.BundleEntry] = {}
    graph = None
    for raw_key, value in table.items():
        if not raw_key or raw_key.startswith(b"\x00"):
            continue  # the header; the slices of partitioned variables (found from their variable)
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint index {source}: a key is not UTF-8") from None
        entry = bundle.parse_entry(value, key, source=source)
        if not 0 <= entry.shard_id < shards:
            raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint index {source} (key {key!r}): data file "
                                         f"{entry.shard_id} of {shards}")
        if key == OBJECT_GRAPH_KEY:
            graph = entry
            continue
        if entry.dtype == bundle.DT_STRING:
            if entry.slices:
                raise UnsupportedFormatError(f"TensorFlow checkpoint {source}: {key!r} is a partitioned string "
                                             "variable, which asyncckpt does not read")
            strings[key] = entry
            tensors[key] = TensorRecord(BYTES_DTYPE, entry.shape, entry.size, entry.crc32c, ())
            continue
        dtype = bundle.manifest_dtype(entry.dtype)
        if entry.slices:
            tensors[key] = _sliced(table, key, entry, dtype, stem, shards, source)
        else:
            tensors[key] = _record(entry, dtype, stem, shards)
    return tensors, strings, graph


def _record(entry: bundle.BundleEntry, dtype: str, stem: str, shards: int) -> TensorRecord:
    file = bundle.data_file_name(stem, entry.shard_id, shards)
    extents = (Extent(file, entry.offset, entry.size, entry.crc32c),) if entry.size else ()
    crc = entry.crc32c if entry.size else 0
    return TensorRecord(dtype, entry.shape, entry.size, crc, extents)


def _sliced(table, key, entry, dtype, stem, shards, source) -> ShardedRecord:
    """A partitioned variable: each slice a shard of the whole (the reader reassembles them)."""
    pieces = []
    for piece in entry.slices:
        value = table.get(bundle.slice_key(key, piece))
        if value is None or len(piece.extents) != len(entry.shape):
            raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint index {source} (key {key!r}): a slice "
                                         "it lists is missing")
        part = bundle.parse_entry(value, key, source=source)
        offset, shape = piece.box(entry.shape)
        if part.dtype != entry.dtype or part.shape != shape:
            raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint index {source} (key {key!r}): slice at "
                                         f"{list(offset)} is {list(part.shape)}, not {list(shape)}")
        pieces.append((offset, _record(part, dtype, stem, shards)))
    pieces.sort(key=lambda item: item[0])
    problem = tiling_problem(entry.shape, [Box(offset, record.shape) for offset, record in pieces])
    if problem is not None:
        raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint index {source} (key {key!r}): {problem}")
    return ShardedRecord(dtype, entry.shape, tuple(pieces))


@dataclass(frozen=True)
class TensorFlowParts:
    """What a reader of a TensorFlow checkpoint needs beyond a manifest: its string tensors, its
    number of data files, whether it is name-based (TF1: no object graph) and the graph's proto."""

    manifest: Manifest
    strings: Mapping[str, bundle.BundleEntry]
    shards: int
    name_based: bool
    graph_proto: bytes


async def tensorflow_parts(path: str, data: bytes, backend: Backend, stem: str, source: str) -> TensorFlowParts:
    """Decode the TensorFlow checkpoint whose ``P.index`` is ``data`` into a manifest and the rest."""
    table = bundle.read_table(data, source=source)
    if b"" not in table:
        raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint index {source}: it has no header")
    shards, endianness = bundle.parse_header(table[b""], source=source)
    if endianness != 0:
        raise UnsupportedFormatError(f"TensorFlow checkpoint {source} is big-endian; asyncckpt reads "
                                     "little-endian bundles only")
    tensors, strings, graph_entry = _records(table, stem, shards, source)
    graph: dict = {"nodes": [{}]}
    serialized = b""
    if graph_entry is not None:
        serialized = await string_tensor(backend, path, OBJECT_GRAPH_KEY, graph_entry, stem, shards)
        if not isinstance(serialized, bytes):
            raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint {source}: its object graph is not a scalar")
        graph = bundle.parse_object_graph(serialized, source=source)
    return TensorFlowParts(Manifest(stem, graph, tensors), strings, shards, graph_entry is None, serialized)
