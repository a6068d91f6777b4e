"""Unit tests for ``asyncckpt.restore``: graph validation, binding, value application and teardown logs.

The engine only needs three calls from a reader (``keys()``, ``spec(key)``, ``read_many(keys)``), so an
in-memory reader stands in for the I/O side and records every batch it is asked for.
"""

from __future__ import annotations

import copy
import gc
import logging

import numpy as np
import pytest

from asyncckpt.model.data_structures import TupleWrapper
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.restore import (
    CheckpointPosition,
    RestoreCoordinator,
    next_restore_uid,
    preload_simple_restoration,
    validate_object_graph,
    variable_from_position,
)
from asyncckpt.model.trackable import Trackable
from asyncckpt.model.variable import Variable
from _fakes import MemoryReader

VALUE = ".ATTRIBUTES/VARIABLE_VALUE"
TEARDOWN = "is being deleted with unrestored values"


def attribute(key, name="VARIABLE_VALUE"):
    return {"name": name, "full_name": "", "checkpoint_key": key}


def node(children=(), attributes=(), slots=()):
    return {
        "children": [{"node_id": node_id, "local_name": name} for name, node_id in children],
        "attributes": list(attributes),
        "slot_variables": [
            {"original_variable_node_id": original, "slot_name": name, "slot_variable_node_id": slot}
            for original, name, slot in slots
        ],
    }


def coordinator_for(nodes, values, **kwargs):
    return RestoreCoordinator({"nodes": copy.deepcopy(nodes)}, MemoryReader(values), **kwargs)


def f32(value):
    return Variable(np.float32(value))


def tree(**children):
    obj = Trackable()
    for name, child in children.items():
        obj._track_trackable(child, name)
    return obj


@pytest.fixture
def warnings_log(caplog):
    """``caplog`` for the ``asyncckpt`` logger, cleared of records from objects freed by earlier tests."""
    gc.collect()
    caplog.set_level(logging.WARNING, logger="asyncckpt")
    caplog.clear()
    return caplog


def messages(caplog):
    return [record.getMessage() for record in caplog.records if record.name == "asyncckpt"]


# ---------------------------------------------------------------- validate_object_graph


def _graph(*nodes):
    return {"nodes": list(nodes)}


MALFORMED = [
    (None, "has no node list"),
    ({}, "has no node list"),
    ({"nodes": []}, "has no node list"),
    ({"nodes": "abc"}, "has no node list"),
    ([{"children": []}], "has no node list"),
    (_graph(5), "node 0 is not an object"),
    (_graph({}, ["x"]), "node 1 is not an object"),
    (_graph({"children": [5]}), "node 0 has a malformed child edge"),
    (_graph({"children": [{"node_id": 0}]}), "node 0 has a malformed child edge"),
    (_graph({"children": [{"node_id": 0, "local_name": 3}]}), "node 0 has a malformed child edge"),
    (_graph({"children": [{"node_id": 1, "local_name": "a"}]}), "a child of node 0 refers to node 1, not one of 0..0"),
    (_graph({"children": [{"node_id": -1, "local_name": "a"}]}), "refers to node -1"),
    (_graph({"children": [{"node_id": True, "local_name": "a"}]}), "refers to node True"),
    (_graph({"children": [{"node_id": "0", "local_name": "a"}]}), "refers to node '0'"),
    (_graph({"children": [{"node_id": 0.0, "local_name": "a"}]}), "refers to node 0.0"),
    (_graph({"children": [{"local_name": "a"}]}), "refers to node None"),
    (_graph({"attributes": [5]}), "node 0 has a malformed attribute"),
    (_graph({"attributes": [{"name": "VARIABLE_VALUE"}]}), "node 0 has a malformed attribute"),
    (_graph({"attributes": [{"name": 1, "checkpoint_key": "k"}]}), "node 0 has a malformed attribute"),
    (_graph({"attributes": [{"name": "V", "checkpoint_key": ["k"]}]}), "node 0 has a malformed attribute"),
    (_graph({"attributes": [attribute("missing")]}),
     "node 0 names key 'missing', which the checkpoint does not contain"),
    (_graph({"slot_variables": [5]}), "node 0 has a malformed slot variable"),
    (_graph({"slot_variables": [{"original_variable_node_id": 0, "slot_variable_node_id": 0}]}),
     "node 0 has a malformed slot variable"),
    (_graph({"slot_variables": [{"original_variable_node_id": 7, "slot_name": "m", "slot_variable_node_id": 0}]}),
     "a slot of node 0 refers to node 7"),
    (_graph({"slot_variables": [{"original_variable_node_id": 0, "slot_name": "m", "slot_variable_node_id": 2}]}),
     "a slot of node 0 refers to node 2"),
    (_graph({"has_checkpoint_values": "yes"}), "node 0 has a non-boolean has_checkpoint_values"),
    (_graph({"has_checkpoint_values": 1}), "node 0 has a non-boolean has_checkpoint_values"),
]


