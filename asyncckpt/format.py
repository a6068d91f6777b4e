"""The on-disk format as pure data: the manifest schema, its own checksum, strict parsing.

Nothing here touches storage (file names are in :mod:`asyncckpt.naming`). A checkpoint at path ``P`` is

* ``P.data-<nonce>/`` -- a directory of data files holding raw little-endian tensor bytes, and
* ``P.index`` -- the JSON manifest, written last; its presence is the commit marker.

See ``docs/format.md`` for the full specification. The manifest is untrusted input: ``parse_manifest``
checks every field and raises :class:`~asyncckpt.errors.CorruptCheckpointError` (or
:class:`~asyncckpt.errors.UnsupportedFormatError` for an unknown ``format_version``) for anything it
does not accept, never another exception.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import crc32c
import numpy as np

from asyncckpt.dtypes import dtype_from_string, dtype_string
from asyncckpt.errors import CorruptCheckpointError, UnsupportedFormatError
from asyncckpt.naming import is_plain_name
from asyncckpt.shards import MAX_SHARDS, SHARD_SEPARATOR, Box, parse_item_key, tiling_problem

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "OBJECT_GRAPH_KEY",
    "BYTES_DTYPE",
    "MAX_BYTES",
    "MAX_NDIM",
    "TensorSpec",
    "Extent",
    "TensorRecord",
    "ShardedRecord",
    "SHARDED_FORMAT_VERSION",
    "fold_shards",
    "Manifest",
    "MANIFEST_CRC_FIELD",
    "seal_manifest",
    "MAX_INDEX_BYTES",
    "encode_dtype",
    "decode_dtype",
    "parse_manifest",
    "TENSORFLOW_TABLE_MAGIC",
    "is_tensorflow_index",
    "is_own_manifest",
    "OWN_MANIFEST_HEAD_BYTES",
    "read_data_dirs",
    "MAX_DATA_DIRS",
    "SECTION_FORMAT_NAME",
    "Section",
    "parse_section",
    "object_graph_bytes",
]

FORMAT_NAME = "asyncckpt"
FORMAT_VERSION = 1
#: The version of a manifest holding a sharded value (a :class:`ShardedRecord`); one without any
#: is written as version 1, exactly as before, so older readers still read it.
SHARDED_FORMAT_VERSION = 2
_READABLE_VERSIONS = (FORMAT_VERSION, SHARDED_FORMAT_VERSION)
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
BYTES_DTYPE = "bytes"
#: The largest ``P.index`` a reader accepts (~1 million tensors): a larger one is refused before it
#: is read, so a corrupt or hostile file cannot make a reader allocate without bound.
MAX_INDEX_BYTES = 256 << 20
# Every size and offset in a manifest must fit in a double exactly (so readers in any language can
# hold it) and in an int64 (so storage APIs accept it). Larger values are rejected as corrupt.
MAX_BYTES = 2**53
MAX_NDIM = 64
#: The most data directories one manifest may name (one per worker of a multi-worker save).
MAX_DATA_DIRS = 65536
#: The ``format`` of a section manifest: one worker's part of a multi-worker save, before the merge.
SECTION_FORMAT_NAME = "asyncckpt-section"

# The manifest's own checksum: every manifest begins with exactly these bytes, then the decimal
# CRC-32C of all bytes after the comma that follows it (see ``seal_manifest``).
MANIFEST_CRC_FIELD = "manifest_crc32c"
_MANIFEST_HEADER = f'{{"{MANIFEST_CRC_FIELD}":'.encode("ascii")
_MANIFEST_HEADER_RE = re.compile(re.escape(_MANIFEST_HEADER) + rb"(0|[1-9][0-9]{0,9}),")
#: How many leading bytes of a ``P.index`` :func:`is_own_manifest` needs to recognise one of ours.
OWN_MANIFEST_HEAD_BYTES = len(_MANIFEST_HEADER)
#: The last 8 bytes of a TensorFlow ``P.index`` (a LevelDB-style table: its footer's magic number).
TENSORFLOW_TABLE_MAGIC = 0xDB4775248B80FB57
_TENSORFLOW_MAGIC_BYTES = TENSORFLOW_TABLE_MAGIC.to_bytes(8, "little")
_TENSORFLOW_FOOTER_BYTES = 48

DType = Union[np.dtype, str]


# ---------------------------------------------------------------------------------------------
# Telling our files from others'


def is_tensorflow_index(data: bytes) -> bool:
    """Whether ``data`` is a TensorFlow TensorBundle index: a table ending in its footer's magic number.

    TensorFlow names its index ``P.index`` as asyncckpt does, so the two meet in one directory;
    the magic lets every reader say what the file is instead of failing to parse it.
    """
    return len(data) >= _TENSORFLOW_FOOTER_BYTES and data[-8:] == _TENSORFLOW_MAGIC_BYTES


def is_own_manifest(data: bytes) -> bool:
    """Whether ``data`` (a whole ``P.index``, or its first ``OWN_MANIFEST_HEAD_BYTES``) is ours.

    Every manifest asyncckpt writes begins with its checksum member, so even a damaged or
    truncated one is recognised by its first bytes; an unsealed JSON document that says
    ``"format": "asyncckpt"`` counts too. Anything else at a checkpoint path belongs to someone
    else, and asyncckpt neither replaces nor deletes it.
    """
    if data.startswith(_MANIFEST_HEADER):
        return True
    try:
        document = _load_json(data)
    except _Invalid:
        return False
    return isinstance(document, dict) and document.get("format") == FORMAT_NAME


def _refuse_tensorflow_index(data: bytes, source: str) -> None:
    if is_tensorflow_index(data):
        raise UnsupportedFormatError(
            f"{source} is a TensorFlow checkpoint (a TensorBundle index, written by tf.train.Checkpoint), "
            "not an asyncckpt checkpoint: asyncckpt cannot read TensorFlow checkpoints"
        )


# ---------------------------------------------------------------------------------------------
# Data types and specs


def encode_dtype(dtype: Any) -> str:
    """The manifest string of a dtype (``"<f4"``, ``"bfloat16"``) or of ``"bytes"``; ``TypeError`` if unstorable."""
    if isinstance(dtype, str) and dtype == BYTES_DTYPE:
        return BYTES_DTYPE
    return dtype_string(dtype)


def decode_dtype(text: str) -> DType:
    """The inverse of :func:`encode_dtype`; ``ValueError`` for a string outside the allowlist."""
    if text == BYTES_DTYPE:
        return BYTES_DTYPE
    return dtype_from_string(text)


@dataclass(frozen=True)
class TensorSpec:
    """What a checkpoint records about one key: ``dtype`` (a NumPy dtype or ``"bytes"``) and ``shape``."""

    dtype: DType
    shape: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class Extent:
    """A run of a tensor's bytes: ``length`` bytes at ``offset`` in data file ``file``.

    ``dir`` indexes the manifest's data directories (:attr:`Manifest.all_data_dirs`); 0, the
    manifest's ``data_dir``, is the only one a single writer uses and is not written out.
    """

    file: str
    offset: int
    length: int
    crc32c: int
    dir: int = 0

    def to_json(self) -> dict:
        document = {"file": self.file, "offset": self.offset, "length": self.length, "crc32c": self.crc32c}
        if self.dir:
            document["dir"] = self.dir
        return document


@dataclass(frozen=True)
class TensorRecord:
    """A manifest entry. ``extents`` concatenated in order are the tensor's C-order bytes."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    crc32c: int
    extents: tuple[Extent, ...]

    @functools.cached_property
    def spec(self) -> TensorSpec:
        return TensorSpec(decode_dtype(self.dtype), self.shape)

    def to_json(self) -> dict:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "crc32c": self.crc32c,
            "extents": [extent.to_json() for extent in self.extents],
        }


