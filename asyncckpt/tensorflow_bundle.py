"""Pure: TensorFlow's TensorBundle checkpoints as data -- the ``P.index`` table and the protos in it.

A TensorFlow checkpoint at prefix ``P`` is ``P.index``, a LevelDB-style sorted table (footer,
index block, data blocks of prefix-compressed keys, each block checked by a masked CRC-32C), and
``P.data-NNNNN-of-NNNNN`` files of raw tensor bytes. Each key of the table is a tensor name; its
value is a serialised ``BundleEntryProto`` (dtype, shape, which data file, offset, size, masked
CRC-32C, and the slices of a partitioned variable); the empty key holds the ``BundleHeaderProto``.
A TF2 checkpoint also holds its object graph, a ``TrackableObjectGraph`` proto, as the string
tensor ``_CHECKPOINTABLE_OBJECT_GRAPH``.

Everything is decoded here by hand -- a small protobuf wire decoder for exactly these messages --
so reading a TensorFlow checkpoint needs neither TensorFlow nor the protobuf runtime. The files
are untrusted: every malformed byte is a :class:`~asyncckpt.errors.CorruptCheckpointError` naming
the file, never another exception, and nothing is allocated beyond what the file holds.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np

from asyncckpt.dtypes import dtype_from_string
from asyncckpt.errors import CorruptCheckpointError, UnsupportedFormatError
from asyncckpt.format import TENSORFLOW_TABLE_MAGIC

__all__ = [
    "OBJECT_GRAPH_KEY",
    "BundleEntry",
    "Slice",
    "unmask",
    "read_table",
    "parse_header",
    "parse_entry",
    "parse_object_graph",
    "slice_key",
    "decode_strings",
    "string_frame_crc",
    "data_file_name",
    "numpy_dtype_of",
    "manifest_dtype",
]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_FOOTER_BYTES = 48
_BLOCK_TRAILER_BYTES = 5
_MASK_DELTA = 0xA282EAD8

#: TensorFlow DataType enum -> the manifest dtype string asyncckpt stores it as.
_DTYPES = {
    1: "<f4", 2: "<f8", 3: "<i4", 4: "|u1", 5: "<i2", 6: "|i1", 8: "<c8", 9: "<i8", 10: "|b1",
    14: "bfloat16", 17: "<u2", 18: "<c16", 19: "<f2", 22: "<u4", 23: "<u8",
}
DT_STRING = 7
_UNSUPPORTED = {20: "resource", 21: "variant"}


class _Corrupt(Exception):
    """A decoding failure, reported by the caller as a CorruptCheckpointError naming the file."""


def unmask(masked: int) -> int:
    """The CRC-32C a LevelDB/TensorFlow masked checksum stands for."""
    rotated = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Varints and the protobuf wire format


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise _Corrupt("a truncated or overlong varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of each field of a serialised message."""
    position = 0
    while position < len(data):
        tag, position = _varint(data, position)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 1:
            if position + 8 > len(data):
                raise _Corrupt("a truncated fixed64 field")
            value, position = int.from_bytes(data[position:position + 8], "little"), position + 8
        elif wire == 2:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise _Corrupt("a length-delimited field runs past its message")
            value, position = data[position:position + length], position + length
        elif wire == 5:
            if position + 4 > len(data):
                raise _Corrupt("a truncated fixed32 field")
            value, position = int.from_bytes(data[position:position + 4], "little"), position + 4
        else:
            raise _Corrupt(f"an unknown wire type {wire}")
        yield number, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(value: Any) -> str:
    if not isinstance(value, bytes):
        raise _Corrupt("a string field of the wrong wire type")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _Corrupt("a string field that is not UTF-8") from None


# ---------------------------------------------------------------------------------------------
# The table


def _block(data: bytes, offset: int, size: int) -> bytes:
    """The contents of the block at ``offset``, its trailer's checksum verified."""
    end = offset + size + _BLOCK_TRAILER_BYTES
    if end > len(data) - _FOOTER_BYTES:
        raise _Corrupt(f"a block [{offset}, {end}) past the table's data ({len(data) - _FOOTER_BYTES} bytes)")
    contents, kind = data[offset:offset + size], data[offset + size]
    masked = int.from_bytes(data[offset + size + 1:end], "little")
    if crc32c.crc32c(bytes([kind]), crc32c.crc32c(contents)) != unmask(masked):
        raise _Corrupt(f"the block at byte {offset} fails its checksum")
    if kind != 0:
        raise _Corrupt(f"the block at byte {offset} is compressed (type {kind}); TensorFlow writes bundles "
                       "uncompressed and asyncckpt reads only those")
    return contents


