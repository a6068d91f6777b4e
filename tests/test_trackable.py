"""Unit tests for ``asyncckpt.model.trackable`` and ``asyncckpt.model.autotrackable``.

Named edges, overwrite and deletion rules, and the deferred-dependency queue: a restore position
waiting under a name is applied when a dependency with that name is attached. Positions come from
the real restore engine (``restore.RestoreCoordinator``) over an in-memory reader, so no file is
touched.
"""

from __future__ import annotations


import numpy as np
import pytest

from asyncckpt.model.autotrackable import AutoTrackable
from asyncckpt.model.data_structures import DictWrapper, ListWrapper
from asyncckpt.restore import CheckpointPosition, RestoreCoordinator
from asyncckpt.model.trackable import NoDependency, Trackable, TrackableReference
from asyncckpt.model.variable import Variable
from _fakes import MemoryReader

VALUE = ".ATTRIBUTES/VARIABLE_VALUE"


def variable_node(key):
    return {"children": [], "attributes": [{"name": "VARIABLE_VALUE", "full_name": "", "checkpoint_key": key}]}


def restore_root(graph, values, root):
    """Start a restore of ``graph`` into ``root``; return the coordinator (partial restores expected)."""
    coordinator = RestoreCoordinator(graph, MemoryReader(values))
    coordinator.expect_partial()
    CheckpointPosition(coordinator, 0).restore(root)
    return coordinator


def one_variable_graph(name="v"):
    """root --name--> variable, valued 3.0."""
    key = f"{name}/{VALUE}"
    graph = {"nodes": [{"children": [{"node_id": 1, "local_name": name}]}, variable_node(key)]}
    return graph, {key: np.array(3.0, np.float32)}


class Bare(Trackable):
    """A trackable subclass that never calls ``Trackable.__init__``."""

    def __init__(self):
        self.payload = 1


# ---------------------------------------------------------------- Trackable edges


def test_subclass_without_init_call_is_initialised_lazily():
    obj = Bare()
    assert obj._trackable_children() == {}
    assert obj._deferred_dependencies == {}
    assert obj._update_uid == -1
    child = Variable(1.0)
    assert obj._track_trackable(child, "c") is child
    assert obj._lookup_dependency("c") is child


def test_edges_keep_insertion_order():
    obj = Trackable()
    children = [Variable(float(i)) for i in range(5)]
    for name, child in zip("edcba", children):
        obj._track_trackable(child, name)
    assert list(obj._trackable_children()) == list("edcba")
    assert [ref.name for ref in obj._checkpoint_dependencies] == list("edcba")
    assert [ref.ref for ref in obj._checkpoint_dependencies] == children


def test_checkpoint_dependencies_is_a_copy():
    obj = Trackable()
    obj._track_trackable(Variable(1.0), "a")
    deps = obj._checkpoint_dependencies
    deps.clear()
    assert list(obj._trackable_children()) == ["a"]


def test_trackable_reference_unpacks_and_reprs():
    v = Variable(1.0, name="w")
    ref = TrackableReference("edge", v)
    name, target = ref
    assert (name, target) == ("edge", v)
    assert repr(ref) == f"TrackableReference(name='edge', ref={v!r})"


@pytest.mark.parametrize("value", [1, "x", np.zeros(2), [Variable(1.0)], None], ids=["int", "str", "array", "list",
                                                                                     "None"])
def test_track_non_trackable_refused(value):
    with pytest.raises(TypeError) as info:
        Trackable()._track_trackable(value, "x")
    assert str(info.value) == (
        "Trackable._track_trackable() can only be used to track objects of type Trackable. "
        f"Got type {type(value).__name__}."
    )


def test_duplicate_name_refused_and_original_kept():
    obj = Trackable()
    first = Variable(1.0)
    obj._track_trackable(first, "a")
    with pytest.raises(ValueError, match=r"with name='a', but a Trackable with this name is already declared"):
        obj._track_trackable(Variable(2.0), "a")
    assert obj._lookup_dependency("a") is first
    assert len(obj._checkpoint_dependencies) == 1


def test_tracking_same_object_again_adds_no_edge():
    obj = Trackable()
    v = Variable(1.0)
    obj._track_trackable(v, "a")
    assert obj._track_trackable(v, "a") is v
    assert obj._track_trackable(v, "a", overwrite=True) is v
    assert len(obj._checkpoint_dependencies) == 1


def test_same_object_under_two_names_is_two_edges():
    obj = Trackable()
    v = Variable(1.0)
    obj._track_trackable(v, "a")
    obj._track_trackable(v, "b")
    assert obj._trackable_children() == {"a": v, "b": v}