@dataclass(frozen=True)
class ShardedRecord:
    """A manifest entry for a value stored as shards: its global dtype and shape, and every shard.

    ``shards`` pairs each shard's offset in the global array with a :class:`TensorRecord` of the
    shard itself (its shape, bytes and checksums). The shards tile the global shape exactly.
    """

    dtype: str
    shape: tuple[int, ...]
    shards: tuple[tuple[tuple[int, ...], TensorRecord], ...]

    @functools.cached_property
    def spec(self) -> TensorSpec:
        return TensorSpec(decode_dtype(self.dtype), self.shape)

    @property
    def nbytes(self) -> int:
        return sum(record.nbytes for _, record in self.shards)

    @property
    def extents(self) -> tuple[Extent, ...]:
        """Every shard's extents, shard after shard (what must exist for the value to be whole)."""
        return tuple(extent for _, record in self.shards for extent in record.extents)

    @property
    def boxes(self) -> tuple[Box, ...]:
        return tuple(Box(offset, record.shape) for offset, record in self.shards)

    def to_json(self) -> dict:
        shards = []
        for offset, record in self.shards:
            shard = record.to_json()
            del shard["dtype"]
            shards.append({"offset": list(offset), **shard})
        return {"dtype": self.dtype, "shape": list(self.shape), "shards": shards}


