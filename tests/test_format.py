"""The manifest schema: serialisation, strict validation of untrusted input, dtypes."""

from __future__ import annotations

import copy
import json

import crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt.errors import CorruptCheckpointError, UnsupportedFormatError
from asyncckpt.format import (
    FORMAT_VERSION,
    MAX_BYTES,
    OBJECT_GRAPH_KEY,
    Extent,
    Manifest,
    TensorRecord,
    TensorSpec,
    decode_dtype,
    encode_dtype,
    object_graph_bytes,
    parse_manifest,
    read_data_dirs,
    seal_manifest,
)
from asyncckpt.naming import data_dir_name, is_plain_name

from _fakes import json_paths  # noqa: E402

NONCE = "0123456789abcdef"


def _valid_document() -> dict:
    body = np.arange(6, dtype="<f4").tobytes()
    return {
        "format": "asyncckpt",
        "format_version": 1,
        "data_dir": data_dir_name("ckpt", NONCE),
        "object_graph": {"nodes": [{"children": [{"node_id": 1, "local_name": "v"}]}]},
        "tensors": {
            "v/.ATTRIBUTES/VARIABLE_VALUE": {
                "dtype": "<f4",
                "shape": [2, 3],
                "nbytes": 24,
                "crc32c": crc32c.crc32c(body),
                "extents": [
                    {"file": "chunk-00000", "offset": 0, "length": 16, "crc32c": crc32c.crc32c(body[:16])},
                    {"file": "chunk-00001", "offset": 0, "length": 8, "crc32c": crc32c.crc32c(body[16:])},
                ],
            },
            "flag": {"dtype": "|b1", "shape": [], "nbytes": 1, "crc32c": 0,
                     "extents": [{"file": "pack-00000", "offset": 0, "length": 1, "crc32c": 0}]},
            "empty": {"dtype": "<c16", "shape": [0, 3], "nbytes": 0, "crc32c": 0, "extents": []},
            "state": {"dtype": "bytes", "shape": [], "nbytes": 3, "crc32c": 0,
                      "extents": [{"file": "pack-00000", "offset": 1, "length": 3, "crc32c": 0}]},
        },
    }


def _parse(document) -> Manifest:
    data = document if isinstance(document, bytes) else seal_manifest(document)
    return parse_manifest(data, source="/ckpt/ckpt.index")


def test_valid_manifest_parses_and_round_trips():
    manifest = _parse(_valid_document())
    record = manifest.tensors["v/.ATTRIBUTES/VARIABLE_VALUE"]
    assert record.spec == TensorSpec(np.dtype("<f4"), (2, 3))
    assert record.extents[1] == Extent("chunk-00001", 0, 8, record.extents[1].crc32c)
    assert manifest.tensors["state"].spec == TensorSpec("bytes", ())
    assert manifest.tensors["empty"].extents == ()
    assert _parse(manifest.to_json()) == manifest
    assert json.loads(manifest.to_json())["format_version"] == FORMAT_VERSION


def test_object_graph_bytes_are_utf8_json():
    graph = {"nodes": [{"name": "ünïcode"}]}
    assert json.loads(object_graph_bytes(graph).decode("utf-8")) == graph


def _mutated(path, value):
    document = _valid_document()
    target = document
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return document