def test_overwrite_replaces_in_place():
    obj = Trackable()
    a, b, c, replacement = (Variable(float(i)) for i in range(4))
    for name, child in (("a", a), ("b", b), ("c", c)):
        obj._track_trackable(child, name)
    assert obj._track_trackable(replacement, "b", overwrite=True) is replacement
    assert obj._trackable_children() == {"a": a, "b": replacement, "c": c}
    assert list(obj._trackable_children()) == ["a", "b", "c"]


def test_delete_tracking_then_retrack_appends_at_end():
    obj = Trackable()
    a, b = Variable(1.0), Variable(2.0)
    obj._track_trackable(a, "a")
    obj._track_trackable(b, "b")
    obj._delete_tracking("a")
    assert obj._lookup_dependency("a") is None
    obj._track_trackable(a, "a")
    assert list(obj._trackable_children()) == ["b", "a"]
    obj._delete_tracking("never-tracked")  # no error
    assert list(obj._trackable_children()) == ["b", "a"]


def test_lookup_dependency_prefers_cached_mapping():
    obj = Trackable()
    v, other = Variable(1.0), Variable(2.0)
    obj._track_trackable(v, "a")
    assert obj._lookup_dependency("a") is v
    assert obj._lookup_dependency("missing") is None
    assert obj._lookup_dependency("a", cached_dependencies={"a": other}) is other
    assert obj._lookup_dependency("a", cached_dependencies={}) is None


def test_default_value_protocol():
    obj = Trackable()
    assert obj._serialize_to_tensors() == {}
    assert obj._checkpoint_attribute_names() == ()
    obj._restore_from_tensors({})
    with pytest.raises(NotImplementedError, match=r"Trackable does not restore attributes \['a', 'b'\]"):
        obj._restore_from_tensors({"b": 1, "a": 2})


def test_attribute_names_follow_serialize_to_tensors():
    class Two(Trackable):
        def _serialize_to_tensors(self):
            return {"first": np.zeros(1), "second": np.ones(1)}

    assert Two()._checkpoint_attribute_names() == ("first", "second")


# ---------------------------------------------------------------- deferred queue


def test_missing_child_is_queued_then_restored_on_attach():
    graph, values = one_variable_graph()
    root = Trackable()
    coordinator = restore_root(graph, values, root)
    queued = root._deferred_dependencies["v"]
    assert [position.proto_id for position in queued] == [1]
    v = Variable(np.float32(0.0))
    root._track_trackable(v, "v")
    assert float(v) == 3.0
    assert "v" not in root._deferred_dependencies
    assert v._update_uid == coordinator.restore_uid
    assert coordinator.object_by_proto_id.get(1) is v


def test_queue_is_keyed_by_name():
    graph, values = one_variable_graph("v")
    root = Trackable()
    restore_root(graph, values, root)
    other = Variable(np.float32(0.0))
    root._track_trackable(other, "w")
    assert float(other) == 0.0
    assert "v" in root._deferred_dependencies


def test_attach_restores_whole_subtree():
    key = f"a/b/{VALUE}"
    graph = {
        "nodes": [
            {"children": [{"node_id": 1, "local_name": "a"}]},
            {"children": [{"node_id": 2, "local_name": "b"}]},
            variable_node(key),
        ]
    }
    root = Trackable()
    reader_values = {key: np.array([1, 2], np.int64)}
    coordinator = restore_root(graph, reader_values, root)
    subtree = Trackable()
    leaf = Variable(np.zeros(2, np.int64))
    subtree._track_trackable(leaf, "b")
    root._track_trackable(subtree, "a")
    np.testing.assert_array_equal(leaf.numpy(), [1, 2])
    assert coordinator.reader.reads == [[key]]


def test_queued_on_deeper_parent_when_subtree_is_partial():
    key = f"a/b/{VALUE}"
    graph = {
        "nodes": [
            {"children": [{"node_id": 1, "local_name": "a"}]},
            {"children": [{"node_id": 2, "local_name": "b"}]},
            variable_node(key),
        ]
    }
    root, middle = Trackable(), Trackable()
    root._track_trackable(middle, "a")
    restore_root(graph, {key: np.array(5.0)}, root)
    assert "b" in middle._deferred_dependencies and not root._deferred_dependencies
    leaf = Variable(0.0)
    middle._track_trackable(leaf, "b")
    assert float(leaf) == 5.0


def test_nodes_without_values_are_not_queued():
    graph = {"nodes": [{"children": [{"node_id": 1, "local_name": "empty"}]}, {"children": []}]}
    root = Trackable()
    restore_root(graph, {}, root)
    assert root._deferred_dependencies == {}