def fold_shards(items: Mapping[str, TensorRecord]) -> Mapping[str, TensorRecord | ShardedRecord]:
    """The manifest's tensors from the item records of a write: shard items folded into their value.

    A sharded value travels through planning, sections and merging as one *declaration* item
    (no bytes) and one item per shard (``asyncckpt.shards`` names them); each becomes one
    :class:`ShardedRecord` at the declaration's place. Raises ``ValueError`` naming the key when
    the shards do not tile the value exactly or disagree with it. ``items`` itself comes back
    when it holds no sharded value.
    """
    if not any(SHARD_SEPARATOR in key for key in items):
        return items
    folded: dict[str, Any] = {}
    declared: dict[str, tuple[str, tuple[int, ...]]] = {}
    shards: dict[str, list] = {}
    for item, record in items.items():
        parsed = parse_item_key(item)
        if parsed is None:
            folded[item] = record
            continue
        key, dtype, shape, offset = parsed
        if offset is None:
            if key in declared and declared[key] != (dtype, shape):
                raise ValueError(f"key {key!r} is saved as {declared[key][0]}{list(declared[key][1])} and as "
                                 f"{dtype}{list(shape)}")
            declared[key] = (dtype, shape)
            folded.setdefault(key, None)
            continue
        if record.dtype != dtype:
            raise ValueError(f"the shard of key {key!r} at {list(offset)} is {record.dtype}, the value {dtype}")
        shards.setdefault(key, []).append((dtype, shape, offset, record))
    for key, pieces in shards.items():
        if key not in declared:
            raise ValueError(f"shards of key {key!r} were saved, but no rank declared the value")
        dtype, shape = declared[key]
        if any((piece[0], piece[1]) != (dtype, shape) for piece in pieces):
            raise ValueError(f"the shards of key {key!r} disagree on its dtype or global shape")
    for key, (dtype, shape) in declared.items():
        pieces = sorted(shards.get(key, ()), key=lambda piece: piece[2])
        boxes = [Box(offset, record.shape) for _, _, offset, record in pieces]
        problem = tiling_problem(shape, boxes)
        if problem is not None:
            raise ValueError(f"the shards of key {key!r} do not tile it: {problem}")
        folded[key] = ShardedRecord(dtype, shape, tuple((offset, record) for _, _, offset, record in pieces))
    return folded


@dataclass(frozen=True)
class Manifest:
    """A parsed ``P.index``: the data directory, the caller's object graph and the tensor records.

    ``data_dirs`` is empty for a checkpoint written by one writer. A checkpoint merged from the
    sections of several workers lists every data directory there, ``data_dir`` first, and each
    extent names its directory by position (:attr:`Extent.dir`).
    """

    data_dir: str
    object_graph: dict
    tensors: Mapping[str, TensorRecord]
    data_dirs: tuple[str, ...] = ()

    @property
    def all_data_dirs(self) -> tuple[str, ...]:
        """Every data directory the manifest references, ``data_dir`` first."""
        return self.data_dirs or (self.data_dir,)

    @property
    def sharded(self) -> bool:
        return any(type(record) is ShardedRecord for record in self.tensors.values())

    def folded(self) -> Manifest:
        """This manifest with the items of its sharded values folded (:func:`fold_shards`)."""
        tensors = fold_shards(self.tensors)
        if tensors is self.tensors:
            return self
        return Manifest(self.data_dir, self.object_graph, tensors, self.data_dirs)

    def to_json(self, *, object_graph_json: str | None = None, tensors_json: str | None = None) -> bytes:
        """Serialise to the bytes written as ``P.index`` (UTF-8 JSON, sealed by :func:`seal_manifest`).

        ``object_graph_json`` and ``tensors_json`` are those members already encoded (by
        :func:`json_text` and :class:`TensorsJson`), which is how a save of 10,000 values avoids
        encoding them as 20,000 dicts every time.
        """
        sharded = self.sharded
        version = SHARDED_FORMAT_VERSION if sharded else FORMAT_VERSION
        head = {"format": FORMAT_NAME, "format_version": version, "data_dir": self.data_dir}
        if self.data_dirs:
            head["data_dirs"] = list(self.data_dirs)
        if object_graph_json is None:
            object_graph_json = json_text(self.object_graph)
        if sharded:
            tensors_json = json_text({key: record.to_json() for key, record in self.tensors.items()})
        elif tensors_json is None:
            tensors_json = TensorsJson(self.tensors).text(checksums_of(self.tensors))
        text = f'{json_text(head)[:-1]},"object_graph":{object_graph_json},"tensors":{tensors_json}}}'
        return seal_text(text)