@pytest.mark.parametrize("graph, message", MALFORMED, ids=[message for _, message in MALFORMED])
def test_malformed_graph_rejected(graph, message):
    with pytest.raises(CorruptCheckpointError, match="object graph") as info:
        validate_object_graph(graph, ["k"])
    assert message in str(info.value)


@pytest.mark.parametrize("field", ["children", "attributes", "slot_variables"])
@pytest.mark.parametrize("value", [5, None], ids=["int", "None"])
def test_non_list_fields_rejected_as_corrupt(field, value):
    with pytest.raises(CorruptCheckpointError):
        validate_object_graph({"nodes": [{field: value}]}, [])


def test_valid_graph_gets_default_fields():
    nodes = validate_object_graph(
        {"nodes": [{"children": [{"node_id": 1, "local_name": "v"}]}, {"attributes": [attribute("k")]}]}, ["k"]
    )
    assert nodes == [
        {"children": [{"node_id": 1, "local_name": "v"}], "attributes": [], "slot_variables": []},
        {"children": [], "attributes": [attribute("k")], "slot_variables": []},
    ]


def test_cyclic_and_self_referencing_graphs_are_valid():
    nodes = [node(children=[("self", 0), ("b", 1)]), node(children=[("back", 0)])]
    assert len(validate_object_graph({"nodes": nodes}, [])) == 2


def test_coordinator_validates_against_reader_keys():
    nodes = [node(children=[("v", 1)]), node(attributes=[attribute(f"v/{VALUE}")])]
    with pytest.raises(CorruptCheckpointError, match=r"names key 'v/\.ATTRIBUTES/VARIABLE_VALUE'"):
        coordinator_for(nodes, {"other": np.zeros(1)})


def test_restore_uids_increase():
    first = next_restore_uid()
    assert next_restore_uid() > first
    a = coordinator_for([node()], {})
    b = coordinator_for([node()], {})
    assert b.restore_uid > a.restore_uid > first


# ---------------------------------------------------------------- positions


SIMPLE = [node(children=[("v", 1), ("t", 2)]), node(attributes=[attribute(f"v/{VALUE}")]),
          node(attributes=[attribute(f"t/{VALUE}"), attribute("t/.ATTRIBUTES/other", "other")])]
SIMPLE_VALUES = {f"v/{VALUE}": np.arange(3, dtype=np.int32), f"t/{VALUE}": np.zeros(1),
                 "t/.ATTRIBUTES/other": np.ones(1)}


def test_position_properties():
    coordinator = coordinator_for(SIMPLE, SIMPLE_VALUES)
    coordinator.expect_partial()
    root, v, t = (CheckpointPosition(coordinator, i) for i in range(3))
    assert root.restore_uid == coordinator.restore_uid
    assert v.object_proto is coordinator.nodes[1]
    assert root.create_child_position(2).proto_id == 2
    assert root.trackable is None
    assert [p.is_simple_variable() for p in (root, v, t)] == [False, True, False]
    assert v.value_shape() == (3,) and coordinator.reader.reads == []  # spec only, no read
    np.testing.assert_array_equal(v.value(), [0, 1, 2])
    assert coordinator.reader.reads == [[f"v/{VALUE}"]]


def test_has_checkpoint_values_prefers_recorded_flag():
    nodes = [node(children=[("a", 1), ("b", 2)]), node(), node(attributes=[attribute("k")])]
    nodes[2]["has_checkpoint_values"] = False
    coordinator = coordinator_for(nodes, {"k": np.zeros(1)})
    coordinator.expect_partial()
    assert CheckpointPosition(coordinator, 0).has_checkpoint_values()  # derived from children
    assert not CheckpointPosition(coordinator, 1).has_checkpoint_values()
    assert not CheckpointPosition(coordinator, 2).has_checkpoint_values()  # recorded flag wins


