"""Behaviours A (object graph, edge naming, checkpoint keys) and B (list/dict/tuple tracking).

Ideas ported from TensorFlow's ``checkpoint_test.py`` (InterfaceTests, SerializeToTensorTest,
testVariableNameEscaping, testLocalNameValidation, testEmptyContainersIgnored) and
``data_structures_test.py``; numbers refer to ``behaviours.md``.
"""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

import asyncckpt as ac

GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"


def f32(value):
    return ac.Variable(value, dtype=np.float32)


def keys(path):
    return [key for key, _ in ac.list_variables(path)]


def children(meta, node_id=0):
    """``[(local_name, node_id), ...]`` of one node, in recorded order."""
    return [(c["local_name"], c["node_id"]) for c in meta["nodes"][node_id]["children"]]


def node_at(meta, *names):
    node_id = 0
    for name in names:
        node_id = dict(children(meta, node_id))[name]
    return node_id


def written(root, prefix):
    """Write ``root`` (no save counter) and return the path."""
    return ac.Checkpoint(root=root).write(prefix)


class MultiTensor(ac.Trackable):
    """A trackable exposing two named tensors through the custom-tensor protocol."""

    def __init__(self, a, b):
        super().__init__()
        self.a = np.asarray(a, dtype=np.int64)
        self.b = np.asarray(b, dtype=np.int64)

    def _serialize_to_tensors(self):
        return {"v1": self.a, "v2": self.b}

    def _restore_from_tensors(self, restored_tensors):
        self.a = np.asarray(restored_tensors["v1"])
        self.b = np.asarray(restored_tensors["v2"])


# ---------------------------------------------------------------- A1 named edges


def test_a01_checkpoint_kwargs_tracked_in_sorted_order(prefix):
    path = ac.Checkpoint(b=f32(1.0), a=f32(2.0), c=f32(3.0)).write(prefix)
    assert [name for name, _ in children(ac.object_metadata(path))] == ["a", "b", "c"]


def test_a01_autotrackable_children_in_insertion_order(prefix):
    obj = ac.AutoTrackable()
    obj.zeta = f32(1.0)
    obj.alpha = f32(2.0)
    obj.mid = ac.AutoTrackable()
    path = written(obj, prefix)
    assert [name for name, _ in children(ac.object_metadata(path))] == ["zeta", "alpha", "mid"]


def test_a01_autotrackable_overwrite_keeps_position_and_uses_new_value(prefix):
    obj = ac.AutoTrackable()
    obj.x = f32(1.0)
    obj.y = f32(2.0)
    obj.x = f32(5.0)
    path = written(obj, prefix)
    assert [name for name, _ in children(ac.object_metadata(path))] == ["x", "y"]
    assert ac.load_variable(path, "x" + VALUE) == 5.0


def test_a01_checkpoint_attribute_assignment_tracks(prefix):
    ckpt = ac.Checkpoint()
    ckpt.v = f32(4.0)
    path = ckpt.write(prefix)
    assert ac.load_variable(path, "v" + VALUE) == 4.0


# ---------------------------------------------------------------- A2 explicit tracking


@pytest.mark.parametrize("value", [5, "name", np.ones(2), object()], ids=["int", "str", "ndarray", "object"])
def test_a02_track_trackable_rejects_non_trackable(value):
    with pytest.raises(TypeError, match=re.escape("can only be used to track objects of type Trackable")):
        ac.Trackable()._track_trackable(value, name="x")


def test_a02_track_trackable_duplicate_name_raises():
    parent = ac.Trackable()
    parent._track_trackable(ac.Trackable(), name="dep")
    fragment = (
        "Called Trackable._track_trackable() with name='dep', but a Trackable with this name is "
        "already declared as a dependency"
    )
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parent._track_trackable(ac.Trackable(), name="dep")


def test_a02_track_trackable_same_object_again_is_noop(prefix):
    parent = ac.Trackable()
    child = f32(1.0)
    parent._track_trackable(child, name="dep")
    parent._track_trackable(child, name="dep")
    path = written(parent, prefix)
    assert children(ac.object_metadata(path)) == [("dep", 1)]