def json_text(value: Any) -> str:
    """Compact JSON text, as every member of a manifest is written."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def checksums_of(records: Mapping[str, TensorRecord]) -> list[int]:
    """Each record's checksum then its extents', in order: what :meth:`TensorsJson.text` fills in."""
    return [crc for record in records.values() for crc in (record.crc32c, *(e.crc32c for e in record.extents))]


class TensorsJson:
    """The ``tensors`` member of a manifest as text, with the checksums left as holes.

    Everything in a record but its checksums is known once a write is planned and stays the same
    for every save of that plan; :meth:`text` fills in the checksums -- per record, its own then
    each extent's -- and joins the pieces.
    """

    def __init__(self, records: Mapping[str, TensorRecord]) -> None:
        fragments: list[str] = []
        extent_counts: list[int] = []
        pending = "{"
        names: dict[str, str] = {}
        for index, (key, record) in enumerate(records.items()):
            separator = "," if index else ""
            shape = ",".join(str(dim) for dim in record.shape)
            pending += (
                f'{separator}{json_text(key)}:{{"dtype":{json_text(record.dtype)},"shape":[{shape}],'
                f'"nbytes":{record.nbytes},"crc32c":'
            )
            fragments.append(pending)
            pending = ',"extents":['
            for number, extent in enumerate(record.extents):
                file = names.get(extent.file) or names.setdefault(extent.file, json_text(extent.file))
                directory = f',"dir":{extent.dir}' if extent.dir else ""
                pending += (
                    f'{"," if number else ""}{{"file":{file},"offset":{extent.offset},"length":{extent.length}'
                    f'{directory},"crc32c":'
                )
                fragments.append(pending)
                pending = "}"
            pending += "]}"
            extent_counts.append(len(record.extents))
        self._fragments = fragments
        self._tail = pending + "}"
        self.extent_counts = tuple(extent_counts)

    def text(self, crcs: Any) -> str:
        """The member's text with ``crcs`` (each record's, then its extents', in order) filled in."""
        parts = [f"{fragment}{crc}" for fragment, crc in zip(self._fragments, crcs, strict=True)]
        parts.append(self._tail)
        return "".join(parts)


@dataclass(frozen=True)
class Section:
    """One worker's part of a multi-worker save: ``P.index.section-<i>-of-<n>`` (see docs/format.md).

    ``save_id`` identifies the save the section belongs to (every worker computes the same one),
    so a section left by an earlier, crashed save is never merged into a later one.
    """

    worker: int
    count: int
    save_id: str
    data_dir: str
    tensors: Mapping[str, TensorRecord]

    def to_json(self) -> bytes:
        """The sealed bytes of the section file (same checksum scheme as a manifest)."""
        return seal_manifest({
            "format": SECTION_FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "worker": self.worker,
            "count": self.count,
            "save_id": self.save_id,
            "data_dir": self.data_dir,
            "tensors": {key: record.to_json() for key, record in self.tensors.items()},
        })


def seal_manifest(document: Mapping) -> bytes:
    """The bytes of manifest ``document``, led by its own checksum member ``manifest_crc32c``.

    The document (a JSON object; a ``manifest_crc32c`` member in it is dropped and recomputed) is
    serialised compactly as UTF-8, and ``{"manifest_crc32c":<crc>,`` replaces its opening brace,
    where ``<crc>`` is the decimal CRC-32C of every byte after that comma. A reader checks the
    checksum on the raw bytes, before trusting anything the JSON says, so a flipped byte anywhere
    in the manifest -- even in a field nothing else cross-checks -- is caught. Checking raw bytes
    rather than a re-serialised document keeps the check exact in any language: no canonical
    JSON has to be reproduced.
    """
    body = {key: value for key, value in document.items() if key != MANIFEST_CRC_FIELD}
    if not body:
        raise ValueError("a manifest needs at least one member besides its checksum")
    return seal_text(json_text(body))


def seal_text(text: str) -> bytes:
    """:func:`seal_manifest` of a document already encoded as compact JSON ``text`` (an object, not empty)."""
    rest = text.encode("utf-8", "surrogatepass")[1:]  # everything after the opening brace
    return b"%s%d,%s" % (_MANIFEST_HEADER, crc32c.crc32c(rest), rest)