def _handle(data: bytes, position: int) -> tuple[int, int, int]:
    offset, position = _varint(data, position)
    size, position = _varint(data, position)
    return offset, size, position


def _entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The ``(key, value)`` pairs of a block (keys prefix-compressed between restart points)."""
    if len(block) < 4:
        raise _Corrupt("a block too short for its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * restarts
    if restarts < 1 or end < 0:
        raise _Corrupt("a block with an impossible restart count")
    position, key = 0, b""
    while position < end:
        shared, position = _varint(block, position)
        unshared, position = _varint(block, position)
        length, position = _varint(block, position)
        if shared > len(key) or position + unshared + length > end:
            raise _Corrupt("a block entry past the end of its block")
        key = key[:shared] + block[position:position + unshared]
        position += unshared
        yield key, block[position:position + length]
        position += length


def read_table(data: bytes, *, source: str) -> dict[bytes, bytes]:
    """Every ``key -> value`` of a TensorFlow table (a whole ``P.index``), checksums verified."""
    try:
        if len(data) < _FOOTER_BYTES or int.from_bytes(data[-8:], "little") != TENSORFLOW_TABLE_MAGIC:
            raise _Corrupt("not a TensorFlow table (bad magic number)")
        footer = data[-_FOOTER_BYTES:]
        _, _, position = _handle(footer, 0)  # the metaindex block: empty in a bundle
        index_offset, index_size, _ = _handle(footer, position)
        table: dict[bytes, bytes] = {}
        last = None
        for _, handle in _entries(_block(data, index_offset, index_size)):
            offset, size, _ = _handle(handle, 0)
            for key, value in _entries(_block(data, offset, size)):
                if last is not None and key <= last:
                    raise _Corrupt("keys out of order")
                table[key] = value
                last = key
        return table
    except _Corrupt as exc:
        raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint index {source}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# The protos


@dataclass(frozen=True)
class Slice:
    """One slice of a partitioned variable: ``(start, length)`` per dimension (length -1: all of it)."""

    extents: tuple[tuple[int, int], ...]

    def box(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        starts = tuple(start for start, _ in self.extents)
        sizes = tuple(dim if length < 0 else length for (_, length), dim in zip(self.extents, shape))
        return starts, sizes


@dataclass(frozen=True)
class BundleEntry:
    """A tensor of the bundle: where its bytes are and what they are."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0  # unmasked
    slices: tuple[Slice, ...] = field(default=())


def parse_header(value: bytes, *, source: str) -> tuple[int, int]:
    """``(num_shards, endianness)`` of the ``BundleHeaderProto`` (0: little-endian)."""
    try:
        shards, endianness = 1, 0
        for number, _, item in _fields(value):
            if number == 1:
                shards = _int(item)
            elif number == 2:
                endianness = _int(item)
        if not 1 <= shards <= 1 << 20:
            raise _Corrupt(f"num_shards {shards}")
        return shards, endianness
    except _Corrupt as exc:
        raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint index {source}: the header: {exc}") from None


def _shape(value: bytes) -> tuple[int, ...]:
    dims = []
    for number, _, item in _fields(value):
        if number == 2:
            size = 0  # (proto3: a size of 0 is not written)
            for inner, _, dim in _fields(_nested(bytes)(item)):
                if inner == 1:
                    size = _signed(_int(dim))
            if size < 0:
                raise _Corrupt("a shape of unknown size")
            dims.append(size)
        elif number == 3 and item:
            raise _Corrupt("a shape of unknown rank")
    if len(dims) > 64:
        raise _Corrupt(f"a shape of {len(dims)} dimensions")
    return tuple(dims)


def _slice(value: bytes) -> Slice:
    extents = []
    for number, _, item in _fields(value):
        if number == 1:
            start, length = 0, -1
            for inner, _, part in _fields(_nested(bytes)(item)):
                if inner == 1:
                    start = _signed(_int(part))
                elif inner == 2:
                    length = _signed(_int(part))
            extents.append((start, length))
    return Slice(tuple(extents))