def test_a02_track_trackable_overwrite_replaces_in_place(prefix):
    parent = ac.Trackable()
    parent._track_trackable(f32(1.0), name="x")
    parent._track_trackable(f32(2.0), name="y")
    parent._track_trackable(f32(3.0), name="x", overwrite=True)
    path = written(parent, prefix)
    assert [name for name, _ in children(ac.object_metadata(path))] == ["x", "y"]
    assert ac.load_variable(path, "x" + VALUE) == 3.0


def test_a02_add_variable_duplicate_name_raises():
    obj = ac.AutoTrackable()
    ac.add_variable(obj, name="duplicate", shape=[])
    with pytest.raises(ValueError, match=r"'duplicate'.*already declared"):
        ac.add_variable(obj, name="duplicate", shape=[])


def test_a02_add_variable_tracks_under_name(prefix):
    obj = ac.AutoTrackable()
    ac.add_variable(obj, name="constant", initializer=1.0)
    ac.add_variable(obj, name="ones", shape=[2], initializer=lambda shape, dtype: np.ones(shape, dtype))
    zeros = lambda shape, dtype: np.zeros(shape, dtype)  # noqa: E731
    ac.add_variable(obj, name="f64", shape=[2, 2], dtype=np.float64, initializer=zeros)
    path = written(obj, prefix)
    assert set(keys(path)) == {GRAPH_KEY, "constant" + VALUE, "ones" + VALUE, "f64" + VALUE}
    np.testing.assert_array_equal(ac.load_variable(path, "ones" + VALUE), [1.0, 1.0])
    assert ac.load_variable(path, "f64" + VALUE).dtype == np.float64


# ---------------------------------------------------------------- A3 only trackables


@pytest.mark.parametrize("value", [5, "text", np.ones(3), object()], ids=["int", "str", "ndarray", "object"])
def test_a03_checkpoint_kwarg_must_be_trackable(value):
    with pytest.raises(ValueError, match=re.escape("`Checkpoint` was expecting step to be a trackable object")):
        ac.Checkpoint(step=value)


def test_a03_non_trackable_attributes_not_saved(prefix):
    obj = ac.AutoTrackable()
    obj.number = 5
    obj.text = "hello"
    obj.array = np.ones(3)
    obj.v = f32(1.0)
    path = written(obj, prefix)
    assert keys(path) == [GRAPH_KEY, "v" + VALUE]
    assert obj.number == 5 and obj.text == "hello"


def test_a03_non_trackable_reassignment_keeps_old_dependency(prefix):
    obj = ac.AutoTrackable()
    obj.v = f32(7.0)
    obj.v = 3
    path = written(obj, prefix)
    assert ac.load_variable(path, "v" + VALUE) == 7.0


def test_a03_delattr_removes_dependency(prefix):
    obj = ac.AutoTrackable()
    obj.v = f32(7.0)
    obj.w = f32(8.0)
    del obj.v
    path = written(obj, prefix)
    assert keys(path) == [GRAPH_KEY, "w" + VALUE]


def test_a03_no_dependency_stores_unwrapped_value_untracked(prefix):
    obj = ac.AutoTrackable()
    v = f32(1.0)
    obj.hidden = ac.NoDependency(v)
    obj.plain = ac.NoDependency([f32(2.0)])
    assert obj.hidden is v
    assert type(obj.plain) is list
    path = written(obj, prefix)
    assert keys(path) == [GRAPH_KEY]


# ---------------------------------------------------------------- A4 BFS graph


def test_a04_root_is_node_zero(prefix):
    obj = ac.AutoTrackable()
    obj.v = f32(1.0)
    meta = ac.object_metadata(written(obj, prefix))
    assert children(meta, 0) == [("v", 1)]
    assert [a["checkpoint_key"] for a in meta["nodes"][1]["attributes"]] == ["v" + VALUE]


def test_a04_node_ids_are_breadth_first(prefix):
    first, second = ac.AutoTrackable(), ac.AutoTrackable()
    first.x = f32(1.0)
    second.y = f32(2.0)
    meta = ac.object_metadata(ac.Checkpoint(a=first, b=second).write(prefix))
    assert children(meta, 0) == [("a", 1), ("b", 2)]
    assert children(meta, 1) == [("x", 3)]
    assert children(meta, 2) == [("y", 4)]


