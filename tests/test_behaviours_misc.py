"""Behaviours N (deepcopy, ``Checkpoint(root=..., **kwargs)``, ``object_metadata``, directories).

Ideas ported from TensorFlow's ``checkpoint_test.py`` (testDeepCopyCheckpoint,
test_initialize_with_root_object, test_initialize_with_root_object_and_kwargs, test_root_arg,
test_weakref_root); numbers refer to ``behaviours.md``.
"""

from __future__ import annotations

import copy
import gc
import re
import weakref

import numpy as np
import pytest

import asyncckpt as ac

GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def f32(value):
    return ac.Variable(value, dtype=np.float32)


def keys(path):
    return [key for key, _ in ac.list_variables(path)]


class Model(ac.AutoTrackable):
    def __init__(self):
        super().__init__()
        self.v = f32(2.0)

    def __call__(self, x):
        return self.v.numpy() * x


# ---------------------------------------------------------------- N62 deepcopy


def test_n62_deepcopy_checkpoint_copies_tracked_objects(prefix):
    v = f32(1.0)
    original = ac.Checkpoint(v=v)
    copied = copy.deepcopy(original)
    assert copied.v is not v
    copied.v.assign(2.0)
    assert v.numpy() == 1.0
    path = copied.save(prefix)
    assert v.numpy() == 1.0
    original.restore(path).assert_consumed()
    assert v.numpy() == 2.0


def test_n62_deepcopy_preserves_structure(prefix):
    model = ac.AutoTrackable()
    model.layers = [f32(1.0), {"b": f32(2.0)}]
    original = ac.Checkpoint(model=model)
    copied = copy.deepcopy(original)
    assert keys(copied.write(prefix)) == keys(original.write(prefix + "-original"))


# ---------------------------------------------------------------- N63 root and kwargs


def test_n63_root_children_are_top_level(prefix):
    model = Model()
    path = ac.Checkpoint(model, extra=f32(5.0)).save(prefix)
    assert keys(path) == [
        GRAPH_KEY, "extra/.ATTRIBUTES/VARIABLE_VALUE", "save_counter/.ATTRIBUTES/VARIABLE_VALUE",
        "v/.ATTRIBUTES/VARIABLE_VALUE",
    ]


def test_n63_kwarg_conflicting_with_root_child_raises():
    model = Model()
    message = "Cannot create a Checkpoint with keyword argument v if root.v already exists."
    with pytest.raises(ValueError, match=re.escape(message)):
        ac.Checkpoint(model, v=f32(5.0))


def test_n63_kwarg_same_as_root_child_is_allowed(prefix):
    model = Model()
    path = ac.Checkpoint(model, v=model.v).save(prefix)
    assert "v/.ATTRIBUTES/VARIABLE_VALUE" in keys(path)


def test_n63_initialize_with_root_object(prefix):
    model = Model()
    expected = model(3.0)
    model.deferred_variable = f32(5.0)
    path = ac.Checkpoint(model).save(prefix)
    new_model = Model()
    new_model.v.assign(0.0)
    load = ac.Checkpoint(new_model)
    load.restore(path)
    assert new_model(3.0) == expected
    new_model.deferred_variable = f32(1.0)
    assert new_model.deferred_variable.numpy() == 5.0


def test_n63_root_and_kwargs_restore_into_rearranged_objects(prefix):
    model = Model()
    model.v.assign(3.0)
    separate = f32(5.0)
    path = ac.Checkpoint(model, separate_variable=separate).save(prefix)

    new_model, separate = Model(), f32(1.0)
    load = ac.Checkpoint(new_model, separate_variable=separate)
    load.restore(path).assert_consumed()
    assert (new_model.v.numpy(), separate.numpy(), load.save_counter.numpy()) == (3.0, 5.0, 1)

    swapped = ac.AutoTrackable()
    swapped.separate_variable = f32(200.0)
    v = f32(100.0)
    load = ac.Checkpoint(swapped, v=v)
    load.restore(path).assert_consumed()
    assert (v.numpy(), swapped.separate_variable.numpy(), load.save_counter.numpy()) == (3.0, 5.0, 1)

    v, separate = f32(100.0), f32(200.0)
    load = ac.Checkpoint(v=v, separate_variable=separate)
    load.restore(path).assert_consumed()
    assert (v.numpy(), separate.numpy(), load.save_counter.numpy()) == (3.0, 5.0, 1)