def object_graph_bytes(object_graph: dict) -> bytes:
    """The UTF-8 JSON bytes exposed as the value of :data:`OBJECT_GRAPH_KEY`."""
    return json_text(object_graph).encode("utf-8", "surrogatepass")


class _Invalid(Exception):
    """Internal: a validation failure, turned into CorruptCheckpointError with context."""


def _reject_constant(name: str):
    raise _Invalid(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a double (``1e400``) is refused, not made infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise _Invalid(f"the number {text} is out of range for a double")
    return value


def _unique_object(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):  # a key given twice: name it
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise _Invalid(f"duplicate JSON object key {key!r}")
            seen.add(key)
    return result


def _load_json(data: bytes) -> Any:
    """Strict JSON: no duplicate keys, no NaN or infinities, no number too large for a double.

    A document exactly as :func:`json_text` writes it -- every manifest asyncckpt writes -- is
    parsed at C speed and encoded again: getting the very same text back proves no key was given
    twice (a dropped duplicate would be missing) and no constant or huge number was there (the
    encoder refuses them). Anything else goes through the checking hooks, which say what is wrong.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid(f"not valid UTF-8 JSON ({exc})") from exc
    try:
        document = json.loads(text)
        if json_text(document) == text:
            return document
    except (ValueError, RecursionError):
        pass
    try:
        return json.loads(
            text, object_pairs_hook=_unique_object, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except _Invalid:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Invalid(f"not valid UTF-8 JSON ({exc})") from exc


def _require_dict(value: Any, what: str, fields: set[str], optional: frozenset = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(f"{what} must be a JSON object, got {type(value).__name__}")
    missing = fields - value.keys() - optional
    if missing:
        raise _Invalid(f"{what} lacks field(s) {sorted(missing)}")
    unknown = value.keys() - fields
    if unknown:
        raise _Invalid(f"{what} has unknown field(s) {sorted(unknown)}")
    return value


def _require_int(value: Any, what: str, upper: int = MAX_BYTES) -> int:
    if type(value) is not int or not 0 <= value <= upper:
        raise _Invalid(f"{what} must be an integer in [0, {upper}], got {value!r}")
    return value


def _parse_extent(raw: Any, index: int, dirs: int = 1) -> Extent:
    what = f"extent {index}"
    raw = _require_dict(raw, what, {"file", "offset", "length", "crc32c", "dir"}, frozenset({"dir"}))
    directory = raw.get("dir", 0)
    if type(directory) is not int or not 0 <= directory < dirs:
        raise _Invalid(
            f"{what} names data directory {directory!r}, but the manifest lists {dirs} "
            f"(valid: 0..{dirs - 1})"
        )
    if not is_plain_name(raw["file"]):
        raise _Invalid(f"{what} names file {raw['file']!r}, which is not a plain file name")
    offset = _require_int(raw["offset"], f"{what} offset")
    length = _require_int(raw["length"], f"{what} length")
    if length == 0:
        raise _Invalid(f"{what} is empty")
    if offset + length > MAX_BYTES:
        raise _Invalid(f"{what} ends beyond {MAX_BYTES} bytes")
    return Extent(raw["file"], offset, length, _require_int(raw["crc32c"], f"{what} crc32c", 2**32 - 1), directory)


def _require_allocatable(shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse a shape no array can have, even an empty one.

    A zero dimension makes ``nbytes`` 0 whatever the others say, yet NumPy still refuses a shape
    whose non-zero dimensions multiply past its address space (``[0, 2**53, 2**53]``): bounding
    their product by ``MAX_BYTES`` keeps every accepted shape allocatable.
    """
    product = itemsize
    for dim in shape:
        if dim:
            product *= dim
            if product > MAX_BYTES:
                raise _Invalid(
                    f"shape {list(shape)} is too large: its non-zero dimensions hold more than {MAX_BYTES} bytes"
                )


def _parse_dtype_and_shape(raw: dict) -> tuple[DType, tuple[int, ...]]:
    try:
        dtype = decode_dtype(raw["dtype"])
    except (ValueError, TypeError) as exc:
        raise _Invalid(str(exc)) from None
    shape = raw["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise _Invalid(f"shape must be a list of at most {MAX_NDIM} integers, got {shape!r}")
    shape = tuple(_require_int(dim, "a shape dimension") for dim in shape)
    _require_allocatable(shape, 1 if dtype == BYTES_DTYPE else dtype.itemsize)
    return dtype, shape


def _parse_record(raw: Any, dirs: int = 1) -> TensorRecord:
    raw = _require_dict(raw, "the record", {"dtype", "shape", "nbytes", "crc32c", "extents"})
    dtype, shape = _parse_dtype_and_shape(raw)
    nbytes = _require_int(raw["nbytes"], "nbytes")
    if dtype == BYTES_DTYPE:
        if shape != ():
            raise _Invalid(f"a bytes value must have shape (), got {shape}")
    else:
        expected = math.prod(shape) * dtype.itemsize
        if expected != nbytes:
            raise _Invalid(f"nbytes {nbytes} does not match shape {shape} of dtype {dtype} ({expected} bytes)")
    extents_raw = raw["extents"]
    if not isinstance(extents_raw, list):
        raise _Invalid("extents must be a list")
    if len(extents_raw) > nbytes:
        raise _Invalid(f"{len(extents_raw)} extents cannot tile {nbytes} bytes")
    extents = tuple(_parse_extent(extent, i, dirs) for i, extent in enumerate(extents_raw))
    covered = sum(extent.length for extent in extents)
    if covered != nbytes:
        raise _Invalid(f"extents cover {covered} bytes but the value has {nbytes}")
    crc = _require_int(raw["crc32c"], "crc32c", 2**32 - 1)
    return TensorRecord(raw["dtype"], shape, nbytes, crc, extents)


def _check_seal(data: bytes, what: str) -> re.Match | None:
    """The checksum member leading ``data``, verified; ``None`` when there is none.

    Checked first, on the raw bytes: a corrupted byte must read as corruption, not as whatever the
    damaged JSON now says (another format_version, another size).
    """
    header = _MANIFEST_HEADER_RE.match(data)
    if header is not None:
        recorded = int(header.group(1))
        actual = crc32c.crc32c(memoryview(data)[header.end():])
        if actual != recorded:
            raise _Invalid(
                f"the {what} fails its checksum (crc32c {actual:#010x} of its bytes, "
                f"{MANIFEST_CRC_FIELD} says {recorded:#010x}): the file is damaged or was edited"
            )
    return header


@contextlib.contextmanager
def _reported(what: str, source: str):
    """Turn a validation failure into the one public error, naming ``source`` and the key if known."""
    try:
        yield
    except _Invalid as exc:
        key = getattr(exc, "key", None)
        where = f" (key {key!r})" if key is not None else ""
        raise CorruptCheckpointError(f"corrupt checkpoint {what} {source}{where}: {exc}") from None


def parse_manifest(data: bytes, *, source: str) -> Manifest:
    """Parse and validate manifest bytes read from ``source`` (a path, for error messages).

    Raises
    ------
    UnsupportedFormatError
        The manifest is an asyncckpt manifest of a ``format_version`` this release cannot read, or
        the file is a TensorFlow checkpoint index (recognised by its table magic number).
    CorruptCheckpointError
        Anything else is wrong: bytes that fail the manifest's own checksum (``manifest_crc32c``,
        checked before anything else), not JSON, missing or mistyped fields, unknown dtype, a shape that
        does not match ``nbytes``, extents that do not tile the tensor, file names that could
        escape the data directory. The message names ``source`` and, where known, the key.
    """
    _refuse_tensorflow_index(data, source)
    with _reported("manifest", source):
        header = _check_seal(data, "manifest")
        document = _load_json(data)
        if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
            raise _Invalid(f"not an {FORMAT_NAME} manifest (missing \"format\": \"{FORMAT_NAME}\")")
        version = document.get("format_version")
        if type(version) is not int:
            raise _Invalid(f"format_version must be an integer, got {version!r}")
        if version not in _READABLE_VERSIONS:
            raise UnsupportedFormatError(
                f"checkpoint manifest {source} has format_version {version}; this release of "
                f"asyncckpt reads format_version {FORMAT_VERSION} and {SHARDED_FORMAT_VERSION}"
            )
        if header is None:
            raise _Invalid(
                f"the manifest does not begin with its checksum member ({_MANIFEST_HEADER.decode()}<crc32c>,), "
                f"which format_version {FORMAT_VERSION} requires"
            )
        document = _require_dict(
            document,
            "the manifest",
            {MANIFEST_CRC_FIELD, "format", "format_version", "data_dir", "data_dirs", "object_graph", "tensors"},
            frozenset({"data_dirs"}),
        )
        if not is_plain_name(document["data_dir"]):
            raise _Invalid(f"data_dir {document['data_dir']!r} is not a plain directory name")
        data_dirs = _parse_data_dirs(document)
        if not isinstance(document["object_graph"], dict):
            raise _Invalid("object_graph must be a JSON object")
        tensors = _parse_tensors(document, max(len(data_dirs), 1), sharded=version == SHARDED_FORMAT_VERSION)
        return Manifest(document["data_dir"], document["object_graph"], tensors, data_dirs)


def _parse_data_dirs(document: dict) -> tuple[str, ...]:
    """The optional ``data_dirs`` list: plain, distinct names, ``data_dir`` first; () when absent."""
    if "data_dirs" not in document:
        return ()
    names = document["data_dirs"]
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_DATA_DIRS:
        raise _Invalid(f"data_dirs must be a list of 1 to {MAX_DATA_DIRS} directory names")
    for name in names:
        if not is_plain_name(name):
            raise _Invalid(f"data_dirs names {name!r}, which is not a plain directory name")
    if len(set(names)) != len(names):
        raise _Invalid("data_dirs names a directory twice")
    if names[0] != document["data_dir"]:
        raise _Invalid(f"data_dirs must begin with data_dir {document['data_dir']!r}, not {names[0]!r}")
    return tuple(names)


def _parse_tensors(document: dict, dirs: int, *, sharded: bool = False,
                   item_keys: bool = False) -> dict[str, TensorRecord | ShardedRecord]:
    """The records of a manifest, or (``item_keys``) of a section, whose shards are items of their own."""
    if not isinstance(document["tensors"], dict):
        raise _Invalid("tensors must be a JSON object")
    tensors = {}
    plain_files: set[str] = set()  # file names already checked: most records share a few files
    for key, raw in document["tensors"].items():
        try:
            if key == OBJECT_GRAPH_KEY:
                raise _Invalid(f"the reserved key {OBJECT_GRAPH_KEY} must not be stored as a tensor")
            if SHARD_SEPARATOR in key and not item_keys:
                raise _Invalid("a key must not contain a NUL character")
            if sharded and isinstance(raw, dict) and "shards" in raw:
                tensors[key] = _parse_sharded_record(raw, dirs)
                continue
            record = _parse_usual_record(raw, plain_files) if dirs == 1 else None
            tensors[key] = record if record is not None else _parse_record(raw, dirs)
        except _Invalid as exc:
            exc.key = key
            raise
    return tensors


def _parse_sharded_record(raw: dict, dirs: int) -> ShardedRecord:
    """A format-version-2 record of shards: each a record of its own at an offset, tiling the shape."""
    raw = _require_dict(raw, "the sharded record", {"dtype", "shape", "shards"})
    dtype, shape = _parse_dtype_and_shape(raw)
    if dtype == BYTES_DTYPE:
        raise _Invalid("a byte string cannot be sharded")
    listed = raw["shards"]
    if not isinstance(listed, list) or len(listed) > MAX_SHARDS:
        raise _Invalid(f"shards must be a list of at most {MAX_SHARDS} shards")
    shards = []
    for index, shard in enumerate(listed):
        if not isinstance(shard, dict) or "dtype" in shard:
            raise _Invalid(f"shard {index} must be a JSON object without a dtype of its own")
        fields = dict(shard)
        offset = fields.pop("offset", None)
        if not isinstance(offset, list) or len(offset) != len(shape):
            raise _Invalid(f"shard {index} needs an offset of {len(shape)} integers, got {offset!r}")
        offset = tuple(_require_int(dim, f"shard {index}'s offset") for dim in offset)
        try:
            shards.append((offset, _parse_record({"dtype": raw["dtype"], **fields}, dirs)))
        except _Invalid as exc:
            raise _Invalid(f"shard {index}: {exc}") from None
    problem = tiling_problem(shape, [Box(offset, record.shape) for offset, record in shards])
    if problem is not None:
        raise _Invalid(f"the shards do not tile the value: {problem}")
    return ShardedRecord(raw["dtype"], shape, tuple(shards))


_RECORD_FIELDS = frozenset({"dtype", "shape", "nbytes", "crc32c", "extents"})
_EXTENT_FIELDS = frozenset({"file", "offset", "length", "crc32c"})
_U32 = 2**32 - 1


def _parse_usual_record(raw: Any, plain_files: set[str]) -> TensorRecord | None:
    """:func:`_parse_record` for a record as asyncckpt writes it, checked with no more work than needed.

    Returns ``None`` at the first thing it does not expect -- the full parser then says what is
    wrong -- so a hostile manifest meets the same checks and messages either way.
    """
    if type(raw) is not dict or raw.keys() != _RECORD_FIELDS:
        return None
    text, shape, nbytes, crc, extents_raw = raw["dtype"], raw["shape"], raw["nbytes"], raw["crc32c"], raw["extents"]
    if type(shape) is not list or len(shape) > MAX_NDIM or type(nbytes) is not int or type(crc) is not int:
        return None
    if type(extents_raw) is not list or not 0 <= crc <= _U32 or not 0 <= nbytes <= MAX_BYTES:
        return None
    try:
        dtype = decode_dtype(text)
    except ValueError:
        return None
    if dtype == BYTES_DTYPE:
        if shape:
            return None
        itemsize, expected = 1, nbytes
    else:
        itemsize = dtype.itemsize
        expected = itemsize
        for dim in shape:
            if type(dim) is not int or not 0 <= dim <= MAX_BYTES:
                return None
            expected *= dim
    if expected != nbytes or len(extents_raw) > nbytes:
        return None
    if 0 in shape:
        _require_allocatable(tuple(shape), itemsize)  # the product of the other dimensions must be bounded too
    extents = []
    covered = 0
    for extent in extents_raw:
        if type(extent) is not dict or extent.keys() != _EXTENT_FIELDS:
            return None
        file, offset, length, piece_crc = extent["file"], extent["offset"], extent["length"], extent["crc32c"]
        if type(offset) is not int or type(length) is not int or type(piece_crc) is not int or type(file) is not str:
            return None
        if not (0 <= offset and 0 < length and offset + length <= MAX_BYTES and 0 <= piece_crc <= _U32):
            return None
        if file not in plain_files:
            if not is_plain_name(file):
                return None
            plain_files.add(file)
        extents.append(Extent(file, offset, length, piece_crc))
        covered += length
    if covered != nbytes:
        return None
    return TensorRecord(text, tuple(shape), nbytes, crc, tuple(extents))


def parse_section(data: bytes, *, source: str) -> Section:
    """Parse and validate a section file read from ``source`` (untrusted, like a manifest).

    Same rules as :func:`parse_manifest` (checksum first, strict fields, plain names), with the
    section's own fields: ``worker`` and ``count`` (``0 <= worker < count``), ``save_id`` (a
    string) and exactly one ``data_dir`` (an extent may not name another).

    Raises
    ------
    CorruptCheckpointError
        Naming ``source`` and, where known, the key.
    """
    with _reported("section", source):
        if _check_seal(data, "section") is None:
            raise _Invalid(f"the section does not begin with its checksum member ({_MANIFEST_HEADER.decode()}<crc32c>,)")
        document = _require_dict(
            _load_json(data),
            "the section",
            {MANIFEST_CRC_FIELD, "format", "format_version", "worker", "count", "save_id", "data_dir", "tensors"},
        )
        if document["format"] != SECTION_FORMAT_NAME or document["format_version"] != FORMAT_VERSION:
            raise _Invalid(f"not an {SECTION_FORMAT_NAME} file of format_version {FORMAT_VERSION}")
        count = _require_int(document["count"], "count", MAX_DATA_DIRS)
        worker = _require_int(document["worker"], "worker", MAX_DATA_DIRS)
        if not worker < count:
            raise _Invalid(f"worker {worker} is not below count {count}")
        if not isinstance(document["save_id"], str) or not 0 < len(document["save_id"]) <= 256:
            raise _Invalid("save_id must be a non-empty string of at most 256 characters")
        if not is_plain_name(document["data_dir"]):
            raise _Invalid(f"data_dir {document['data_dir']!r} is not a plain directory name")
        tensors = _parse_tensors(document, 1, item_keys=True)
        return Section(worker, count, document["save_id"], document["data_dir"], tensors)


def read_data_dirs(data: bytes) -> tuple[str, ...] | None:
    """Every data directory a manifest (or a section) names, or ``None`` when unreadable as one.

    Lenient, unlike :func:`parse_manifest`: debris cleanup must know what a manifest references
    even when the rest of it is from a newer format version. Names that are not plain are dropped.
    """
    try:
        document = _load_json(data)
    except _Invalid:
        return None
    if not isinstance(document, dict) or document.get("format") not in (FORMAT_NAME, SECTION_FORMAT_NAME):
        return None
    first = document.get("data_dir")
    if not is_plain_name(first):
        return None
    others = document.get("data_dirs")
    names = [first, *(others if isinstance(others, list) else ())]
    return tuple(dict.fromkeys(name for name in names if is_plain_name(name)))