def test_a04_shared_object_is_one_node_with_two_edges(prefix):
    first, second, shared = ac.AutoTrackable(), ac.AutoTrackable(), ac.AutoTrackable()
    shared.v = f32(1.0)
    first.c = shared
    second.c = shared
    path = ac.Checkpoint(a=first, b=second).write(prefix)
    meta = ac.object_metadata(path)
    assert len(meta["nodes"]) == 5
    assert node_at(meta, "a", "c") == node_at(meta, "b", "c")
    # the key follows the path of the first BFS visit
    assert "a/c/v" + VALUE in keys(path)
    assert "b/c/v" + VALUE not in keys(path)


def test_a04_cycles_terminate(prefix):
    first, second = ac.AutoTrackable(), ac.AutoTrackable()
    first.other = second
    second.other = first
    first.v = f32(1.0)
    meta = ac.object_metadata(ac.Checkpoint(a=first).write(prefix))
    assert len(meta["nodes"]) == 4
    assert node_at(meta, "a", "other", "other") == node_at(meta, "a")


def test_a04_self_loop_terminates(prefix):
    obj = ac.AutoTrackable()
    obj.me = obj
    meta = ac.object_metadata(written(obj, prefix))
    assert children(meta, 0) == [("me", 0)]


# ---------------------------------------------------------------- A5 keys


def test_a05_checkpoint_keys_nested_path(prefix):
    model, layer = ac.AutoTrackable(), ac.AutoTrackable()
    model.layer = layer
    layer.kernel = f32(np.ones((2, 2)))
    path = ac.Checkpoint(model=model).write(prefix)
    assert keys(path) == [GRAPH_KEY, "model/layer/kernel/.ATTRIBUTES/VARIABLE_VALUE"]


def test_a05_checkpoint_keys_root_attributes_leading_slash(prefix):
    path = ac.Checkpoint(root=MultiTensor(1, 2), child=MultiTensor(3, 4)).write(prefix)
    meta = ac.object_metadata(path)
    root_attrs = {a["name"]: a["checkpoint_key"] for a in meta["nodes"][0]["attributes"]}
    assert root_attrs == {"v1": "/.ATTRIBUTES/v1", "v2": "/.ATTRIBUTES/v2"}
    child_id = node_at(meta, "child")
    child_attrs = {a["name"]: a["checkpoint_key"] for a in meta["nodes"][child_id]["attributes"]}
    assert child_attrs == {"v1": "child/.ATTRIBUTES/v1", "v2": "child/.ATTRIBUTES/v2"}


def test_a05_variable_attribute_named_variable_value(prefix):
    meta = ac.object_metadata(ac.Checkpoint(v=f32(1.0)).write(prefix))
    (attr,) = meta["nodes"][node_at(meta, "v")]["attributes"]
    assert attr["name"] == "VARIABLE_VALUE"
    assert attr["checkpoint_key"] == "v/.ATTRIBUTES/VARIABLE_VALUE"


# ---------------------------------------------------------------- A6 escaping


@pytest.mark.parametrize(
    ("local_name", "escaped"),
    [("a/b/c", "a.Sb.Sc"), ("b", "b"), ("c/", "c.S"), ("d/.S", "d.S..S"), ("d/.ATTRIBUTES/f", "d.S..ATTRIBUTES.Sf")],
)
def test_a06_local_name_escaping(prefix, local_name, escaped):
    root = ac.AutoTrackable()
    ac.add_variable(root, name=local_name, shape=[1, 2], dtype=np.float64)
    assert keys(written(root, prefix)) == [GRAPH_KEY, escaped + VALUE]


def test_a06_child_named_attributes_is_escaped(prefix):
    root, leaf = ac.AutoTrackable(), ac.AutoTrackable()
    root._track_trackable(leaf, name=".ATTRIBUTES")
    ac.add_variable(leaf, name="a", shape=[])
    assert keys(written(root, prefix)) == ["..ATTRIBUTES/a/.ATTRIBUTES/VARIABLE_VALUE", GRAPH_KEY]  # "." < "_"