def test_overwrite_of_existing_name_does_not_reapply_restore():
    graph, values = one_variable_graph()
    root = Trackable()
    restore_root(graph, values, root)
    first = Variable(np.float32(0.0))
    root._track_trackable(first, "v")
    second = Variable(np.float32(0.0))
    root._track_trackable(second, "v", overwrite=True)
    assert float(first) == 3.0 and float(second) == 0.0


def test_newest_restore_wins_whatever_queue_order():
    graph, _ = one_variable_graph()
    key = f"v/{VALUE}"
    root = Trackable()
    older = RestoreCoordinator(graph, MemoryReader({key: np.array(1.0)}))
    newer = RestoreCoordinator(graph, MemoryReader({key: np.array(2.0)}))
    for coordinator in (older, newer):
        coordinator.expect_partial()
    # Queue the newer restore first: application order must not depend on queue order.
    CheckpointPosition(newer, 0).restore(root)
    CheckpointPosition(older, 0).restore(root)
    assert len(root._deferred_dependencies["v"]) == 2
    v = Variable(0.0)
    root._track_trackable(v, "v")
    assert float(v) == 2.0
    assert v._update_uid == newer.restore_uid
    # Both restores bound the new variable; only the newer one assigned it.
    assert older.object_by_proto_id.get(1) is v and newer.object_by_proto_id.get(1) is v
    assert older.reader.reads == [] and newer.reader.reads == [[key]]


# ---------------------------------------------------------------- AutoTrackable


def test_attribute_assignment_tracks_trackables_in_order():
    obj = AutoTrackable()
    obj.zeta = Variable(1.0)
    obj.alpha = Variable(2.0)
    obj._private = Variable(3.0)
    assert list(obj._trackable_children()) == ["zeta", "alpha", "_private"]
    assert obj._trackable_children()["zeta"] is obj.zeta


def test_self_prefixed_attributes_are_never_tracked():
    obj = AutoTrackable()
    obj._self_cache = Variable(1.0)
    assert obj._trackable_children() == {}
    assert isinstance(obj._self_cache, Variable)


def test_attribute_overwrite_keeps_position():
    obj = AutoTrackable()
    obj.a = Variable(1.0)
    obj.b = Variable(2.0)
    replacement = Variable(3.0)
    obj.a = replacement
    assert list(obj._trackable_children()) == ["a", "b"]
    assert obj._trackable_children()["a"] is replacement is obj.a


def test_non_trackable_values_are_plain_attributes():
    obj = AutoTrackable()
    obj.n = 3
    obj.arr = np.zeros(2)
    obj.t = (1, 2)
    assert obj._trackable_children() == {}
    assert obj.n == 3 and type(obj.t) is tuple


def test_containers_are_wrapped_and_tracked():
    obj = AutoTrackable()
    obj.layers = [Variable(1.0)]
    obj.table = {"k": Variable(2.0)}
    assert isinstance(obj.layers, ListWrapper) and isinstance(obj.table, DictWrapper)
    assert obj._trackable_children() == {"layers": obj.layers, "table": obj.table}


def test_no_dependency_stores_value_untracked():
    obj = AutoTrackable()
    v = Variable(1.0)
    raw = [Variable(2.0)]
    obj.v = NoDependency(v)
    obj.raw = NoDependency(raw)
    assert obj.v is v and obj.raw is raw and type(obj.raw) is list
    assert obj._trackable_children() == {}
    assert repr(NoDependency(5)) == "NoDependency(5)"


def test_delattr_removes_dependency_and_attribute():
    obj = AutoTrackable()
    obj.a = Variable(1.0)
    obj.b = Variable(2.0)
    del obj.a
    assert list(obj._trackable_children()) == ["b"]
    assert not hasattr(obj, "a")
    with pytest.raises(AttributeError):
        del obj.missing
    assert list(obj._trackable_children()) == ["b"]


def test_attribute_assignment_fulfils_deferred_restore():
    graph, values = one_variable_graph("weights")
    root = AutoTrackable()
    restore_root(graph, values, root)
    root.weights = Variable(np.float32(0.0))
    assert float(root.weights) == 3.0
    assert root._deferred_dependencies == {}


def test_dict_assignment_fulfils_deferred_restore_of_its_entries():
    key = f"table/k/{VALUE}"
    graph = {
        "nodes": [
            {"children": [{"node_id": 1, "local_name": "table"}]},
            {"children": [{"node_id": 2, "local_name": "k"}]},
            variable_node(key),
        ]
    }
    root = AutoTrackable()
    restore_root(graph, {key: np.array(9, np.int32)}, root)
    v = Variable(np.int32(0))
    root.table = {"k": v}
    assert int(v) == 9