def _message(value: bytes, schema: dict[int, tuple[str, Any]], defaults: dict[str, Any]) -> dict[str, Any]:
    """The fields of a message by ``schema`` (number -> (name, decode)); a list default collects repeats."""
    found = {name: list(default) if isinstance(default, list) else default for name, default in defaults.items()}
    for number, _, item in _fields(value):
        if number in schema:
            name, decode = schema[number]
            if isinstance(found.get(name), list):
                found[name].append(decode(item))
            else:
                found[name] = decode(item)
    return found


def _int(item: Any) -> int:
    if not isinstance(item, int):
        raise _Corrupt("a number field of the wrong wire type")
    return item


def _nested(decode):
    """``decode`` of an embedded message, refusing a field of another wire type."""
    def decoded(item: Any) -> Any:
        if not isinstance(item, bytes):
            raise _Corrupt("a message field of the wrong wire type")
        return decode(item)
    return decoded


_ENTRY = {1: ("dtype", _int), 2: ("shape", _nested(_shape)), 3: ("shard_id", _int),
          4: ("offset", lambda item: _signed(_int(item))), 5: ("size", lambda item: _signed(_int(item))),
          6: ("crc32c", lambda item: unmask(_int(item))), 7: ("slices", _nested(_slice))}


def parse_entry(value: bytes, key: str, *, source: str) -> BundleEntry:
    """The ``BundleEntryProto`` of tensor ``key``."""
    try:
        fields = _message(value, _ENTRY, {"dtype": 0, "shape": (), "slices": []})
        entry = BundleEntry(fields.pop("dtype"), fields.pop("shape"), slices=tuple(fields.pop("slices")), **fields)
        if entry.offset < 0 or entry.size < 0 or entry.offset + entry.size > 2**53:
            raise _Corrupt(f"an impossible byte range [{entry.offset}, {entry.offset + entry.size})")
        if entry.dtype in _UNSUPPORTED:
            raise UnsupportedFormatError(
                f"TensorFlow checkpoint {source}: tensor {key!r} is a {_UNSUPPORTED[entry.dtype]} tensor "
                "(DT_" + _UNSUPPORTED[entry.dtype].upper() + "), which has no meaning outside TensorFlow; asyncckpt "
                "reads numeric, boolean and string tensors")
        if entry.dtype not in _DTYPES and entry.dtype != DT_STRING:
            raise _Corrupt(f"an unknown dtype {entry.dtype}")
        if entry.dtype != DT_STRING and not entry.slices:
            expected = math.prod(entry.shape) * numpy_dtype_of(entry.dtype).itemsize
            if expected != entry.size:
                raise _Corrupt(f"{entry.size} bytes for a {list(entry.shape)} tensor of {expected} bytes")
        return entry
    except _Corrupt as exc:
        raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint index {source} (key {key!r}): {exc}") from None


def numpy_dtype_of(tf_dtype: int) -> np.dtype:
    return dtype_from_string(_DTYPES[tf_dtype])


def manifest_dtype(tf_dtype: int) -> str:
    """The asyncckpt dtype string of a TensorFlow dtype (``"bytes"`` for strings)."""
    return "bytes" if tf_dtype == DT_STRING else _DTYPES[tf_dtype]


def data_file_name(stem: str, shard: int, shards: int) -> str:
    return f"{stem}.data-{shard:05d}-of-{shards:05d}"


_CHILD = {1: ("node_id", _int), 2: ("local_name", _text)}
_ATTRIBUTE = {1: ("name", _text), 2: ("full_name", _text), 3: ("checkpoint_key", _text)}
_SLOT = {1: ("original_variable_node_id", _int), 2: ("slot_name", _text), 3: ("slot_variable_node_id", _int)}
_NODE = {
    1: ("children", _nested(lambda item: _message(item, _CHILD, {"node_id": 0, "local_name": ""}))),
    2: ("attributes", _nested(lambda item: _message(item, _ATTRIBUTE, {"name": "", "full_name": "",
                                                                        "checkpoint_key": ""}))),
    3: ("slot_variables", _nested(lambda item: _message(item, _SLOT, {"original_variable_node_id": 0, "slot_name": "",
                                                                       "slot_variable_node_id": 0}))),
}