def test_a06_escaped_names_restore(prefix):
    root = ac.AutoTrackable()
    ac.add_variable(root, name="a/b", initializer=3.0)
    path = written(root, prefix)
    other = ac.AutoTrackable()
    target = ac.add_variable(other, name="a/b", initializer=0.0)
    ac.Checkpoint(root=other).read(path).assert_consumed()
    assert target.numpy() == 3.0


# ---------------------------------------------------------------- A7 object graph key


def test_a07_object_graph_saved_under_reserved_key(prefix):
    path = ac.Checkpoint(v=f32(1.0)).write(prefix)
    assert GRAPH_KEY in keys(path)
    value = ac.load_variable(path, GRAPH_KEY)
    assert isinstance(value, bytes) and value


def test_a07_object_graph_key_is_scalar(prefix):
    path = ac.Checkpoint(v=f32(1.0)).write(prefix)
    assert tuple(dict(ac.list_variables(path))[GRAPH_KEY]) == ()


def test_a07_object_metadata_node_fields(prefix):
    meta = ac.object_metadata(ac.Checkpoint(v=f32(1.0)).write(prefix))
    for node in meta["nodes"]:
        assert {"children", "attributes", "slot_variables", "has_checkpoint_values"} <= set(node)
        for attr in node["attributes"]:
            assert {"name", "full_name", "checkpoint_key"} <= set(attr)


# ---------------------------------------------------------------- A8 has_checkpoint_values


def test_a08_has_checkpoint_values_per_node(prefix):
    root = ac.AutoTrackable()
    root.empty = ac.AutoTrackable()
    root.empty.child = ac.AutoTrackable()
    root.deep = ac.AutoTrackable()
    root.deep.inner = ac.AutoTrackable()
    root.deep.inner.v = f32(1.0)
    root.numbers = [1, 2]
    meta = ac.object_metadata(written(root, prefix))
    flag = {names: meta["nodes"][node_at(meta, *names)]["has_checkpoint_values"]
            for names in [(), ("empty",), ("empty", "child"), ("deep",), ("deep", "inner"),
                          ("deep", "inner", "v"), ("numbers",)]}
    assert flag == {(): True, ("empty",): False, ("empty", "child"): False, ("deep",): True,
                    ("deep", "inner"): True, ("deep", "inner", "v"): True, ("numbers",): False}


def test_a08_root_without_values_is_false(prefix):
    root = ac.AutoTrackable()
    root.child = ac.AutoTrackable()
    meta = ac.object_metadata(written(root, prefix))
    assert [node["has_checkpoint_values"] for node in meta["nodes"]] == [False, False]


# ---------------------------------------------------------------- A9 custom tensors


def test_a09_custom_tensors_saved_as_attributes(prefix):
    path = ac.Checkpoint(root=MultiTensor(1, 2), child=MultiTensor(3, 4)).write(prefix)
    reader = ac.load_checkpoint(path)
    got = [reader.get_tensor(k) for k in ["/.ATTRIBUTES/v1", "/.ATTRIBUTES/v2", "child/.ATTRIBUTES/v1",
                                          "child/.ATTRIBUTES/v2"]]
    assert got == [1, 2, 3, 4]


def test_a09_custom_tensors_restore_through_protocol(prefix):
    root, child = MultiTensor(1, 2), MultiTensor(3, 4)
    ckpt = ac.Checkpoint(root=root, child=child)
    path = ckpt.save(prefix)
    root.a, root.b, child.a, child.b = (np.int64(0),) * 4
    ckpt.restore(path).assert_consumed()
    assert [int(root.a), int(root.b), int(child.a), int(child.b)] == [1, 2, 3, 4]


# ---------------------------------------------------------------- A10 sorted listing


def test_a10_list_variables_sorted_bytewise(prefix):
    ckpt = ac.Checkpoint(**{"alpha": f32(1.0), "Zed": f32(2.0), "0lead": f32(3.0), "beta": f32(np.ones((2, 3)))})
    listing = ac.list_variables(ckpt.write(prefix))
    names = [key for key, _ in listing]
    assert names == ["0lead" + VALUE, "Zed" + VALUE, GRAPH_KEY, "alpha" + VALUE, "beta" + VALUE]
    assert tuple(dict(listing)["beta" + VALUE]) == (2, 3)


