"""Reading checkpoints without a Checkpoint object (``asyncckpt.readers``), behaviours 10 and 64."""

from __future__ import annotations

import json
import os
import pathlib
import re
import threading

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import readers
from asyncckpt import io as ckio
from asyncckpt._runtime import get_runtime
from asyncckpt.format import OBJECT_GRAPH_KEY
from asyncckpt.naming import index_path
from asyncckpt.io.storage import default_storage
from asyncckpt.testing.storage import GatedStorage

A_KEY = "a/.ATTRIBUTES/VARIABLE_VALUE"
B_KEY = "b/.ATTRIBUTES/VARIABLE_VALUE"
S_KEY = "s/.ATTRIBUTES/py_state"
UPPER_KEY = "Upper/.ATTRIBUTES/VARIABLE_VALUE"
DIGIT_KEY = "0digit/.ATTRIBUTES/VARIABLE_VALUE"
V_KEY = "v/.ATTRIBUTES/VARIABLE_VALUE"


class Text(ac.PythonState):
    def __init__(self, value: bytes):
        self.value = value

    def serialize(self):
        return self.value

    def deserialize(self, value):
        self.value = value


def make_checkpoint():
    a = ac.Variable(np.arange(12, dtype=np.float32).reshape(3, 4))
    b = ac.Variable(np.int64(7))
    return ac.Checkpoint(a=a, b=b, s=Text(b"\x00hello\xff"), Upper=ac.Variable(np.float64(1.5)), **{"0digit": ac.Variable(np.int8(-3))})


def corrupt_value(prefix: str, key: str) -> str:
    """Flip one stored byte of ``key``; return the path of the data file changed."""
    with open(index_path(prefix), encoding="utf-8") as handle:
        manifest = json.load(handle)
    extent = manifest["tensors"][key]["extents"][0]
    data_file = os.path.join(os.path.dirname(prefix), manifest["data_dir"], extent["file"])
    with open(data_file, "r+b") as handle:
        handle.seek(extent["offset"])
        byte = handle.read(1)
        handle.seek(extent["offset"])
        handle.write(bytes([byte[0] ^ 0xFF]))
    return data_file


@pytest.fixture
def written(tmp_path):
    return make_checkpoint().write(str(tmp_path / "model"))


# ---------------------------------------------------------------- list_variables (behaviour 10)


def test_list_variables_sorted_bytewise_with_object_graph(written):
    assert readers.list_variables(written) == [
        (DIGIT_KEY, []),
        (UPPER_KEY, []),
        (OBJECT_GRAPH_KEY, []),
        (A_KEY, [3, 4]),
        (B_KEY, []),
        (S_KEY, []),
    ]


def test_list_variables_of_a_directory_uses_its_latest_checkpoint(tmp_path):
    checkpoint = make_checkpoint()
    checkpoint.save(str(tmp_path / "ckpt"))
    checkpoint.a.assign(np.zeros((3, 4), np.float32))
    latest = checkpoint.save(str(tmp_path / "ckpt"))
    assert readers.list_variables(pathlib.Path(tmp_path)) == readers.list_variables(latest)
    assert ("save_counter/.ATTRIBUTES/VARIABLE_VALUE", []) in readers.list_variables(tmp_path)
    assert readers.load_variable(tmp_path, "save_counter/.ATTRIBUTES/VARIABLE_VALUE") == 2
    assert not readers.load_variable(tmp_path, A_KEY).any()


@pytest.mark.parametrize("function", [readers.list_variables, readers.load_checkpoint, readers.object_metadata])
def test_missing_checkpoint_raises_not_found(tmp_path, function):
    with pytest.raises(ac.NotFoundError):
        function(str(tmp_path / "nothing-1"))
    with pytest.raises(ac.NotFoundError, match=re.escape(str(tmp_path))):
        function(tmp_path)  # a directory without a state file
    with pytest.raises(FileNotFoundError):  # NotFoundError is also the builtin
        function(tmp_path)


def test_non_path_argument_is_a_type_error():
    with pytest.raises(TypeError, match="checkpoint path"):
        readers.list_variables(42)


# ---------------------------------------------------------------- load_variable / load_checkpoint