_DELETE = object()
V = "v/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [
        (("format",), "tensorflow", "not an asyncckpt manifest"),
        (("format_version",), "1", "format_version must be an integer"),
        (("data_dir",), "../elsewhere", "not a plain directory name"),
        (("data_dir",), "/abs", "not a plain directory name"),
        (("data_dir",), "a\x00b", "not a plain directory name"),
        (("object_graph",), [], "object_graph must be a JSON object"),
        (("tensors",), [], "tensors must be a JSON object"),
        (("extra",), 1, "unknown field"),
        (("data_dir",), _DELETE, "lacks field"),
        (("tensors", V, "dtype"), "object", "unknown dtype 'object'"),
        (("tensors", V, "dtype"), "<f16", "unknown dtype"),
        (("tensors", V, "dtype"), ">f4", "unknown dtype"),
        (("tensors", V, "shape"), [2, -3], "shape dimension"),
        (("tensors", V, "shape"), [2, 3.0], "shape dimension"),
        (("tensors", V, "shape"), [True, 3], "shape dimension"),
        (("tensors", V, "shape"), [1] * 65, "at most 64"),
        (("tensors", V, "shape"), [2**40, 2**40], "is too large"),
        (("tensors", V, "nbytes"), 25, "does not match shape"),
        (("tensors", V, "nbytes"), MAX_BYTES + 1, "nbytes"),
        (("tensors", V, "crc32c"), 2**32, "crc32c"),
        (("tensors", V, "extents"), {}, "extents must be a list"),
        (("tensors", V, "extents", 1, "length"), 9, "extents cover 25 bytes"),
        (("tensors", V, "extents", 1, "length"), 0, "is empty"),
        (("tensors", V, "extents", 1, "offset"), -1, "offset"),
        (("tensors", V, "extents", 1, "offset"), MAX_BYTES - 4, "ends beyond"),
        (("tensors", V, "extents", 1, "file"), "../../etc/passwd", "not a plain file name"),
        (("tensors", V, "extents", 1, "file"), "/etc/passwd", "not a plain file name"),
        (("tensors", V, "extents", 1, "file"), "..", "not a plain file name"),
        (("tensors", V, "extents", 1, "file"), "sub\\dir", "not a plain file name"),
        (("tensors", V, "extents", 1, "file"), "", "not a plain file name"),
        (("tensors", V, "extents", 1, "file"), 7, "not a plain file name"),
        (("tensors", V, "extents", 1, "surplus"), 7, "unknown field"),
        (("tensors", "state", "shape"), [3], "bytes value must have shape"),
        (("tensors", OBJECT_GRAPH_KEY), {}, "reserved key"),
    ],
)
def test_invalid_manifests_are_rejected_naming_file_and_problem(path, value, pattern):
    with pytest.raises(CorruptCheckpointError, match=pattern) as info:
        _parse(_mutated(path, value))
    assert "/ckpt/ckpt.index" in str(info.value)
    assert not isinstance(info.value, UnsupportedFormatError)
    if path[0] == "tensors" and len(path) > 2:
        assert repr(path[1]) in str(info.value)


def test_unknown_format_version_is_unsupported():
    with pytest.raises(UnsupportedFormatError, match="format_version 3"):
        _parse(_mutated(("format_version",), 3))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xfe", b"not json", b"[1, 2]", b'{"format": "asyncckpt", "format_version": 1', b"[" * 100000,
     b'{"format": "asyncckpt", "format": "asyncckpt"}', b'{"x": NaN}'],
    ids=["empty", "not-utf8", "garbage", "list", "truncated", "deep", "duplicate-key", "nan"],
)
def test_unparseable_bytes_are_corrupt(data):
    with pytest.raises(CorruptCheckpointError, match="/ckpt/ckpt.index"):
        _parse(data)


# Hypothesis: whatever happens to a valid manifest, parsing raises CorruptCheckpointError
# (UnsupportedFormatError included) or returns a Manifest; never another exception.

_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
    st.text(max_size=8), st.sampled_from(["..", "/x", "<f8", "bytes", "|b1", "a/b", "\x00"]),
)
_json_value = st.recursive(_json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)


_ALL_PATHS = [p for p in json_paths(_valid_document()) if p]


_fuzzed_manifests = given(
    edits=st.lists(
        st.tuples(st.sampled_from(_ALL_PATHS), st.one_of(st.just(_DELETE), _json_value)), min_size=1, max_size=4
    ),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=2000)),
    flip=st.one_of(st.none(), st.tuples(st.integers(min_value=0, max_value=2000), st.integers(1, 255))),
)