# ---------------------------------------------------------------- binding


def test_bind_object_rules(warnings_log):
    coordinator = coordinator_for(SIMPLE, SIMPLE_VALUES)
    coordinator.expect_partial()
    position = CheckpointPosition(coordinator, 1)
    first, second = f32(0), f32(0)
    assert position.bind_object(first) is True
    assert position.bind_object(first) is False
    assert messages(warnings_log) == []
    assert position.bind_object(second) is False
    assert position.trackable is first
    assert 1 in coordinator.matched_proto_ids
    [message] = messages(warnings_log)
    assert message.startswith("Inconsistent references when loading the checkpoint into this object graph.")
    assert f"The referenced variables are: ({first!r} and {second!r})." in message


def test_coordinator_holds_objects_weakly():
    coordinator = coordinator_for(SIMPLE, SIMPLE_VALUES)
    coordinator.expect_partial()
    v = f32(0)
    CheckpointPosition(coordinator, 1).bind_object(v)
    assert coordinator.object_by_proto_id.get(1) is v
    del v
    gc.collect()
    assert coordinator.object_by_proto_id.get(1) is None
    assert 1 not in coordinator.object_by_proto_id
    assert coordinator.python_objects() == []


def test_objects_without_weakref_support_are_held_strongly():
    coordinator = coordinator_for(SIMPLE, SIMPLE_VALUES)
    coordinator.expect_partial()
    wrapper = TupleWrapper((f32(0),))
    CheckpointPosition(coordinator, 2).bind_object(wrapper)
    expected = tuple(wrapper)
    del wrapper
    gc.collect()
    assert coordinator.object_by_proto_id.get(2) == expected


# ---------------------------------------------------------------- applying values


def test_restore_applies_values_in_one_batched_read():
    nodes = [
        node(children=[("a", 1), ("b", 2)]),
        node(children=[("c", 3)], attributes=[]),
        node(attributes=[attribute(f"b/{VALUE}")]),
        node(attributes=[attribute(f"a/c/{VALUE}")]),
    ]
    values = {f"b/{VALUE}": np.array([1.0, 2.0]), f"a/c/{VALUE}": np.array(7, np.int64)}
    coordinator = coordinator_for(nodes, values)
    b, c = Variable(np.zeros(2)), Variable(np.int64(0))
    a = tree(c=c)
    root = tree(a=a, b=b)
    CheckpointPosition(coordinator, 0).restore(root)
    np.testing.assert_array_equal(b.numpy(), [1.0, 2.0])
    assert int(c) == 7
    assert coordinator.reader.reads == [[f"b/{VALUE}", f"a/c/{VALUE}"]]
    assert {obj._update_uid for obj in (root, a, b, c)} == {coordinator.restore_uid}
    assert coordinator.matched_proto_ids == {0, 1, 2, 3}


def test_restore_into_same_object_twice_is_a_no_op():
    coordinator = coordinator_for(SIMPLE, SIMPLE_VALUES)
    coordinator.expect_partial()
    v = Variable(np.zeros(3, np.int32))
    root = tree(v=v)
    CheckpointPosition(coordinator, 0).restore(root)
    v.assign([9, 9, 9])
    CheckpointPosition(coordinator, 0).restore(root)
    np.testing.assert_array_equal(v.numpy(), [9, 9, 9])
    assert len(coordinator.reader.reads) == 1


def test_custom_trackable_receives_all_its_attributes():
    class Pair(Trackable):
        def __init__(self):
            self.received = None

        def _serialize_to_tensors(self):
            return {"VARIABLE_VALUE": np.zeros(1), "other": np.zeros(1)}

        def _restore_from_tensors(self, restored_tensors):
            self.received = restored_tensors

    coordinator = coordinator_for(SIMPLE, SIMPLE_VALUES)
    coordinator.expect_partial()
    pair = Pair()
    CheckpointPosition(coordinator, 0).restore(tree(t=pair))
    assert sorted(pair.received) == ["VARIABLE_VALUE", "other"]
    np.testing.assert_array_equal(pair.received["other"], [1.0])