# ---------------------------------------------------------------- B11 containers become nodes


def test_b11_list_dict_tuple_become_trackable_nodes(prefix):
    obj = ac.AutoTrackable()
    obj.l = [f32(1.0)]
    obj.d = {"k": f32(2.0)}
    obj.t = (f32(3.0), 1)
    assert isinstance(obj.l, list) and isinstance(obj.d, dict) and isinstance(obj.t, tuple)
    path = written(obj, prefix)
    assert keys(path) == [GRAPH_KEY, "d/k" + VALUE, "l/0" + VALUE, "t/0" + VALUE]


def test_b11_ordered_dict_is_tracked(prefix):
    obj = ac.AutoTrackable()
    obj.d = collections.OrderedDict(k=f32(2.0))
    assert keys(written(obj, prefix)) == [GRAPH_KEY, "d/k" + VALUE]


def test_b11_empty_list_is_a_node_without_values(prefix):
    obj = ac.AutoTrackable()
    obj.l = []
    meta = ac.object_metadata(written(obj, prefix))
    assert [name for name, _ in children(meta)] == ["l"]
    assert meta["nodes"][node_at(meta, "l")]["has_checkpoint_values"] is False


def test_b11_tuple_of_plain_values_is_not_tracked(prefix):
    obj = ac.AutoTrackable()
    obj.t = (1, 2)
    meta = ac.object_metadata(written(obj, prefix))
    assert children(meta) == []
    assert obj.t == (1, 2)


def test_b11_tuple_with_mutable_container_is_tracked(prefix):
    obj = ac.AutoTrackable()
    obj.t = ([f32(1.0)],)
    assert keys(written(obj, prefix)) == [GRAPH_KEY, "t/0/0" + VALUE]


def test_b11_nested_list_is_a_node(prefix):
    obj = ac.AutoTrackable()
    obj.l = [[f32(1.0)]]
    assert keys(written(obj, prefix)) == [GRAPH_KEY, "l/0/0" + VALUE]


def test_b11_wrapped_list_keeps_list_semantics():
    obj = ac.AutoTrackable()
    v = f32(1.0)
    obj.l = [1, v]
    assert obj.l == [1, v]
    assert len(obj.l) == 2 and obj.l[1] is v


# ---------------------------------------------------------------- B12 list element names


def test_b12_list_element_named_by_position_including_non_trackables(prefix):
    obj = ac.AutoTrackable()
    obj.l = [1, 2, 3, 4, f32(5.0)]
    meta = ac.object_metadata(written(obj, prefix))
    assert [name for name, _ in children(meta, node_at(meta, "l"))] == ["4"]


def test_b12_append_tracks_new_element(prefix):
    obj = ac.AutoTrackable()
    obj.l = [f32(1.0)]
    obj.l.append(f32(2.0))
    path = written(obj, prefix)
    assert keys(path) == [GRAPH_KEY, "l/0" + VALUE, "l/1" + VALUE]
    assert ac.load_variable(path, "l/1" + VALUE) == 2.0


def test_b12_extend_tracks_new_elements(prefix):
    obj = ac.AutoTrackable()
    obj.l = [7]
    obj.l.extend([f32(1.0), 8, f32(2.0)])
    assert keys(written(obj, prefix)) == [GRAPH_KEY, "l/1" + VALUE, "l/3" + VALUE]


def test_b12_imul_positive_repeats_names(prefix):
    v = f32(1.0)
    obj = ac.AutoTrackable()
    obj.l = [1, 2, 3, 4, v]
    obj.l *= 2
    meta = ac.object_metadata(written(obj, prefix))
    list_children = dict(children(meta, node_at(meta, "l")))
    assert set(list_children) == {"4", "9"}
    assert list_children["4"] == list_children["9"]


# ---------------------------------------------------------------- B13 dict/tuple names