def test_load_variable_returns_arrays_and_bytes(written):
    value = readers.load_variable(written, A_KEY)
    assert isinstance(value, np.ndarray) and value.dtype == np.float32
    np.testing.assert_array_equal(value, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert readers.load_variable(written, B_KEY) == 7
    assert readers.load_variable(written, S_KEY) == b"\x00hello\xff"
    assert readers.load_variable(written, A_KEY + ":0").shape == (3, 4)  # TF tensor-name suffix


def test_unknown_key_is_a_key_error_naming_key_and_checkpoint(written):
    with pytest.raises(KeyError, match=re.escape("'no/such/key'") + ".*" + re.escape(written)):
        readers.load_variable(written, "no/such/key")
    reader = readers.load_checkpoint(written)
    with pytest.raises(KeyError, match="no/such/key"):
        reader.get_tensor("no/such/key")
    assert not reader.has_tensor("no/such/key")
    assert not reader.has_tensor(3)


def test_checkpoint_reader_maps(written):
    reader = readers.load_checkpoint(written)
    assert reader.path == written
    assert reader.has_tensor(A_KEY) and A_KEY in reader
    assert reader.keys() == [key for key, _ in readers.list_variables(written)]
    assert reader.get_variable_to_shape_map() == {
        DIGIT_KEY: [],
        UPPER_KEY: [],
        OBJECT_GRAPH_KEY: [],
        A_KEY: [3, 4],
        B_KEY: [],
        S_KEY: [],
    }
    dtypes = reader.get_variable_to_dtype_map()
    assert dtypes == {
        DIGIT_KEY: np.dtype(np.int8),
        UPPER_KEY: np.dtype(np.float64),
        OBJECT_GRAPH_KEY: np.dtype(object),
        A_KEY: np.dtype(np.float32),
        B_KEY: np.dtype(np.int64),
        S_KEY: np.dtype(object),
    }
    assert all(isinstance(dtype, np.dtype) for dtype in dtypes.values())
    graph_bytes = reader.get_tensor(OBJECT_GRAPH_KEY)
    assert isinstance(graph_bytes, bytes) and json.loads(graph_bytes) == readers.object_metadata(written)


def test_corrupt_value_raises_naming_key_and_file(written):
    data_file = corrupt_value(written, A_KEY)
    reader = readers.load_checkpoint(written)
    with pytest.raises(ac.CorruptCheckpointError) as info:
        reader.get_tensor(A_KEY)
    assert A_KEY in str(info.value) and os.path.basename(data_file) in str(info.value)
    assert reader.get_tensor(B_KEY) == 7  # other values stay readable


# ---------------------------------------------------------------- object_metadata (behaviour 64)


def test_object_metadata_is_the_saved_graph(written):
    graph = readers.object_metadata(written)
    root = graph["nodes"][0]
    assert [child["local_name"] for child in root["children"]] == ["0digit", "Upper", "a", "b", "s"]
    by_name = {child["local_name"]: child["node_id"] for child in root["children"]}
    attribute = graph["nodes"][by_name["a"]]["attributes"][0]
    assert attribute["name"] == "VARIABLE_VALUE" and attribute["checkpoint_key"] == A_KEY
    graph["nodes"].clear()  # a copy: changing it changes nothing stored
    assert readers.object_metadata(written)["nodes"]


def test_object_metadata_without_object_graph_raises_value_error(tmp_path):
    prefix = str(tmp_path / "graphless")
    ckio.start_write(prefix, [ckio.SaveEntry("x", np.ones(2))], {}).result()
    np.testing.assert_array_equal(readers.load_variable(prefix, "x"), np.ones(2))
    with pytest.raises(ValueError, match="object graph"):
        readers.object_metadata(prefix)


# ---------------------------------------------------------------- read-your-writes


def test_readers_wait_for_an_asynchronous_save_that_returned(tmp_path):
    gated = GatedStorage(default_storage(), get_runtime())
    variable = ac.Variable(np.zeros(1000, np.float32))
    checkpoint = ac.Checkpoint(v=variable)
    options = ac.CheckpointOptions(enable_async=True, write_settings=ac.WriteSettings(storage=gated))
    path = checkpoint.save(str(tmp_path / "ckpt"), options=options)
    gated.reached.wait()
    variable.assign(np.ones(1000, np.float32))  # after the snapshot: not in the checkpoint
    assert not os.path.exists(index_path(path))  # nothing committed while the gate is shut
    result = []
    reader = threading.Thread(target=lambda: result.append(readers.load_variable(tmp_path, V_KEY)))
    reader.start()
    reader.join(0.2)
    # Without waiting, the read would already have failed: there is no checkpoint yet.
    assert reader.is_alive() and result == []
    gated.open_gate()
    reader.join()
    assert result and not result[0].any()
    assert readers.list_variables(path)[-1] == (V_KEY, [1000])
    checkpoint.sync()