def test_attributes_the_object_cannot_take_are_recorded_unused():
    nodes = [node(children=[("v", 1)]),
             node(attributes=[attribute(f"v/{VALUE}"), attribute("v/.ATTRIBUTES/EXTRA", "EXTRA")])]
    values = {f"v/{VALUE}": np.array(4.0, np.float32), "v/.ATTRIBUTES/EXTRA": np.zeros(1)}
    coordinator = coordinator_for(nodes, values)
    coordinator.expect_partial()
    v = f32(0)
    CheckpointPosition(coordinator, 0).restore(tree(v=v))
    assert float(v) == 4.0
    assert coordinator.unused_attributes == {1: ["EXTRA"]}
    assert coordinator.reader.reads == [[f"v/{VALUE}"]]


def test_restore_errors_from_the_object_propagate():
    coordinator = coordinator_for(SIMPLE, SIMPLE_VALUES)
    coordinator.expect_partial()
    wrong_shape = Variable(np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"incompatible tensor with shape \(3,\)"):
        CheckpointPosition(coordinator, 0).restore(tree(v=wrong_shape))


def test_missing_children_without_values_are_not_queued():
    nodes = [node(children=[("empty", 1), ("v", 2)]), node(), node(attributes=[attribute("k")])]
    coordinator = coordinator_for(nodes, {"k": np.zeros(1)})
    coordinator.expect_partial()
    root = Trackable()
    CheckpointPosition(coordinator, 0).restore(root)
    assert list(root._deferred_dependencies) == ["v"]


# ---------------------------------------------------------------- newest restore wins


def _two_restores(old_value, new_value):
    nodes = [node(children=[("v", 1)]), node(attributes=[attribute(f"v/{VALUE}")])]
    older = coordinator_for(nodes, {f"v/{VALUE}": np.array(old_value, np.float32)})
    newer = coordinator_for(nodes, {f"v/{VALUE}": np.array(new_value, np.float32)})
    return older, newer


@pytest.mark.parametrize("order", ["older-first", "newer-first"])
def test_newest_restore_wins_on_existing_objects(order):
    older, newer = _two_restores(1.0, 2.0)
    v = f32(0)
    root = tree(v=v)
    sequence = (older, newer) if order == "older-first" else (newer, older)
    for coordinator in sequence:
        CheckpointPosition(coordinator, 0).restore(root)
    assert float(v) == 2.0
    assert v._update_uid == newer.restore_uid
    assert older.object_by_proto_id.get(1) is v  # the older restore still matched it


def test_newest_restore_wins_on_deferred_attach():
    older, newer = _two_restores(1.0, 2.0)
    root = Trackable()
    CheckpointPosition(newer, 0).restore(root)
    CheckpointPosition(older, 0).restore(root)
    v = f32(0)
    root._track_trackable(v, "v")
    assert float(v) == 2.0
    assert older.reader.reads == []


# ---------------------------------------------------------------- inconsistent references


SHARED_W = [
    node(children=[("a", 1), ("b", 2)]),
    node(children=[("w", 3)]),
    node(children=[("w", 3)]),
    node(attributes=[attribute(f"a/w/{VALUE}")]),
]  # saved: a.w and b.w are one variable (node 3)


def test_inconsistent_references_leave_the_second_object_unbound():
    coordinator = coordinator_for(SHARED_W, {f"a/w/{VALUE}": np.array(5.0, np.float32)})
    coordinator.expect_partial()
    a_w, b_w = f32(0), f32(0)  # live: two different variables
    CheckpointPosition(coordinator, 0).restore(tree(a=tree(w=a_w), b=tree(w=b_w)))
    assert float(a_w) == 5.0 and float(b_w) == 0.0
    assert coordinator.object_by_proto_id.get(3) is a_w
    assert b_w._update_uid == -1


def test_inconsistent_references_on_attach_warn(warnings_log):
    # Both parents exist without `w`, so node 3 is queued on each; attaching two different
    # variables then reaches node 3 twice with different objects (TF's testAmbiguousLoad).
    coordinator = coordinator_for(SHARED_W, {f"a/w/{VALUE}": np.array(5.0, np.float32)})
    coordinator.expect_partial()
    a, b = Trackable(), Trackable()
    CheckpointPosition(coordinator, 0).restore(tree(a=a, b=b))
    a_w, b_w = f32(0), f32(0)
    a._track_trackable(a_w, "w")
    assert messages(warnings_log) == []
    b._track_trackable(b_w, "w")
    assert float(a_w) == 5.0 and float(b_w) == 0.0
    assert coordinator.object_by_proto_id.get(3) is a_w
    records = [r for r in warnings_log.records if "Inconsistent references" in r.getMessage()]
    assert len(records) == 1
    assert records[0].name == "asyncckpt" and records[0].levelno == logging.WARNING
    assert f"({a_w!r} and {b_w!r})" in records[0].getMessage()