def test_b13_dict_elements_named_by_key(prefix):
    obj = ac.AutoTrackable()
    obj.d = {"first": f32(1.0), "second": f32(2.0), "plain": 3}
    path = written(obj, prefix)
    assert keys(path) == [GRAPH_KEY, "d/first" + VALUE, "d/second" + VALUE]
    assert obj.d["plain"] == 3


def test_b13_dict_setitem_tracks(prefix):
    obj = ac.AutoTrackable()
    obj.d = {}
    obj.d["late"] = f32(1.0)
    assert keys(written(obj, prefix)) == [GRAPH_KEY, "d/late" + VALUE]


def test_b13_tuple_elements_named_by_index(prefix):
    obj = ac.AutoTrackable()
    obj.t = (1, f32(1.0), f32(2.0))
    assert keys(written(obj, prefix)) == [GRAPH_KEY, "t/1" + VALUE, "t/2" + VALUE]


def test_b13_namedtuple_elements_named_by_field_and_index(prefix):
    named = collections.namedtuple("Named", ("x", "y"))
    v = f32(2.0)
    m = ac.Module()
    m.nt = named(x=v, y=2)
    assert m.nt.x is v and m.nt[0] is v and m.nt.y == 2
    path = written(m, prefix)
    meta = ac.object_metadata(path)
    nt_children = dict(children(meta, node_at(meta, "nt")))
    assert set(nt_children) == {"0", "x"}
    assert nt_children["0"] == nt_children["x"]
    # TF tracks field names before indices, so the first BFS path uses the field name.
    assert keys(path) == [GRAPH_KEY, "nt/x" + VALUE]


# ---------------------------------------------------------------- B14 append-only saveability

LIST_FRAGMENT = re.escape("Unable to save the object ListWrapper(") + r"(?s:.*)" + re.escape(
    "(a list wrapper constructed to track trackable TensorFlow objects)."
)


def _set_item(lst):
    lst[0] = f32(9.0)


def _del_item(lst):
    del lst[0]


def _del_slice(lst):
    del lst[0:1]


def _set_slice(lst):
    lst[:] = [1, lst[1]]


def _insert_trackable(lst):
    lst.insert(0, f32(9.0))


def _imul_zero(lst):
    lst *= 0


@pytest.mark.parametrize(
    "mutate", [_set_item, _del_item, _del_slice, _set_slice, _insert_trackable, _imul_zero],
    ids=["setitem", "delitem", "delslice", "setslice", "insert", "imul0"],
)
def test_b14_list_non_append_mutation_fails_at_save(prefix, mutate):
    obj = ac.AutoTrackable()
    obj.l = [f32(1.0), f32(2.0)]
    mutate(obj.l)  # no error at mutation time
    with pytest.raises(ValueError, match=LIST_FRAGMENT):
        written(obj, prefix)


def test_b14_list_replacement_message_names_cause(prefix):
    obj = ac.AutoTrackable()
    obj.l = [f32(1.0)]
    obj.l[0] = f32(2.0)
    with pytest.raises(ValueError, match=re.escape("A list element was replaced")):
        written(obj, prefix)


def test_b14_list_sort_fails_at_save(prefix):
    obj = ac.AutoTrackable()
    obj.l = [[2], [1]]
    obj.l.sort()
    with pytest.raises(ValueError, match=LIST_FRAGMENT):
        written(obj, prefix)


def test_b14_list_modified_outside_wrapper_fails_at_save(prefix):
    original = [f32(1.0)]
    obj = ac.AutoTrackable()
    obj.l = original
    original.append(f32(2.0))
    with pytest.raises(ValueError, match=re.escape("modified outside the wrapper")):
        written(obj, prefix)


def test_b14_mutating_list_without_trackables_is_fine(prefix):
    obj = ac.AutoTrackable()
    obj.l = [1, 2, 3]
    obj.l.insert(0, 0)
    obj.l[1] = 5
    del obj.l[2]
    obj.l.sort()
    obj.l *= 0
    path = written(obj, prefix)
    assert keys(path) == [GRAPH_KEY]


