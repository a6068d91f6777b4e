"""Unit tests for ``asyncckpt.graph``: key naming, the breadth-first walk, slots, and node names.

Everything here is pure: live trackables in, an object-graph document and ``(key, source)`` entries
out. Escaping is checked as a property (any local name, any path) with Hypothesis.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt.model.autotrackable import AutoTrackable
from asyncckpt.graph import (
    OBJECT_GRAPH_KEY,
    GraphView,
    SerializedGraph,
    checkpoint_key,
    escape_local_name,
    has_checkpoint_values,
    list_objects,
    object_path_to_string,
    pretty_node_names,
    serialize_graph,
    slot_variable_key,
)
from asyncckpt.model.trackable import Trackable, TrackableReference
from asyncckpt.model.variable import Variable

VALUE = ".ATTRIBUTES/VARIABLE_VALUE"
HYPOTHESIS = settings(deadline=None, max_examples=300)


def unescape_local_name(escaped: str) -> str:
    """The inverse of ``escape_local_name``; fails on a string it cannot have produced."""
    out = []
    index = 0
    while index < len(escaped):
        char = escaped[index]
        if char == ".":
            following = escaped[index + 1]
            assert following in ".S", escaped
            out.append("." if following == "." else "/")
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def var(value=0.0, name=None):
    return Variable(np.float32(value), name=name)


def edges(node):
    return [(child["local_name"], child["node_id"]) for child in node["children"]]


class SlotProvider(Trackable):
    """An optimizer-like trackable exposing the slot protocol over a ``{(variable, name): slot}`` map."""

    def __init__(self, slot_names=("m",)):
        self.slot_names = list(slot_names)
        self.slots = {}

    def get_slot_names(self):
        return self.slot_names

    def get_slot(self, variable, slot_name):
        return self.slots.get((id(variable), slot_name))

    def add(self, variable, slot_name, value=0.0):
        slot = var(value, name=f"{slot_name}_slot")
        self.slots[(id(variable), slot_name)] = slot
        return slot


# ---------------------------------------------------------------- escaping and keys


@pytest.mark.parametrize(
    "name, escaped",
    [("a", "a"), ("a/b", "a.Sb"), ("a.b", "a..b"), ("./", "...S"), ("/.", ".S.."), (".S", "..S"),
     (".ATTRIBUTES", "..ATTRIBUTES"), ("", "")],
)
def test_escape_local_name_examples(name, escaped):
    assert escape_local_name(name) == escaped
    assert unescape_local_name(escaped) == name


@HYPOTHESIS
@given(st.text())
def test_escape_round_trips_and_leaves_no_separator(name):
    escaped = escape_local_name(name)
    assert "/" not in escaped
    assert unescape_local_name(escaped) == name


@HYPOTHESIS
@given(st.text(alphabet="./Sa", max_size=8), st.text(alphabet="./Sa", max_size=8))
def test_escape_is_injective(first, second):
    # A small alphabet makes the interesting collisions (".S" vs "/", ".." vs ".") likely.
    if first != second:
        assert escape_local_name(first) != escape_local_name(second)


@HYPOTHESIS
@given(st.text())
def test_escaped_name_never_equals_a_reserved_segment(name):
    assert escape_local_name(name) not in (".ATTRIBUTES", ".OPTIMIZER_SLOT")


@HYPOTHESIS
@given(st.lists(st.text(min_size=1), min_size=1, max_size=5))
def test_object_path_round_trips(path):
    joined = object_path_to_string(path)
    assert [unescape_local_name(segment) for segment in joined.split("/")] == path


def test_keys_for_nested_paths():
    assert object_path_to_string(()) == ""
    assert object_path_to_string(("model", "dense/1", "kernel.v2")) == "model/dense.S1/kernel..v2"
    assert checkpoint_key("model/dense", "VARIABLE_VALUE") == "model/dense/.ATTRIBUTES/VARIABLE_VALUE"
    assert checkpoint_key("", "VARIABLE_VALUE") == "/.ATTRIBUTES/VARIABLE_VALUE"
    assert checkpoint_key("t", "a/b.c") == "t/.ATTRIBUTES/a.Sb..c"


def test_slot_keys():
    assert slot_variable_key("model/w", "opt", "m") == "model/w/.OPTIMIZER_SLOT/opt/m"
    assert slot_variable_key("w", "train/opt", "a/b") == "w/.OPTIMIZER_SLOT/train/opt/a.Sb"


# ---------------------------------------------------------------- the walk


def test_root_only():
    result = serialize_graph(GraphView(Trackable()))
    assert isinstance(result, SerializedGraph)
    assert result.object_graph == {
        "nodes": [{"children": [], "attributes": [], "slot_variables": [], "has_checkpoint_values": False}]
    }
    assert result.entries == ()


def test_nested_paths_become_keys_and_entries_are_live_sources():
    root = AutoTrackable()
    root.model = AutoTrackable()
    root.model.dense = AutoTrackable()
    kernel = var(1.0, name="kernel")
    root.model.dense.kernel = kernel
    root.bias = var(2.0)
    result = serialize_graph(GraphView(root))
    assert [key for key, _ in result.entries] == [f"bias/{VALUE}", f"model/dense/kernel/{VALUE}"]
    assert result.entries[1][1] is kernel  # the live holder, not a copy
    nodes = result.object_graph["nodes"]
    assert edges(nodes[0]) == [("model", 1), ("bias", 2)]
    kernel_node = nodes[result.objects.index(kernel)]
    assert kernel_node["attributes"] == [
        {"name": "VARIABLE_VALUE", "full_name": "kernel", "checkpoint_key": f"model/dense/kernel/{VALUE}"}
    ]


def test_node_ids_are_breadth_first_and_objects_align():
    root = AutoTrackable()
    root.a = AutoTrackable()
    root.b = AutoTrackable()
    root.a.c = var()
    root.b.d = var()
    result = serialize_graph(GraphView(root))
    assert result.objects == (root, root.a, root.b, root.a.c, root.b.d)
    assert len(result.object_graph["nodes"]) == 5


def test_shared_object_appears_once_with_an_edge_per_parent():
    root = AutoTrackable()
    shared = var(3.0)
    root.first = AutoTrackable()
    root.first.w = shared
    root.second = shared
    result = serialize_graph(GraphView(root))
    assert result.objects.count(shared) == 1
    shared_id = result.objects.index(shared)
    nodes = result.object_graph["nodes"]
    assert ("second", shared_id) in edges(nodes[0])
    assert edges(nodes[1]) == [("w", shared_id)]
    # Its key uses the first BFS path (depth 1 via "second", not depth 2 via "first/w").
    assert [key for key, _ in result.entries] == [f"second/{VALUE}"]


def test_same_object_under_two_names_of_one_parent():
    root = Trackable()
    v = var()
    root._track_trackable(v, "a")
    root._track_trackable(v, "b")
    result = serialize_graph(GraphView(root))
    assert edges(result.object_graph["nodes"][0]) == [("a", 1), ("b", 1)]
    assert [key for key, _ in result.entries] == [f"a/{VALUE}"]


def test_cycles_terminate():
    root = AutoTrackable()
    a, b = AutoTrackable(), AutoTrackable()
    root.a = a
    a.b = b
    b.back = a
    b.root = root
    b.v = var()
    result = serialize_graph(GraphView(root))
    assert result.objects[:3] == (root, a, b)
    nodes = result.object_graph["nodes"]
    assert edges(nodes[2]) == [("back", 1), ("root", 0), ("v", 3)]
    assert all(node["has_checkpoint_values"] for node in nodes)


def test_self_loop_terminates():
    root = Trackable()
    root._track_trackable(root, "me")
    result = serialize_graph(GraphView(root))
    assert edges(result.object_graph["nodes"][0]) == [("me", 0)]
    assert len(result.objects) == 1


def test_has_checkpoint_values_per_node():
    root = AutoTrackable()
    root.empty = AutoTrackable()
    root.full = AutoTrackable()
    root.full.deep = AutoTrackable()
    root.full.deep.v = var()
    nodes = serialize_graph(GraphView(root)).object_graph["nodes"]
    assert [node["has_checkpoint_values"] for node in nodes] == [True, False, True, True, True]


def test_escaped_local_names_in_keys():
    root = Trackable()
    root._track_trackable(var(), "a/b")
    root._track_trackable(var(), ".ATTRIBUTES")
    result = serialize_graph(GraphView(root))
    assert [key for key, _ in result.entries] == [f"a.Sb/{VALUE}", f"..ATTRIBUTES/{VALUE}"]
    assert edges(result.object_graph["nodes"][0]) == [("a/b", 1), (".ATTRIBUTES", 2)]


def test_custom_attributes_are_entries():
    class TwoTensors(Trackable):
        def _serialize_to_tensors(self):
            return {"first": np.zeros(2), "sec/ond": b"bytes"}

    root = Trackable()
    root._track_trackable(TwoTensors(), "t")
    result = serialize_graph(GraphView(root))
    assert [key for key, _ in result.entries] == ["t/.ATTRIBUTES/first", "t/.ATTRIBUTES/sec.Sond"]
    assert result.entries[1][1] == b"bytes"
    assert [a["full_name"] for a in result.object_graph["nodes"][1]["attributes"]] == ["first", "sec/ond"]


def test_colliding_keys_refused():
    # The root's own attribute key and a child named "" both map to "/.ATTRIBUTES/VARIABLE_VALUE".
    root = var()
    root._track_trackable(var(), "")
    with pytest.raises(ValueError, match=r"multiple tensors with the same checkpoint key .* Key: /\.ATTRIBUTES/"):
        serialize_graph(GraphView(root))


def test_unsaveable_container_error_propagates():
    root = AutoTrackable()
    root.items = [var(), var()]
    root.items.reverse()
    with pytest.raises(ValueError, match="append-only"):
        serialize_graph(GraphView(root))


def test_object_graph_key_constant():
    assert OBJECT_GRAPH_KEY == "_CHECKPOINTABLE_OBJECT_GRAPH"


# ---------------------------------------------------------------- slots


def test_slots_are_appended_after_the_walk():
    root = AutoTrackable()
    root.w1 = var(name="w1")
    root.w2 = var(name="w2")
    root.opt = SlotProvider(("m", "v"))
    slots = {
        ("m", "w1"): root.opt.add(root.w1, "m"),
        ("m", "w2"): root.opt.add(root.w2, "m"),
        ("v", "w2"): root.opt.add(root.w2, "v"),
    }
    result = serialize_graph(GraphView(root))
    nodes = result.object_graph["nodes"]
    assert result.objects[4:] == (slots[("m", "w1")], slots[("m", "w2")], slots[("v", "w2")])
    assert nodes[3]["slot_variables"] == [
        {"original_variable_node_id": 1, "slot_name": "m", "slot_variable_node_id": 4},
        {"original_variable_node_id": 2, "slot_name": "m", "slot_variable_node_id": 5},
        {"original_variable_node_id": 2, "slot_name": "v", "slot_variable_node_id": 6},
    ]
    keys = [key for key, _ in result.entries]
    assert keys[2:] == [
        "w1/.OPTIMIZER_SLOT/opt/m/.ATTRIBUTES/VARIABLE_VALUE",
        "w2/.OPTIMIZER_SLOT/opt/m/.ATTRIBUTES/VARIABLE_VALUE",
        "w2/.OPTIMIZER_SLOT/opt/v/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    assert nodes[4]["attributes"][0]["full_name"] == "m_slot"
    assert nodes[3]["has_checkpoint_values"] is True
    assert all(edges(node) == [] for node in nodes[4:])


def test_skip_slots():
    root = AutoTrackable()
    root.w = var()
    root.opt = SlotProvider()
    root.opt.add(root.w, "m")
    result = serialize_graph(GraphView(root), skip_slots=True)
    assert len(result.objects) == 3
    assert result.object_graph["nodes"][2]["slot_variables"] == []
    assert result.object_graph["nodes"][2]["has_checkpoint_values"] is False


def test_slots_of_unsaved_variables_are_not_saved():
    root = AutoTrackable()
    outside = var()
    root.opt = SlotProvider()
    root.opt.add(outside, "m")
    result = serialize_graph(GraphView(root))
    assert len(result.objects) == 2 and result.entries == ()


def test_get_slot_key_error_means_no_slot():
    class Raising(SlotProvider):
        def get_slot(self, variable, slot_name):
            raise KeyError(slot_name)

    root = AutoTrackable()
    root.w = var()
    root.opt = Raising()
    assert len(serialize_graph(GraphView(root)).objects) == 3


def test_slot_reused_as_dependency_refused():
    root = AutoTrackable()
    root.w = var()
    root.opt = SlotProvider()
    root.also = root.opt.add(root.w, "m")
    with pytest.raises(NotImplementedError, match="A slot variable was re-used as a dependency"):
        serialize_graph(GraphView(root))


def test_slot_with_dependencies_refused():
    root = AutoTrackable()
    root.w = var()
    root.opt = SlotProvider()
    slot = root.opt.add(root.w, "m")
    slot._track_trackable(var(), "child")
    with pytest.raises(NotImplementedError, match="only variables with no dependencies can be saved as slot"):
        serialize_graph(GraphView(root))


def test_list_objects_with_and_without_slots():
    root = AutoTrackable()
    root.w = var()
    root.opt = SlotProvider()
    slot = root.opt.add(root.w, "m")
    root.cycle = root
    assert list_objects(GraphView(root)) == [root, root.w, root.opt, slot]
    assert list_objects(GraphView(root), skip_slots=True) == [root, root.w, root.opt]


# ---------------------------------------------------------------- GraphView


def test_weak_root_and_collected_root():
    root = AutoTrackable()
    root.v = var()
    view = GraphView(weakref.ref(root))
    assert view.root_object is root
    assert len(serialize_graph(view).objects) == 2
    del root
    gc.collect()
    with pytest.raises(ValueError, match="root object of this Checkpoint has been garbage-collected"):
        view.root_object


def test_attached_dependencies_hang_off_the_root_only():
    root = AutoTrackable()
    root.own = var()
    extra = var()
    collected = var()
    view = GraphView(root, (TrackableReference("extra", extra),
                            TrackableReference("gone", weakref.ref(collected))))
    del collected
    gc.collect()
    assert view.children_edges(root) == [("own", root.own), ("extra", extra)]
    assert view.children_edges(extra) == []
    result = serialize_graph(view)
    assert edges(result.object_graph["nodes"][0]) == [("own", 1), ("extra", 2)]
    assert [key for key, _ in result.entries] == [f"own/{VALUE}", f"extra/{VALUE}"]


def test_attached_name_clashing_with_root_child_is_consistent():
    root = AutoTrackable()
    root.x = var(1.0)
    view = GraphView(root, (TrackableReference("x", var(2.0)),))
    edges = view.children_edges(root)
    assert [name for name, _ in edges] == ["x"]
    assert edges[0][1] is root.x  # the root's own child wins over an attached one of the same name


# ---------------------------------------------------------------- pure helpers over node lists


def test_has_checkpoint_values_with_cycles():
    nodes = [
        {"children": [{"node_id": 1, "local_name": "a"}, {"node_id": 3, "local_name": "c"}]},
        {"children": [{"node_id": 2, "local_name": "b"}]},
        {"children": [{"node_id": 1, "local_name": "back"}]},  # 1 <-> 2, no values anywhere
        {"children": [{"node_id": 4, "local_name": "d"}]},
        {"children": [{"node_id": 3, "local_name": "up"}], "attributes": [{"name": "x"}]},  # 3 <-> 4
    ]
    assert has_checkpoint_values(nodes) == [True, False, False, True, True]


def test_has_checkpoint_values_counts_slots_and_missing_fields():
    nodes = [
        {"children": [{"node_id": 1, "local_name": "opt"}]},
        {"slot_variables": [{"original_variable_node_id": 0, "slot_name": "m", "slot_variable_node_id": 2}]},
        {},
    ]
    assert has_checkpoint_values(nodes) == [True, True, False]


def test_has_checkpoint_values_propagates_up_a_long_chain():
    length = 50
    # Children point to higher ids; only the last node has a value, so one pass in id order is not enough
    # unless the walk repeats until nothing changes.
    nodes = [{"children": [{"node_id": i + 1, "local_name": "n"}]} for i in range(length - 1)]
    nodes.append({"attributes": [{"name": "x"}]})
    assert has_checkpoint_values(nodes) == [True] * length


def test_pretty_node_names():
    nodes = [
        {"children": [{"node_id": 1, "local_name": "model"}, {"node_id": 3, "local_name": "opt"}]},
        {"children": [{"node_id": 2, "local_name": "w"}, {"node_id": 0, "local_name": "parent"}]},
        {"children": []},
        {"children": [], "slot_variables": [
            {"original_variable_node_id": 2, "slot_name": "m", "slot_variable_node_id": 4}]},
        {"children": []},
        {"children": []},
    ]
    assert pretty_node_names(nodes) == {
        0: "(root)",
        1: "(root).model",
        2: "(root).model.w",
        3: "(root).opt",
        4: "(root).opt's state 'm' for (root).model.w",
        5: "(unreachable node 5)",
    }


def test_pretty_names_of_a_serialized_graph():
    root = AutoTrackable()
    root.w = var()
    root.opt = SlotProvider()
    root.opt.add(root.w, "m")
    names = pretty_node_names(serialize_graph(GraphView(root)).object_graph["nodes"])
    assert names[3] == "(root).opt's state 'm' for (root).w"