def test_shared_in_both_graphs_has_no_warning(warnings_log):
    nodes = [node(children=[("a", 1), ("b", 1)]), node(attributes=[attribute(f"a/{VALUE}")])]
    coordinator = coordinator_for(nodes, {f"a/{VALUE}": np.array(1.0, np.float32)})
    shared = f32(0)
    CheckpointPosition(coordinator, 0).restore(tree(a=shared, b=shared))
    assert float(shared) == 1.0
    assert not any("Inconsistent" in m for m in messages(warnings_log))


# ---------------------------------------------------------------- teardown warning


def _partial_restore(**kwargs):
    """Root with ``v`` restored and ``missing`` queued (no such child yet)."""
    nodes = [node(children=[("v", 1), ("missing", 2)]), node(attributes=[attribute(f"v/{VALUE}")]),
             node(attributes=[attribute(f"missing/{VALUE}")])]
    values = {f"v/{VALUE}": np.array(1.0, np.float32), f"missing/{VALUE}": np.array(2.0, np.float32)}
    coordinator = coordinator_for(nodes, values, **kwargs)
    root = tree(v=f32(0))
    CheckpointPosition(coordinator, 0).restore(root)
    return coordinator, root


def test_freed_coordinator_logs_unrestored_values(warnings_log):
    coordinator, root = _partial_restore()
    del coordinator
    gc.collect()
    assert not any(TEARDOWN in m for m in messages(warnings_log))  # the queued position keeps it alive
    del root
    gc.collect()
    logged = messages(warnings_log)
    assert logged[0].startswith("Detecting that an object or model or asyncckpt.Checkpoint " + TEARDOWN)
    assert "status.expect_partial()" in logged[0]
    assert logged[1:] == ["Value in checkpoint could not be found in the restored object: (root).missing"]
    assert all(r.levelno == logging.WARNING for r in warnings_log.records)


def test_expect_partial_silences_teardown(warnings_log):
    coordinator, root = _partial_restore()
    coordinator.expect_partial()
    del coordinator, root
    gc.collect()
    assert messages(warnings_log) == []


def test_fully_matched_restore_is_silent(warnings_log):
    nodes = [node(children=[("v", 1)]), node(attributes=[attribute(f"v/{VALUE}")])]
    coordinator = coordinator_for(nodes, {f"v/{VALUE}": np.array(1.0, np.float32)})
    root = tree(v=f32(0))
    CheckpointPosition(coordinator, 0).restore(root)
    del coordinator, root
    gc.collect()
    assert messages(warnings_log) == []


def test_teardown_lists_unused_attributes(warnings_log):
    nodes = [node(children=[("v", 1)]),
             node(attributes=[attribute(f"v/{VALUE}"), attribute("v/.ATTRIBUTES/EXTRA", "EXTRA")])]
    values = {f"v/{VALUE}": np.array(4.0, np.float32), "v/.ATTRIBUTES/EXTRA": np.zeros(1)}
    coordinator = coordinator_for(nodes, values)
    root = tree(v=f32(0))
    CheckpointPosition(coordinator, 0).restore(root)
    del coordinator, root
    gc.collect()
    assert messages(warnings_log)[1:] == [
        "An attribute in the restored object could not be found in the checkpoint. Object: (root).v, "
        "attribute: EXTRA"
    ]


def test_coordinator_never_used_logs_every_node(warnings_log):
    coordinator = coordinator_for([node(children=[("v", 1)]), node(attributes=[attribute("k")])],
                                  {"k": np.zeros(1)})
    del coordinator
    gc.collect()
    assert messages(warnings_log)[1:] == [
        "Value in checkpoint could not be found in the restored object: (root)",
        "Value in checkpoint could not be found in the restored object: (root).v",
    ]


# ---------------------------------------------------------------- slots


class SlotRecorder(Trackable):
    """Optimizer stand-in: records what the engine hands to ``_create_or_restore_slot_variable``."""

    def __init__(self):
        self.calls = []

    def _create_or_restore_slot_variable(self, slot_variable_position, slot_name, variable):
        self.calls.append((slot_variable_position.proto_id, slot_name, variable))