def test_b14_dict_non_string_key_to_trackable_fails_at_save(prefix):
    obj = ac.AutoTrackable()
    obj.d = {1: f32(1.0)}
    fragment = "contains a non-string key which maps to a trackable object or mutable data structure"
    with pytest.raises(ValueError, match=re.escape(fragment)):
        written(obj, prefix)


def test_b14_dict_non_string_key_to_plain_value_is_fine(prefix):
    obj = ac.AutoTrackable()
    obj.d = {1: 2, "a": f32(1.0)}
    assert keys(written(obj, prefix)) == [GRAPH_KEY, "d/a" + VALUE]


def test_b14_dict_modified_outside_wrapper_fails_at_save(prefix):
    original = {"a": f32(1.0)}
    obj = ac.AutoTrackable()
    obj.d = original
    original["b"] = f32(2.0)
    with pytest.raises(ValueError, match=re.escape("modified outside the wrapper")):
        written(obj, prefix)


# ---------------------------------------------------------------- B15 empty containers


def test_b15_empty_containers_ignored(tmp_path):
    path = ac.Checkpoint(a=[]).save(str(tmp_path / "ckpt"))
    load_root = ac.Checkpoint(b=[])
    load_root.dep = []
    load_root.dep.append([])
    status = load_root.restore(path)
    status.assert_consumed()
    status.assert_existing_objects_matched()
    status.assert_nontrivial_match()


def test_b15_adding_empty_data_structures_after_save(prefix):
    model = ac.AutoTrackable()
    model.v = f32(1.0)
    path = ac.Checkpoint(model=model).save(prefix)
    model2 = ac.AutoTrackable()
    model2.v = f32(0.0)
    model2.dict = {"a": 1}
    model2.list = [1, 2]
    ac.Checkpoint(model=model2).restore(path).assert_existing_objects_matched()
    assert model2.v.numpy() == 1.0


def test_b15_objects_without_attributes_never_unmatched(prefix):
    path = ac.Checkpoint(v=f32(1.0)).save(prefix)
    load_root = ac.Checkpoint(v=f32(0.0), extra=ac.AutoTrackable())
    load_root.extra.inner = ac.Trackable()
    load_root.restore(path).assert_existing_objects_matched().assert_consumed()


# ---------------------------------------------------------------- B16 restoring into containers


def test_b16_dict_restored_when_assigned_after_restore(prefix):
    save = ac.Checkpoint()
    save.mapped = {"one": f32(1.0), "two": f32(2.0)}
    path = save.save(prefix)
    restore = ac.Checkpoint()
    restore.restore(path)
    v2 = f32(0.0)
    restore.mapped = {"two": v2}
    assert v2.numpy() == 2.0


def test_b16_dict_restored_when_assigned_before_restore(prefix):
    save = ac.Checkpoint()
    save.mapped = {"two": f32(2.0)}
    path = save.save(prefix)
    restore = ac.Checkpoint()
    v2 = f32(0.0)
    restore.mapped = {"two": v2}
    restore.restore(path).assert_consumed()
    assert v2.numpy() == 2.0


def test_b16_list_element_restored_on_append(prefix):
    save = ac.Checkpoint()
    save.listed = [f32(1.0)]
    save.listed.append(f32(2.0))
    path = save.save(prefix)
    restore = ac.Checkpoint()
    restore.restore(path)
    restore.listed = []
    v1 = f32(0.0)
    restore.listed.append(v1)
    assert v1.numpy() == 1.0
    v2 = f32(0.0)
    restore.listed.append(v2)
    assert v2.numpy() == 2.0


def test_b16_restore_into_list_and_dict(prefix, save_options):
    ckpt = ac.Checkpoint(a=[f32(0.0), f32(1.0)], b={"a": f32(2.0), "b": f32(3.0)})
    path = ckpt.save(prefix, options=save_options)
    ckpt.sync()
    load = ac.Checkpoint(a=[f32(4.0), f32(5.0)], b={"a": f32(6.0), "b": f32(7.0)})
    load.restore(path).assert_consumed()
    assert [v.numpy() for v in load.a] == [0.0, 1.0]
    assert {k: v.numpy() for k, v in load.b.items()} == {"a": 2.0, "b": 3.0}