def test_n63_root_arg_cross_restore(tmp_path):
    root = ac.AutoTrackable()
    root.v = ac.Variable(1, dtype=np.int64)
    w, y = ac.Variable(2, dtype=np.int64), ac.Variable(3, dtype=np.int64)
    root_ckpt = ac.Checkpoint(root=root, w=w, y=y)
    root2 = ac.AutoTrackable()
    root2.w = ac.Variable(4, dtype=np.int64)
    v2, z = ac.Variable(5, dtype=np.int64), ac.Variable(6, dtype=np.int64)
    root2_ckpt = ac.Checkpoint(root=root2, v=v2, z=z)
    root_path = root_ckpt.save(str(tmp_path / "root_ckpt"))
    root2_path = root2_ckpt.save(str(tmp_path / "root2_ckpt"))
    root_ckpt.restore(root2_path)
    root2_ckpt.restore(root_path)
    assert (root.v.numpy(), w.numpy(), y.numpy()) == (5, 4, 3)
    assert (root2.w.numpy(), v2.numpy(), z.numpy()) == (2, 1, 6)


def test_n63_weakref_root_is_not_kept_alive(prefix):
    root = ac.AutoTrackable()
    root.v = ac.Variable(1, dtype=np.int64)
    ckpt = ac.Checkpoint(root=weakref.ref(root))
    path = ckpt.save(prefix)
    root.v.assign(2)
    ckpt.restore(path)
    assert root.v.numpy() == 1
    weak_root, weak_v = weakref.ref(root), weakref.ref(root.v)
    del root
    gc.collect()
    assert weak_root() is None
    assert weak_v() is None


# ---------------------------------------------------------------- N64 object_metadata


def test_n64_object_metadata_returns_parsed_graph(prefix):
    model = Model()
    path = ac.Checkpoint(model=model).save(prefix)
    meta = ac.object_metadata(path)
    root_children = {c["local_name"]: c["node_id"] for c in meta["nodes"][0]["children"]}
    assert set(root_children) == {"model", "save_counter"}
    model_node = meta["nodes"][root_children["model"]]
    assert [c["local_name"] for c in model_node["children"]] == ["v"]
    assert all(node["has_checkpoint_values"] for node in meta["nodes"])


@pytest.mark.parametrize("reader", ["object_metadata", "list_variables", "load_checkpoint"])
def test_n64_readers_raise_not_found_for_missing_checkpoint(tmp_path, reader):
    # The spec names NotFoundError for restore/read; TF's readers raise the same for a missing prefix.
    with pytest.raises(ac.NotFoundError):
        getattr(ac, reader)(str(tmp_path / "missing-1"))


def test_n64_metadata_agrees_with_key_listing(prefix):
    root = ac.AutoTrackable()
    root.a = f32(1.0)
    root.b = [f32(2.0)]
    path = ac.Checkpoint(root=root).write(prefix)
    meta = ac.object_metadata(path)
    listed = {a["checkpoint_key"] for node in meta["nodes"] for a in node["attributes"]}
    assert listed | {GRAPH_KEY} == set(keys(path))


# ---------------------------------------------------------------- N65 directories are not checkpoints


def test_n65_restoring_a_directory_raises_not_found(tmp_path):
    # SavedModel redirection is TF-only and out of scope: a directory is simply not a checkpoint.
    (tmp_path / "saved_model").mkdir()
    with pytest.raises(ac.NotFoundError):
        ac.Checkpoint(v=f32(0.0)).restore(str(tmp_path / "saved_model"))