SLOT_NODES = [
    node(children=[("v", 1), ("opt", 2)]),
    node(attributes=[attribute(f"v/{VALUE}")]),
    node(slots=[(1, "m", 3)]),
    node(attributes=[attribute(f"v/.OPTIMIZER_SLOT/opt/m/{VALUE}")]),
]
SLOT_VALUES = {f"v/{VALUE}": np.array(1.0, np.float32),
               f"v/.OPTIMIZER_SLOT/opt/m/{VALUE}": np.array(2.0, np.float32)}


def test_slot_handed_to_optimizer_when_both_are_bound():
    coordinator = coordinator_for(SLOT_NODES, SLOT_VALUES)
    coordinator.expect_partial()
    v, opt = f32(0), SlotRecorder()
    CheckpointPosition(coordinator, 0).restore(tree(v=v, opt=opt))
    assert opt.calls == [(3, "m", v)]
    assert coordinator.slot_restorations == {}
    assert coordinator.slot_variable_node_ids == {3}


@pytest.mark.parametrize("late", ["v", "opt"])
def test_slot_waits_for_the_late_partner(late):
    coordinator = coordinator_for(SLOT_NODES, SLOT_VALUES)
    coordinator.expect_partial()
    v, opt = f32(0), SlotRecorder()
    present = {"v": v, "opt": opt}
    late_object = present.pop(late)
    root = tree(**present)
    CheckpointPosition(coordinator, 0).restore(root)
    assert opt.calls == []
    root._track_trackable(late_object, late)
    assert opt.calls == [(3, "m", v)]


def test_skip_slot_variables():
    coordinator = coordinator_for(SLOT_NODES, SLOT_VALUES, skip_slot_variables=True)
    coordinator.expect_partial()
    opt = SlotRecorder()
    CheckpointPosition(coordinator, 0).restore(tree(v=f32(0), opt=opt))
    assert opt.calls == []
    assert coordinator.slot_restorations == {}
    assert coordinator.slot_variable_node_ids == {3}


def test_optimizer_node_bound_to_plain_object_ignores_slots():
    coordinator = coordinator_for(SLOT_NODES, SLOT_VALUES)
    coordinator.expect_partial()
    v = f32(0)
    CheckpointPosition(coordinator, 0).restore(tree(v=v, opt=Trackable()))
    assert float(v) == 1.0


# ---------------------------------------------------------------- restore-on-create helpers


def test_variable_from_position_is_not_restored_twice():
    nodes = [node(children=[("v", 1)]), node(attributes=[attribute(f"v/{VALUE}")])]
    coordinator = coordinator_for(nodes, {f"v/{VALUE}": np.array([3, 4], np.int16)})
    position = CheckpointPosition(coordinator, 1)
    v = variable_from_position(position, name="w", trainable=False)
    assert (v.name, v.trainable, v.dtype, v.shape) == ("w", False, np.dtype(np.int16), (2,))
    np.testing.assert_array_equal(v.numpy(), [3, 4])
    assert v._update_uid == coordinator.restore_uid
    v.assign([0, 0])
    root = Trackable()
    CheckpointPosition(coordinator, 0).restore(root)
    root._track_trackable(v, "v")
    np.testing.assert_array_equal(v.numpy(), [0, 0])  # bound, but not assigned again
    assert coordinator.object_by_proto_id.get(1) is v
    assert len(coordinator.reader.reads) == 1


def test_preload_simple_restoration_picks_newest():
    older, newer = _two_restores(1.0, 2.0)
    root = Trackable()
    assert preload_simple_restoration(root, "v") is None
    CheckpointPosition(older, 0).restore(root)
    CheckpointPosition(newer, 0).restore(root)
    chosen = preload_simple_restoration(root, "v")
    assert chosen.checkpoint is newer
    assert float(chosen.value()) == 2.0
    for coordinator in (older, newer):
        coordinator.expect_partial()


def test_preload_refuses_when_any_queued_position_is_not_simple():
    nodes = [node(children=[("v", 1)]), node(children=[("inner", 2)], attributes=[attribute("k")]),
             node(attributes=[attribute("k2")])]
    coordinator = coordinator_for(nodes, {"k": np.zeros(1), "k2": np.zeros(1)})
    coordinator.expect_partial()
    root = Trackable()
    CheckpointPosition(coordinator, 0).restore(root)
    assert root._deferred_dependencies["v"]
    assert preload_simple_restoration(root, "v") is None
