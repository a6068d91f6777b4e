"""Behaviour H (``PythonState``: non-tensor state saved as one string attribute).

Ideas ported from TensorFlow's ``python_state_test.py`` (testWrapper, testSaveRestoreNumpyState,
testDocstringExample, testAssertConsumedFailsWithUsedPythonState); numbers refer to
``behaviours.md``.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

import asyncckpt as ac

GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


class Counter(ac.PythonState):
    def __init__(self, value=0):
        super().__init__()
        self.value = value
        self.received = []

    def serialize(self):
        return str(self.value).encode("ascii")

    def deserialize(self, value):
        self.received.append(value)
        self.value = int(value)


class NumpyWrapper(ac.PythonState):
    """Wraps a NumPy array; bytes come from ``np.save`` with pickling disabled."""

    def __init__(self, array):
        super().__init__()
        self.array = array

    def serialize(self):
        buffer = io.BytesIO()
        np.save(buffer, self.array, allow_pickle=False)
        return buffer.getvalue()

    def deserialize(self, value):
        self.array = np.load(io.BytesIO(value), allow_pickle=False)


class TextState(ac.PythonState):
    def __init__(self, text=""):
        super().__init__()
        self.text = text
        self.received = None

    def serialize(self):
        return self.text

    def deserialize(self, value):
        self.received = value


def keys(path):
    return [key for key, _ in ac.list_variables(path)]


def test_h41_saved_as_py_state_attribute(prefix):
    path = ac.Checkpoint(counter=Counter(5)).save(prefix)
    assert "counter/.ATTRIBUTES/py_state" in keys(path)
    assert ac.load_checkpoint(path).get_tensor("counter/.ATTRIBUTES/py_state") == b"5"


def test_h41_attribute_named_py_state_in_metadata(prefix):
    meta = ac.object_metadata(ac.Checkpoint(counter=Counter(5)).write(prefix))
    node_id = {c["local_name"]: c["node_id"] for c in meta["nodes"][0]["children"]}["counter"]
    (attr,) = meta["nodes"][node_id]["attributes"]
    assert (attr["name"], attr["checkpoint_key"]) == ("py_state", "counter/.ATTRIBUTES/py_state")


def test_h41_restored_eagerly_on_restore(prefix):
    counter = Counter(5)
    ckpt = ac.Checkpoint(counter=counter)
    path = ckpt.save(prefix)
    counter.value = 9
    ckpt.restore(path)
    assert counter.value == 5


def test_h41_restored_when_attached_later(prefix):
    path = ac.Checkpoint(counter=Counter(5)).save(prefix)
    load = ac.Checkpoint()
    status = load.restore(path)
    counter = Counter(0)
    load.counter = counter
    assert counter.value == 5
    status.assert_consumed()


def test_h41_deserialize_receives_bytes(prefix):
    path = ac.Checkpoint(counter=Counter(7)).save(prefix)
    counter = Counter()
    ac.Checkpoint(counter=counter).restore(path)
    assert counter.received == [b"7"]


def test_h41_str_serialization_comes_back_as_bytes(prefix):
    # Ambiguous in the spec (serialize may return str); TF hands deserialize the stored bytes.
    path = ac.Checkpoint(state=TextState("héllo")).save(prefix)
    loaded = TextState()
    ac.Checkpoint(state=loaded).restore(path).assert_consumed()
    assert loaded.received == "héllo".encode("utf-8")


def test_h41_numpy_wrapper_round_trip(prefix):
    root = ac.Checkpoint(numpy=NumpyWrapper(np.array([1.0])))
    path = root.save(prefix)
    root.numpy.array *= 2.0
    assert root.numpy.array.tolist() == [2.0]
    root.restore(path)
    assert root.numpy.array.tolist() == [1.0]


def test_h41_numpy_state_into_fresh_object(prefix):
    arrays = NumpyWrapper(np.zeros([3, 4]))
    path = ac.Checkpoint(numpy_arrays=arrays).save(prefix)
    arrays.array[1, 1] = 4.0
    second = ac.Checkpoint(numpy_arrays=NumpyWrapper(np.array([])))
    second.restore(path).assert_consumed()
    np.testing.assert_array_equal(second.numpy_arrays.array, np.zeros([3, 4]))


def test_h41_serialized_at_each_save(tmp_path):
    counter = Counter(1)
    ckpt = ac.Checkpoint(counter=counter)
    first = ckpt.save(str(tmp_path / "ckpt"))
    counter.value = 2
    second = ckpt.save(str(tmp_path / "ckpt"))
    loaded = Counter()
    loader = ac.Checkpoint(counter=loaded)
    loader.restore(first)
    assert loaded.value == 1
    loader.restore(second)
    assert loaded.value == 2
    loader.restore(first)
    assert loaded.value == 1


def test_h41_snapshot_taken_when_save_returns(prefix, save_options):
    counter = Counter(5)
    ckpt = ac.Checkpoint(counter=counter)
    path = ckpt.save(prefix, options=save_options)
    counter.value = 6
    ckpt.sync()
    assert ac.load_checkpoint(path).get_tensor("counter/.ATTRIBUTES/py_state") == b"5"


def test_h41_unconsumed_python_state_fails_assert_consumed(prefix):
    path = ac.Checkpoint(obj=Counter(3)).save(prefix)
    status = ac.Checkpoint(obj=ac.Trackable()).restore(path)
    with pytest.raises(AssertionError, match=re.escape("py_state")):
        status.assert_consumed()


def test_h41_python_state_missing_from_checkpoint_is_unmatched(prefix):
    path = ac.Checkpoint(v=ac.Variable(1.0, dtype=np.float32)).save(prefix)
    counter = Counter(3)
    status = ac.Checkpoint(v=ac.Variable(0.0, dtype=np.float32), counter=counter).restore(path)
    assert counter.value == 3
    with pytest.raises(AssertionError, match="not bound to checkpointed values"):
        status.assert_existing_objects_matched()


def test_h41_python_state_inside_containers(prefix):
    root = ac.AutoTrackable()
    root.states = [Counter(1)]
    root.named = {"c": Counter(2)}
    path = ac.Checkpoint(root=root).write(prefix)
    assert keys(path) == [GRAPH_KEY, "named/c/.ATTRIBUTES/py_state", "states/0/.ATTRIBUTES/py_state"]


def test_h41_plain_python_attributes_not_saved(prefix):
    root = ac.AutoTrackable()
    root.count = 3
    root.rate = 0.5
    root.numbers = [1, 2, 3]
    path = ac.Checkpoint(root=root).write(prefix)
    assert keys(path) == [GRAPH_KEY]