@settings(max_examples=50, deadline=None)  # 400 in the slow twin below
@_fuzzed_manifests
def test_fuzzed_manifests_only_parse_or_raise_corrupt(edits, cut, flip):
    document = _valid_document()
    for path, value in edits:
        target = document
        try:
            for part in path[:-1]:
                target = target[part]
            if value is _DELETE:
                del target[path[-1]]
            else:
                target[path[-1]] = copy.deepcopy(value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this path
    body = json.dumps(document).encode()[1:]  # may hold Infinity/NaN, which parsing must refuse
    data = bytearray(b'{"manifest_crc32c":%d,%s' % (crc32c.crc32c(body), body))
    if flip is not None and data:
        position, mask = flip
        data[position % len(data)] ^= mask
    if cut is not None:
        data = data[:cut]
    try:
        manifest = _parse(bytes(data))
    except CorruptCheckpointError:
        return
    for key, record in manifest.tensors.items():
        assert isinstance(key, str) and key != OBJECT_GRAPH_KEY
        assert sum(extent.length for extent in record.extents) == record.nbytes
        assert all(is_plain_name(extent.file) for extent in record.extents)
        assert record.spec.shape == record.shape
    assert is_plain_name(manifest.data_dir)


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@_fuzzed_manifests
def test_many_fuzzed_manifests_only_parse_or_raise_corrupt(edits, cut, flip):
    test_fuzzed_manifests_only_parse_or_raise_corrupt.hypothesis.inner_test(edits, cut, flip)


# ---------------------------------------------------------------------------------------------
# Dtypes, lenient reading


def test_dtype_allowlist():
    for name in ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "complex64", "complex128"]:
        text = encode_dtype(np.dtype(name))
        assert decode_dtype(text) == np.dtype(name)
        assert text == np.dtype(name).newbyteorder("<").str
    assert encode_dtype(np.dtype(">i4")) == "<i4"
    assert encode_dtype("bytes") == "bytes" and decode_dtype("bytes") == "bytes"
    for bad in ["object", "U3", "M8[s]", [("a", "<i4")]]:
        with pytest.raises(TypeError, match="cannot be stored"):
            encode_dtype(np.dtype(bad))
    with pytest.raises(ValueError, match="unknown dtype"):
        decode_dtype("<U4")


def test_read_data_dirs_is_tolerant():
    own = (data_dir_name("ckpt", NONCE),)
    assert read_data_dirs(json.dumps(_valid_document()).encode()) == own
    newer = _mutated(("format_version",), 9)
    assert read_data_dirs(json.dumps(newer).encode()) == own
    assert read_data_dirs(b"garbage") is None
    assert read_data_dirs(json.dumps(_mutated(("data_dir",), "../x")).encode()) is None
    merged = {**_valid_document(), "data_dirs": [own[0], data_dir_name("ckpt", "f" * 16), "../x", own[0]]}
    assert read_data_dirs(json.dumps(merged).encode()) == (*own, data_dir_name("ckpt", "f" * 16))


def test_tensor_record_json_shape():
    record = TensorRecord("<i8", (2,), 16, 5, (Extent("pack-00000", 8, 16, 5),))
    assert record.to_json() == {"dtype": "<i8", "shape": [2], "nbytes": 16, "crc32c": 5,
                                "extents": [{"file": "pack-00000", "offset": 8, "length": 16, "crc32c": 5}]}


@pytest.mark.parametrize(
    ("body", "problem"),
    [(b'"format":"asyncckpt","format":"asyncckpt"}', "duplicate JSON object key 'format'"),
     (b'"format":"asyncckpt","x":NaN}', "NaN"),
     (b'"format":"asyncckpt","x":1e400}', "1e400 is out of range")],
    ids=["duplicate-key", "nan", "huge-number"],
)
def test_compact_manifests_meet_the_strict_checks_too(body, problem):
    """A sealed manifest written compactly (the fast path's form) with a duplicate or forbidden value is refused."""
    data = b'{"manifest_crc32c":%d,%s' % (crc32c.crc32c(body), body)
    with pytest.raises(CorruptCheckpointError, match=problem):
        _parse(data)
