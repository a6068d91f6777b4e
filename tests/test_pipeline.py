"""End-to-end tests of the write and read executors (start_write -> open_reader)."""

from __future__ import annotations

import numpy as np
import pytest

from asyncckpt import pipeline
from asyncckpt.errors import NotFoundError
from asyncckpt.format import OBJECT_GRAPH_KEY
from asyncckpt.pipeline import SaveEntry, TensorSpec

ALL_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
]


def _sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.dtype(dtype).kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _write(path, values, graph=None, **kwargs):
    entries = [SaveEntry(key, value) for key, value in values.items()]
    handle = pipeline.start_write(path, entries, graph if graph is not None else {"nodes": []}, **kwargs)
    assert handle.result() == str(path)
    return handle


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype(tmp_path, dtype):
    values = {"v": _sample(dtype, (3, 5)), "scalar": _sample(dtype, ()), "empty": _sample(dtype, (0, 3))}
    _write(tmp_path / "ckpt", values)
    reader = pipeline.open_reader(tmp_path / "ckpt")
    out = reader.read_many(values)
    for key, value in values.items():
        assert out[key].dtype == np.dtype(dtype)
        assert out[key].shape == value.shape
        np.testing.assert_array_equal(out[key], value)
        assert out[key].flags.writeable
        assert reader.spec(key) == TensorSpec(np.dtype(dtype).newbyteorder("<"), value.shape)


def test_bytes_values_and_object_graph(tmp_path):
    graph = {"nodes": [{"children": [], "attributes": []}]}
    _write(tmp_path / "ckpt", {"state": b"\x00hello\xff", "empty": b""}, graph)
    reader = pipeline.open_reader(tmp_path / "ckpt")
    assert reader.keys() == sorted([OBJECT_GRAPH_KEY, "empty", "state"])
    assert reader.read("state") == b"\x00hello\xff"
    assert reader.read("empty") == b""
    assert reader.spec("state") == TensorSpec("bytes", ())
    assert reader.spec(OBJECT_GRAPH_KEY) == TensorSpec("bytes", ())
    assert reader.object_graph == graph
    import json

    assert json.loads(reader.read(OBJECT_GRAPH_KEY).decode("utf-8")) == graph


def test_missing_checkpoint_raises_not_found_naming_path(tmp_path):
    with pytest.raises(NotFoundError, match="nope") as info:
        pipeline.open_reader(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)
    assert not pipeline.checkpoint_exists(tmp_path / "nope")


def test_unknown_key_raises_key_error_naming_key(tmp_path):
    _write(tmp_path / "ckpt", {"a": np.ones(2)})
    reader = pipeline.open_reader(tmp_path / "ckpt")
    with pytest.raises(KeyError, match="no_such_key"):
        reader.read("no_such_key")
    with pytest.raises(KeyError, match="no_such_key"):
        reader.spec("no_such_key")