def parse_object_graph(value: bytes, *, source: str) -> dict:
    """A serialised ``TrackableObjectGraph`` as asyncckpt's object-graph JSON (the same fields)."""
    try:
        nodes = []
        for number, _, node_bytes in _fields(value):
            if number == 1:
                nodes.append(_nested(lambda item: _message(item, _NODE, {"children": [], "attributes": [],
                                                                          "slot_variables": []}))(node_bytes))
        return {"nodes": nodes}
    except _Corrupt as exc:
        raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint {source}: its object graph: {exc}") from None


def _length_integers(lengths) -> bytes:
    """String lengths as TensorFlow checksums them: little-endian uint32s (uint64 from 4 GiB on)."""
    return b"".join(struct.pack("<I" if length < 1 << 32 else "<Q", length) for length in lengths)


def string_frame_crc(data: bytes, strings: list[bytes]) -> int:
    """The entry CRC-32C of a string tensor stored as ``data``: its lengths as integers, then the
    lengths' masked checksum and the bytes (the rest of the frame after the varints)."""
    return crc32c.crc32c(data[len(data) - sum(map(len, strings)) - 4:],
                         crc32c.crc32c(_length_integers(map(len, strings))))


def decode_strings(data: bytes, count: int, *, what: str) -> list[bytes]:
    """The ``count`` strings of a ``DT_STRING`` tensor's stored bytes: varint lengths, their masked
    CRC-32C (over the lengths as little-endian uint32s, uint64 for a string of 4 GiB or more), then
    the bytes."""
    try:
        lengths, position = [], 0
        for _ in range(count):
            length, position = _varint(data, position)
            lengths.append(length)
        if position + 4 > len(data):
            raise _Corrupt("the string lengths' checksum is missing")
        masked = int.from_bytes(data[position:position + 4], "little")
        position += 4
        if crc32c.crc32c(_length_integers(lengths)) != unmask(masked):
            raise _Corrupt("the string lengths fail their checksum")
        strings = []
        for length in lengths:
            if position + length > len(data):
                raise _Corrupt("a string past the end of its tensor")
            strings.append(bytes(data[position:position + length]))
            position += length
        return strings
    except _Corrupt as exc:
        raise CorruptCheckpointError(f"corrupt TensorFlow checkpoint: {what}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Keys of the slices of a partitioned variable (TensorFlow's "ordered code")


def _ordered_string(text: bytes) -> bytes:
    return text.replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff") + b"\x00\x01"


def _ordered_unsigned(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
    return bytes([len(body)]) + body


#: The bits that lead a signed number's encoding of each length (one to ten bytes).
_HEADERS = [0, 0x80, 0xC000, 0xE00000, 0xF0000000, 0xF8 << 32, 0xFC << 40, 0xFE << 48, 0xFF << 56,
            0xFF80 << 56, 0xFFC0 << 64]


def _ordered_signed(value: int) -> bytes:
    magnitude = ~value if value < 0 else value
    length = 1
    while length < 10 and magnitude >= 1 << (7 * length - 1):  # 7 bits a byte, one of them the sign
        length += 1
    body = value & ((1 << (8 * length)) - 1)
    return (body ^ _HEADERS[length]).to_bytes(length, "big")


def slice_key(name: str, piece: Slice) -> bytes:
    """The table key TensorFlow stores slice ``piece`` of variable ``name`` under."""
    key = _ordered_unsigned(0) + _ordered_string(name.encode("utf-8")) + _ordered_unsigned(len(piece.extents))
    for start, length in piece.extents:
        key += _ordered_signed(start) + _ordered_signed(length)
    return key



# ---------------------------------------------------------------------------------------------
# Writing: the same structures the other way (for checkpoints TensorFlow reads)

#: manifest dtype string -> TensorFlow DataType enum.
TF_DTYPES = {text: number for number, text in _DTYPES.items()}
_BLOCK_BYTES = 4096
_RESTART_INTERVAL = 16


def mask(crc: int) -> int:
    """TensorFlow's (and LevelDB's) masked form of a CRC-32C."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, value: int | bytes, wire: int | None = None) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return _put_varint(number << 3 | 2) + _put_varint(len(value)) + bytes(value)
    if wire == 5:
        return _put_varint(number << 3 | 5) + value.to_bytes(4, "little")
    return _put_varint(number << 3) + _put_varint(value & 0xFFFFFFFFFFFFFFFF)


def encode_header(shards: int = 1) -> bytes:
    """A ``BundleHeaderProto``: ``shards`` data files, little-endian, version producer 1."""
    return _field(1, shards) + _field(3, _field(1, 1))


def encode_entry(tf_dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int, shard: int = 0) -> bytes:
    """A ``BundleEntryProto`` for a tensor of ``size`` bytes at ``offset`` of data file ``shard``."""
    dims = b"".join(_field(2, _field(1, dim) if dim else b"") for dim in shape)
    entry = _field(1, tf_dtype) + _field(2, dims)
    if shard:
        entry += _field(3, shard)
    if offset:
        entry += _field(4, offset)
    if size:
        entry += _field(5, size)
    return entry + _field(6, mask(crc), wire=5)


def encode_strings(strings: list[bytes]) -> tuple[bytes, int]:
    """``(stored bytes, entry CRC-32C)`` of a string tensor, framed as TensorFlow frames it."""
    lengths = b"".join(_put_varint(len(s)) for s in strings)
    length_crc = mask(crc32c.crc32c(_length_integers(map(len, strings)))).to_bytes(4, "little")
    data = lengths + length_crc + b"".join(strings)
    return data, string_frame_crc(data, strings)


def encode_object_graph(graph: dict) -> bytes:
    """asyncckpt's object-graph JSON as a serialised ``TrackableObjectGraph``."""
    out = bytearray()
    for node in graph.get("nodes", []):
        body = bytearray()
        for child in node.get("children", []):
            body += _field(1, _field(1, int(child["node_id"])) + _field(2, str(child["local_name"]).encode()))
        for attribute in node.get("attributes", []):
            body += _field(2, _field(1, str(attribute["name"]).encode())
                           + _field(2, str(attribute.get("full_name", "")).encode())
                           + _field(3, str(attribute["checkpoint_key"]).encode()))
        for slot in node.get("slot_variables", []):
            body += _field(3, _field(1, int(slot["original_variable_node_id"]))
                           + _field(2, str(slot["slot_name"]).encode())
                           + _field(3, int(slot["slot_variable_node_id"])))
        out += _field(1, bytes(body))
    return bytes(out)


def _put_block(out: bytearray, entries: list[tuple[bytes, bytes]]) -> tuple[int, int]:
    """Append a block of ``entries`` (prefix-compressed, restart points) and its trailer; its handle."""
    block, restarts, last = bytearray(), [], b""
    for number, (key, value) in enumerate(entries):
        if number % _RESTART_INTERVAL == 0:
            restarts.append(len(block))
            shared = 0
        else:
            shared = 0
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        block += _put_varint(shared) + _put_varint(len(key) - shared) + _put_varint(len(value))
        block += key[shared:] + value
        last = key
    for restart in restarts or [0]:
        block += restart.to_bytes(4, "little")
    block += len(restarts or [0]).to_bytes(4, "little")
    offset = len(out)
    out += block + b"\x00" + mask(crc32c.crc32c(b"\x00", crc32c.crc32c(bytes(block)))).to_bytes(4, "little")
    return offset, len(block)


def build_table(items: list[tuple[bytes, bytes]]) -> bytes:
    """A TensorFlow table of ``items`` (keys sorted bytewise, unique): data blocks, index, footer."""
    out, index, pending, size = bytearray(), [], [], 0
    for key, value in items:
        pending.append((key, value))
        size += len(key) + len(value) + 8
        if size >= _BLOCK_BYTES:
            offset, length = _put_block(out, pending)
            index.append((pending[-1][0], _put_varint(offset) + _put_varint(length)))
            pending, size = [], 0
    if pending:
        offset, length = _put_block(out, pending)
        index.append((pending[-1][0], _put_varint(offset) + _put_varint(length)))
    meta_offset, meta_length = _put_block(out, [])
    index_offset, index_length = _put_block(out, index)
    handles = _put_varint(meta_offset) + _put_varint(meta_length) + _put_varint(index_offset) + _put_varint(index_length)
    return bytes(out) + handles.ljust(40, b"\x00") + TENSORFLOW_TABLE_MAGIC.to_bytes(8, "little")
